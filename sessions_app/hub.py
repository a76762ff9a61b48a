"""In-process fan-out.

One Hub per process (per event loop). It holds one channel-layer group membership per session
that has local subscribers and fans each session's events out in memory to its local
connections — never one channel-layer hop per socket per event.

Each session has a Feed that delivers events to subscribers contiguously, in seq order: events
published in this process are handed over directly; events from other processes arrive through
the channel layer. A hole (a message the layer dropped, or two commits arriving out of order) is
repaired from the database, and a periodic head check catches a lost *last* event in a quiet
session. The hub also runs this worker's heartbeat and the presence reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from functools import partial
from typing import Any, NamedTuple, Protocol

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.db import transaction

from sessions_app.ids import new_worker_id
from sessions_app.wire import wire_json

log = logging.getLogger(__name__)

EVENTS_MESSAGE = "baton.events"
EPHEMERAL_MESSAGE = "baton.ephemeral"
FORWARD_MESSAGE = "baton.commit"  # publishes handed to the committing worker (writer.Forwarder)
ANSWER_MESSAGE = "baton.committed"  # its answers, to the worker that handed them over
REPAIR_GRACE_SECONDS = 0.05
GROUP_REFRESH_SECONDS = 30.0
IDLE_FEED_SECONDS = 30.0
# Bound on one channel-layer call: a hung Redis must not stall the sender or an attach.
LAYER_CALL_TIMEOUT = 5.0
LAYER_RETRY_MAX_SECONDS = 2.0


def group_name(session_id: str) -> str:
    return f"baton.session.{session_id}"


class WireEvent(NamedTuple):
    """An event with its JSON encoded once per process, shared by every local connection.

    A tuple: a replay builds ten thousand of these, and a tuple is the cheapest to build."""

    seq: int
    type: str
    visibility: str
    json: str

    @classmethod
    def from_dict(cls, event: dict[str, Any]) -> WireEvent:
        return cls(
            seq=event["seq"],
            type=event["type"],
            visibility=event["visibility"],
            json=wire_json(event),
        )


class Subscriber(Protocol):
    def push(self, events: list[WireEvent]) -> None: ...

    def push_ephemeral(self, payload: dict[str, Any]) -> None: ...


class Feed:
    """One session's contiguous event stream inside this process."""

    # Slots: a process holds one Feed per watched session, thousands when sessions are idle.
    __slots__ = (
        "behind_checks",
        "delivered",
        "empty_since",
        "hub",
        "joined",
        "last_event_at",
        "pending",
        "ready",
        "repair_task",
        "session_id",
        "subscribers",
    )

    def __init__(self, hub: Hub, session_id: str) -> None:
        self.hub = hub
        self.session_id = session_id
        self.subscribers: set[Subscriber] = set()
        self.delivered: int | None = None  # None until the starting head is known
        self.pending: dict[int, WireEvent] = {}
        self.ready: asyncio.Future[None] = hub.loop.create_future()
        self.repair_task: asyncio.Task[None] | None = None
        self.last_event_at = time.monotonic()
        self.empty_since: float | None = None
        self.behind_checks = 0
        self.joined = False  # holds its channel-layer group membership

    def on_events(self, events: list[dict[str, Any]] | list[WireEvent]) -> None:
        self.last_event_at = time.monotonic()
        floor = self.delivered if self.delivered is not None else -1
        for event in events:
            wire = event if isinstance(event, WireEvent) else WireEvent.from_dict(event)
            if wire.seq > floor:
                self.pending[wire.seq] = wire
        self.drain()

    def drain(self) -> None:
        if self.delivered is None or not self.pending:
            return
        out: list[WireEvent] = []
        nxt = self.delivered + 1
        while nxt in self.pending:
            out.append(self.pending.pop(nxt))
            nxt += 1
        self.delivered = nxt - 1
        for seq in [s for s in self.pending if s <= self.delivered]:
            del self.pending[seq]
        if out:
            for sub in list(self.subscribers):
                sub.push(out)
        if self.pending and self.repair_task is None:
            self.repair_task = self.hub.spawn(self._repair(max(self.pending) - 1, True))

    def request_repair(self, upto: int) -> None:
        if self.repair_task is None and self.delivered is not None and upto > self.delivered:
            self.repair_task = self.hub.spawn(self._repair(upto, False))

    async def _repair(self, upto: int, grace: bool) -> None:
        events: list[dict[str, Any]] = []
        try:
            if grace:
                # Out-of-order arrivals usually fill the hole on their own within milliseconds.
                await asyncio.sleep(REPAIR_GRACE_SECONDS)
                if self.pending:
                    upto = max(upto, min(self.pending) - 1)
            from sessions_app.selectors import wire_events_between

            after = self.delivered
            if after is not None and upto > after and (self.pending or not grace):
                events = await database_sync_to_async(wire_events_between)(
                    session_id=self.session_id, after=after, upto=upto
                )
                self.hub.stats["repairs"] += 1
                self.hub.stats["repaired_events"] += len(events)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("repair of %s failed", self.session_id)
            await asyncio.sleep(0.5)
        self.repair_task = None
        self.on_events(events)  # drains, and schedules another repair if a hole remains


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.worker_id = new_worker_id()
        self.layer = get_channel_layer()
        self.remote = self.layer is not None and not isinstance(self.layer, InMemoryChannelLayer)
        self.channel_name: str | None = None
        self.feeds: dict[str, Feed] = {}
        self.outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[Any]] = []
        self.started = False
        self.closed = False  # shut down: a late publish must not start it again
        self.start_lock = asyncio.Lock()
        self.stats = {"repairs": 0, "repaired_events": 0, "layer_errors": 0}
        from sessions_app.writer import EventWriter, Forwarder

        self.writer = EventWriter(loop, publish=self.publish)
        if self.remote and settings.BATON_FORWARD_COMMITS:
            self.writer.forwarder = Forwarder(
                self.writer, send=self.layer.send, origin=self.worker_id
            )

    # ------------------------------------------------------------------ lifecycle

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a hub task in a clean context: never inherit a request's sync-thread context
        (asgiref would refuse its database calls once that request is over)."""
        return self.loop.create_task(coro, context=contextvars.Context())

    async def ensure_started(self) -> None:
        if self.started:
            return
        async with self.start_lock:
            if self.started:
                return
            if self.remote:
                # With the layer down, start anyway: feeds then follow the database (gap repair,
                # head check) and join their groups once the layer is back.
                if not await self._open_channel():
                    self.tasks.append(self.spawn(self._open_channel_until_done()))
                self.tasks.append(self.spawn(self._send_loop()))
            self.tasks.append(self.spawn(self._maintenance_loop()))
            self.started = True

    async def _open_channel(self) -> bool:
        try:
            name = await asyncio.wait_for(self.layer.new_channel("baton.hub."), LAYER_CALL_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["layer_errors"] += 1
            log.warning("channel layer unavailable; feeds follow the database for now")
            return False
        self.channel_name = name
        if self.writer.forwarder is not None:
            self.writer.forwarder.reply_to = name
        self.tasks.append(self.spawn(self._receive_loop()))
        return True

    async def _open_channel_until_done(self) -> None:
        delay = 0.2
        while not await self._open_channel():
            await asyncio.sleep(delay)
            delay = min(delay * 2, LAYER_RETRY_MAX_SECONDS)
        for feed in list(self.feeds.values()):
            await self._join(feed, late=True)

    async def shutdown(self) -> None:
        self.closed = True
        await self.writer.close()
        tasks = [*self.tasks, *(f.repair_task for f in self.feeds.values() if f.repair_task)]
        for task in tasks:
            task.cancel()
        if tasks:
            # A layer call may swallow one cancellation (channels-redis receive does); don't hang.
            await asyncio.wait(tasks, timeout=2)
        self.tasks.clear()
        self.feeds.clear()
        self.started = False
        if self.remote and hasattr(self.layer, "flush"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.layer.flush(), 2)  # pub/sub: closes connections
        with contextlib.suppress(Exception):
            await asyncio.wait_for(database_sync_to_async(_forget_worker)(self.worker_id), 5)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, session_id: str, subscriber: Subscriber) -> None:
        """Join the session's feed; returns once the feed knows where it starts."""
        await self.ensure_started()
        feed = self.feeds.get(session_id)
        if feed is None:
            feed = Feed(self, session_id)
            self.feeds[session_id] = feed
            feed.subscribers.add(subscriber)
            try:
                await self._start_feed(feed)
            except BaseException as exc:
                feed.subscribers.discard(subscriber)
                if self.feeds.get(session_id) is feed:
                    del self.feeds[session_id]
                if not feed.ready.done():
                    feed.ready.set_exception(exc)
                    feed.ready.exception()  # mark retrieved
                raise
            feed.ready.set_result(None)
            return
        feed.subscribers.add(subscriber)
        feed.empty_since = None
        await asyncio.shield(feed.ready)

    async def _start_feed(self, feed: Feed) -> None:
        from sessions_app.selectors import get_head

        await self._join(feed)
        head = await database_sync_to_async(get_head)(feed.session_id)
        feed.delivered = head or 0
        feed.drain()

    async def _join(self, feed: Feed, late: bool = False) -> bool:
        """Join the feed's group; a failure is retried by the maintenance loop, never raised
        (an attach must work while the layer is down — the feed then follows the database)."""
        if not self.remote:
            feed.joined = True
        if feed.joined:
            return True
        if self.channel_name is None:
            return False
        try:
            await asyncio.wait_for(
                self.layer.group_add(group_name(feed.session_id), self.channel_name),
                LAYER_CALL_TIMEOUT,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["layer_errors"] += 1
            log.warning("could not join the group of %s; will retry", feed.session_id)
            return False
        feed.joined = True
        if late:
            # Events published before this late join were missed: let the next head check
            # repair at once instead of waiting for a second look.
            feed.behind_checks = max(feed.behind_checks, 1)
        return True

    def unsubscribe(self, session_id: str, subscriber: Subscriber) -> None:
        feed = self.feeds.get(session_id)
        if feed is None:
            return
        feed.subscribers.discard(subscriber)
        if not feed.subscribers:
            feed.empty_since = time.monotonic()

    # ------------------------------------------------------------------ publishing

    def publish(self, session_id: str, events: list[dict[str, Any]]) -> None:
        """Deliver committed events locally now and to other processes through the layer."""
        feed = self.feeds.get(session_id)
        if feed is not None:
            feed.on_events(events)
        if self.remote:
            self._ensure_sender()
            self.outbox.put_nowait((session_id, {"type": EVENTS_MESSAGE, "e": events}))

    def publish_ephemeral(
        self, session_id: str, payload: dict[str, Any], exclude: Subscriber | None = None
    ) -> None:
        self._deliver_ephemeral(session_id, payload, exclude)
        if self.remote:
            self._ensure_sender()
            self.outbox.put_nowait((session_id, {"type": EPHEMERAL_MESSAGE, "p": payload}))

    def _ensure_sender(self) -> None:
        """A process that only publishes (REST, or sockets that never attach) has a hub that
        nothing started: start it, or its outbox would never reach the other processes."""
        if not self.started and not self.closed and not self.start_lock.locked():
            self.spawn(self.ensure_started())

    def _deliver_ephemeral(
        self, session_id: str, payload: dict[str, Any], exclude: Subscriber | None = None
    ) -> None:
        feed = self.feeds.get(session_id)
        if feed is None:
            return
        for sub in list(feed.subscribers):
            if sub is not exclude:
                sub.push_ephemeral(payload)

    async def _send_loop(self) -> None:
        """One ordered sender: events of a session reach the layer in commit order."""
        while True:
            session_id, message = await self.outbox.get()
            message = {**message, "s": session_id, "o": self.worker_id}
            # Coalesce what queued up meanwhile into one message per session.
            batch = [message]
            while not self.outbox.empty() and len(batch) < 256:
                sid, nxt = self.outbox.get_nowait()
                last = batch[-1]
                if sid == last["s"] and nxt["type"] == EVENTS_MESSAGE == last["type"]:
                    last["e"] = last["e"] + nxt["e"]
                else:
                    batch.append({**nxt, "s": sid, "o": self.worker_id})
            for item in batch:
                try:
                    await asyncio.wait_for(
                        self.layer.group_send(group_name(item["s"]), item), LAYER_CALL_TIMEOUT
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The events are durable; other processes repair the hole from the database.
                    self.stats["layer_errors"] += 1
                    log.warning("channel layer send failed", exc_info=True)

    async def _receive_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel_name)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats["layer_errors"] += 1
                log.warning("channel layer receive failed; retrying", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._refresh_groups()
                continue
            if message.get("o") == self.worker_id:
                continue
            kind = message.get("type")
            forwarder = self.writer.forwarder
            if kind in (FORWARD_MESSAGE, ANSWER_MESSAGE):
                if forwarder is None:  # not listed as a committer: nobody hands us publishes
                    continue
                try:
                    if kind == FORWARD_MESSAGE:
                        forwarder.serve(message)
                    else:
                        forwarder.on_answers(message)
                except Exception:  # a malformed message must not stop this loop
                    log.warning("dropped a malformed %s message", kind, exc_info=True)
                continue
            session_id = message.get("s")
            feed = self.feeds.get(session_id)
            if feed is None:
                continue
            if message.get("type") == EVENTS_MESSAGE:
                feed.on_events(message.get("e") or [])
            elif message.get("type") == EPHEMERAL_MESSAGE:
                self._deliver_ephemeral(session_id, message.get("p") or {})

    async def _refresh_groups(self) -> None:
        """Re-join every group: a restarted Redis forgets memberships."""
        if not self.remote or self.channel_name is None:
            return
        for session_id in list(self.feeds):
            try:
                await asyncio.wait_for(
                    self.layer.group_add(group_name(session_id), self.channel_name),
                    LAYER_CALL_TIMEOUT,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats["layer_errors"] += 1
                return

    # ------------------------------------------------------------------ maintenance

    async def _maintenance_loop(self) -> None:
        from sessions_app.selectors import get_heads

        heartbeat_every = settings.BATON_HEARTBEAT_SECONDS
        reap_every = settings.BATON_REAP_SECONDS
        head_every = settings.BATON_HEAD_CHECK_SECONDS
        next_heartbeat = next_reap = next_head = 0.0
        next_refresh = time.monotonic() + GROUP_REFRESH_SECONDS
        while True:
            now = time.monotonic()
            try:
                if now >= next_heartbeat:
                    next_heartbeat = now + heartbeat_every
                    # Only a worker that serves hand-overs lists its channel (can be elected).
                    listed = self.channel_name if self.writer.forwarder is not None else None
                    committer = await database_sync_to_async(_heartbeat)(
                        self.worker_id, listed or ""
                    )
                    if self.writer.forwarder is not None:
                        self.writer.forwarder.target = committer
                if now >= next_reap:
                    # Reaping runs more often than the heartbeat so that a dead worker's
                    # presence is gone within timeout + reap_every, not timeout + heartbeat.
                    next_reap = now + reap_every
                    await database_sync_to_async(_reap)()
                if now >= next_head and self.feeds:
                    next_head = now + head_every
                    heads = await database_sync_to_async(get_heads)(list(self.feeds))
                    for session_id, head in heads.items():
                        feed = self.feeds.get(session_id)
                        if feed is None or feed.delivered is None:
                            continue
                        if head > feed.delivered:
                            # Behind twice in a row: the last event's broadcast was lost.
                            feed.behind_checks += 1
                            if feed.behind_checks >= 2:
                                feed.request_repair(head)
                        else:
                            feed.behind_checks = 0
                if now >= next_refresh:
                    next_refresh = now + GROUP_REFRESH_SECONDS
                    await self._refresh_groups()
                for feed in [f for f in self.feeds.values() if not f.joined]:
                    if not await self._join(feed, late=True):
                        break  # the layer is still down; try again next tick
                await self._sweep_idle_feeds()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("hub maintenance failed; will retry", exc_info=True)
            await asyncio.sleep(min(heartbeat_every, reap_every, head_every, 1.0))

    async def _sweep_idle_feeds(self) -> None:
        now = time.monotonic()
        for session_id, feed in list(self.feeds.items()):
            if feed.subscribers or feed.empty_since is None:
                continue
            if now - feed.empty_since < IDLE_FEED_SECONDS:
                continue
            del self.feeds[session_id]
            if feed.repair_task:
                feed.repair_task.cancel()
            if self.remote:
                with contextlib.suppress(Exception):
                    await self.layer.group_discard(group_name(session_id), self.channel_name)


def _heartbeat(worker_id: str, channel: str) -> str | None:
    """Beat, and say where this worker's publishes go to be committed (None: here)."""
    from sessions_app.selectors import get_committing_worker
    from sessions_app.services import heartbeat_worker

    heartbeat_worker(worker_id=worker_id, channel=channel)
    if not channel:  # not serving hand-overs (one process, forwarding off, layer down)
        return None
    committer = get_committing_worker()
    if committer is None or committer.id == worker_id:
        return None
    return committer.channel


def _reap() -> None:
    from sessions_app.services import reap_presence

    reap_presence()


def _forget_worker(worker_id: str) -> None:
    from sessions_app.models import Worker

    Worker.objects.filter(pk=worker_id).delete()


# ---------------------------------------------------------------------- process-wide access

_hub: Hub | None = None


def get_hub() -> Hub:
    """The hub of the running event loop (a new loop, as in tests, gets a new hub)."""
    global _hub
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop:
        _hub = Hub(loop)
    return _hub


def current_hub() -> Hub | None:
    hub = _hub
    if hub is None or hub.loop.is_closed():
        return None
    return hub


async def shutdown_hub() -> None:
    global _hub
    hub = _hub
    if hub is not None and hub.loop is asyncio.get_running_loop():
        await hub.shutdown()
        _hub = None


def publish_after_commit(session_id: str, events: list[dict[str, Any]]) -> None:
    """Fan events out once the surrounding transaction commits (never before)."""
    transaction.on_commit(partial(_publish_now, session_id, events))


def _publish_now(session_id: str, events: list[dict[str, Any]]) -> None:
    hub = current_hub()
    if hub is not None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is hub.loop:
            hub.publish(session_id, events)
        else:
            hub.loop.call_soon_threadsafe(
                hub.publish, session_id, events, context=contextvars.Context()
            )
        return
    # No hub in this process (management command, sync test): reach the others directly.
    layer = get_channel_layer()
    if layer is None or isinstance(layer, InMemoryChannelLayer):
        return
    message = {"type": EVENTS_MESSAGE, "e": events, "s": session_id, "o": "external"}
    try:
        async_to_sync(_bounded_group_send)(layer, group_name(session_id), message)
    except Exception:
        log.warning("channel layer send failed; subscribers will repair", exc_info=True)


async def _bounded_group_send(layer: Any, group: str, message: dict[str, Any]) -> None:
    """A request thread must not hang on a stalled layer: the events are durable anyway."""
    await asyncio.wait_for(layer.group_send(group, message), LAYER_CALL_TIMEOUT)
