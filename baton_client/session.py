"""One live attachment to a Baton session: reconnects, resumes, publishes exactly once.

The socket is an implementation detail. The caller sees an ordered stream of events with no gap
and no duplicate across any number of reconnects, and publishes that resolve exactly once:

* Position: `last_seq` is the last event handed to the caller; every (re)attach sends
  `after=last_seq`, and anything with `seq <= last_seq` is dropped as a duplicate.
* Publishes: every event carries a `client_ref`. A publish stays in `_pending` until its ack;
  after a reconnect all pending frames are re-sent, in their original order, before anything
  new, with the same `client_ref`, so the server either stores them once or answers
  `duplicate: true` with the original seq.
* Close codes 4400/4401/4403/4404 stop the session with `ConnectionRejected`; any other loss
  (4408, 1006, server restart, refused TCP connect) reconnects with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from baton_client.errors import (
    BatonError,
    ConnectionRejected,
    ControlledByHuman,
    Forbidden,
    NotConnected,
    ProtocolViolation,
    SessionNotFound,
    Unauthenticated,
    error_from_wire,
    rejection_for_close,
)
from baton_client.util import backoff_delays, new_client_ref, type_matches

if TYPE_CHECKING:
    from baton_client.client import BatonClient
    from baton_client.stream import MessageStream

log = logging.getLogger("baton_client")

Event = dict[str, Any]
Handler = Callable[..., Any]

# Types the SDK itself must see to track presence, handover status and cancels, whatever
# filter the caller asked for; events outside the caller's filter are not yielded to it.
INTERNAL_TYPES: tuple[str, ...] = ("signal.*", "presence.*", "handover.*", "session.*")

STATUS_BY_EVENT = {
    "handover.requested": "awaiting_human",
    "handover.claimed": "with_human",
    "handover.released": "active",
    "session.closed": "closed",
}

_END = object()


@dataclass(slots=True)
class Ack:
    """The server's answer to a publish. `duplicate` means the client_ref was already stored."""

    seq: int | None
    seqs: list[int]
    id: str | None
    message_id: str | None
    duplicate: bool
    raw: dict[str, Any]

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> Ack:
        seqs = list(frame.get("seqs") or ([frame["seq"]] if frame.get("seq") is not None else []))
        return cls(
            seq=frame.get("seq", seqs[-1] if seqs else None),
            seqs=seqs,
            id=frame.get("id"),
            message_id=frame.get("message_id"),
            duplicate=bool(frame.get("duplicate", False)),
            raw=frame,
        )


@dataclass(slots=True)
class _Pending:
    ref: str
    text: str
    future: asyncio.Future[Ack]
    generation: int = -1  # connection generation it was last sent on


@dataclass(slots=True)
class _Subscription:
    patterns: list[str] | None
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class Session:
    """A resumable attachment to one session. Create it with `BatonClient.connect()`."""

    def __init__(
        self,
        client: BatonClient,
        session_id: str,
        *,
        after: int | None = None,
        types: Sequence[str] | None = None,
        client_id: str | None = None,
        kind: str | None = None,
        coalesce_window: float = 0.025,
        backlog_limit: int = 10_000,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        ping_interval: float | None = 10.0,
    ) -> None:
        self.client = client
        self.id = session_id
        self.client_id = client_id
        #: "agent" enables the local controlled-by-human check; None leaves it to the server.
        self.kind = kind
        self.coalesce_window = coalesce_window
        self.last_seq: int = after or 0
        self.head: int = self.last_seq
        self.connection_id: str | None = None
        self.members: dict[str, dict[str, Any]] = {}
        self.status: str | None = None
        self.controller: Any = None
        self.error: BaseException | None = None
        self.reconnects = 0
        self.duplicates_dropped = 0

        self._user_types = list(types) if types else None
        self._wire_types = (
            sorted(set(self._user_types) | set(INTERNAL_TYPES)) if self._user_types else None
        )
        self._status_seq = -1
        self._backoff = (backoff_base, backoff_max)
        self._ping_interval = ping_interval
        self._ws: ClientConnection | None = None
        self._attached = False
        self._generation = 0
        self._send_lock = asyncio.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ref_counter = 0
        self._subs: list[_Subscription] = []
        self._backlog: deque[Event] | None = deque(maxlen=backlog_limit)
        self._handlers: list[tuple[list[str] | None, Handler]] = []
        self._presence_handlers: list[Handler] = []
        self._status_handlers: list[Handler] = []
        self._connection_handlers: list[Handler] = []
        self._ephemeral_handlers: list[Handler] = []
        self._presence_queues: list[asyncio.Queue[Any]] = []
        self._callbacks: asyncio.Queue[tuple[Handler, tuple[Any, ...]]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._streams: dict[str, MessageStream] = {}
        self._closing = False
        self._first_attach: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reported_seq = 0
        self._attached_this_conn = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, timeout: float | None = 30.0) -> Session:
        """Read the session's status, open the socket and wait for the first `attached`.

        Transient failures (server down, restarting) are retried until `timeout`; refusals
        (bad credential, no such session) raise at once.
        """
        loop = asyncio.get_running_loop()
        self._first_attach = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._load_status()
                runner = asyncio.create_task(self._guarded_run(), name=f"baton:{self.id}")
                self._tasks.append(runner)
                self._tasks.append(asyncio.create_task(self._run_callbacks()))
                await asyncio.shield(self._first_attach)
        except BaseException:
            await self.close()
            raise
        return self

    async def _load_status(self) -> None:
        """The status as of some seq, so `after=` resumes know whether an operator holds it."""
        delays = backoff_delays(*self._backoff)
        while True:
            try:
                info = await self.client.rest.get_session(self.id)
                break
            except httpx.TransportError as exc:
                log.info("baton: status read failed (%s), retrying", exc)
                await asyncio.sleep(next(delays))
            except BatonError as exc:
                # A REST refusal names the same problem the socket would close with.
                mapping = {
                    401: (Unauthenticated, 4401),
                    403: (Forbidden, 4403),
                    404: (SessionNotFound, 4404),
                }
                if exc.status in mapping:
                    cls, code = mapping[exc.status]
                    raise cls(exc.message, close_code=code) from exc
                if exc.status is not None and exc.status < 500:
                    raise
                await asyncio.sleep(next(delays))
        self.status = info.get("status")
        self.controller = info.get("controller")
        self._status_seq = int(info.get("last_seq") or 0)

    async def close(self) -> None:
        """Close cleanly (code 1000: a `presence.leave` reason `closed`, never a cancel)."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._finish(NotConnected("session closed by the caller"), end_iterators=True)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while attached (caught up and live)."""
        return self._attached

    @property
    def closed(self) -> bool:
        return self._closing or self.error is not None

    def _url(self) -> str:
        base = self.client.base_url
        scheme, rest = base.split("://", 1)
        ws_scheme = "wss" if scheme == "https" else "ws"
        query: dict[str, str] = {"token": self.client.api_key}
        if self.client_id:
            query["client_id"] = self.client_id
        return f"{ws_scheme}://{rest}/ws/sessions/{self.id}/?{urlencode(query)}"

    async def _guarded_run(self) -> None:
        """Never let the connection task die silently: callers would wait forever."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("baton: connection task crashed")
            self._finish(BatonError(f"connection task crashed: {exc!r}"), end_iterators=True)

    async def _run(self) -> None:
        delays = backoff_delays(*self._backoff)
        while not self._closing:
            fatal: ConnectionRejected | None = None
            try:
                ws = await ws_connect(
                    self._url(),
                    open_timeout=10,
                    ping_interval=self._ping_interval,
                    ping_timeout=self._ping_interval,
                    close_timeout=2,
                    max_size=None,
                    proxy=None,
                )
            except InvalidStatus as exc:
                # Channels answers a consumer that closes before accepting with HTTP 403.
                status = exc.response.status_code
                code = {401: 4401, 403: 4403, 404: 4404}.get(status)
                if code is not None:
                    fatal = rejection_for_close(code, f"HTTP {status} on handshake")
                log.info("baton: handshake refused with HTTP %s", status)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                log.info("baton: connect failed (%s), retrying", exc)
            else:
                code, reason = await self._serve(ws)
                if self._closing or self.error is not None:
                    return
                fatal = rejection_for_close(code, reason)
                if fatal is None:
                    log.info("baton: connection lost (code %s %s), resuming", code, reason)
                if self._attached_this_conn:
                    delays = backoff_delays(*self._backoff)  # it worked: start over small
            if fatal is not None:
                self._finish(fatal, end_iterators=True)
                return
            self.reconnects += 1
            self._emit_connection("reconnecting")
            await asyncio.sleep(next(delays))

    async def _serve(self, ws: ClientConnection) -> tuple[int, str]:
        """Attach, re-send what is still unacknowledged, then read until the socket ends."""
        self._generation += 1
        self._attached_this_conn = False
        self._reported_seq = 0  # tell each new connection where we are
        reporter: asyncio.Task[None] | None = None
        try:
            async with self._send_lock:
                attach: dict[str, Any] = {"op": "attach", "after": self.last_seq}
                if self._wire_types is not None:
                    attach["types"] = self._wire_types
                await ws.send(json.dumps(attach))
                for pending in list(self._pending.values()):
                    pending.generation = self._generation
                    await ws.send(pending.text)
                self._ws = ws
            reporter = asyncio.create_task(self._report_position(ws))
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue
                self._handle_frame(json.loads(raw))
                if self.error is not None:
                    break  # refused for good (see _finish); the finally closes the socket
        except ConnectionClosed:
            pass
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("baton: dropping connection after %r", exc)
        finally:
            self._ws = None
            was_attached = self._attached
            self._attached = False
            if reporter is not None:
                reporter.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
            if was_attached:
                self._emit_connection("disconnected")
        return ws.close_code or 1006, ws.close_reason or ""

    async def _report_position(self, ws: ClientConnection) -> None:
        """Tell the server how far we got (`received`), at most once a second, for diagnostics."""
        while True:
            await asyncio.sleep(1.0)
            if self.last_seq > self._reported_seq:
                self._reported_seq = self.last_seq
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"op": "received", "seq": self.last_seq}))

    def _finish(self, error: BaseException, *, end_iterators: bool) -> None:
        """Stop for good: fail every pending publish and end the iterators."""
        if self.error is None and not isinstance(error, NotConnected):
            self.error = error
        if self._first_attach is not None and not self._first_attach.done():
            self._first_attach.set_exception(error)
            self._first_attach.exception()  # mark retrieved; start() re-raises it
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
                pending.future.exception()
        self._pending.clear()
        if end_iterators:
            for sub in self._subs:
                sub.queue.put_nowait(_END)
            for queue in self._presence_queues:
                queue.put_nowait(_END)
        self._attached = False
        self._notify_changed()
        self._emit_connection("failed" if self.error is not None else "closed")

    # ------------------------------------------------------------------ inbound

    def _handle_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "events":
            for event in frame.get("events", []):
                self._handle_event(event)
        elif op == "attached":
            self._on_attached(frame)
        elif op == "ack":
            pending = self._pending.pop(frame.get("ref", ""), None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(Ack.from_frame(frame))
        elif op == "error":
            pending = self._pending.pop(frame.get("ref") or "", None)
            if pending is not None:
                if not pending.future.done():
                    pending.future.set_exception(error_from_wire(frame))
            elif frame.get("code") == "bad_after":
                # Our position is beyond the server's head (a reset database): resuming cannot
                # work, and silently starting over would hand the caller old seqs again.
                self._finish(
                    ProtocolViolation(
                        f"server refused after={self.last_seq}: {frame.get('message')}",
                        close_code=4400,
                        reason="bad_after",
                    ),
                    end_iterators=True,
                )
            else:
                log.warning("baton: server error %s: %s", frame.get("code"), frame.get("message"))
        elif op == "ephemeral":
            for handler in self._ephemeral_handlers:
                self._call(handler, frame)
        elif op == "snapshot":
            pass  # not requested by this SDK
        elif op != "pong":
            log.debug("baton: ignoring frame %s", op)

    def _on_attached(self, frame: dict[str, Any]) -> None:
        self.head = max(self.head, int(frame.get("head") or 0))
        self.connection_id = frame.get("connection_id")
        previous = set(self.members)
        self.members = {m["client_id"]: dict(m) for m in frame.get("presence") or []}
        # Members that came or went while we were away: report them like live changes.
        for client_id in set(self.members) - previous:
            self._emit_presence("enter", self.members[client_id])
        for client_id in previous - set(self.members):
            self._emit_presence("leave", {"client_id": client_id})
        self._attached = True
        self._attached_this_conn = True
        self._notify_changed()
        if self._first_attach is not None and not self._first_attach.done():
            self._first_attach.set_result(None)
            self._emit_connection("open")
        else:
            self._emit_connection("resumed")

    def _handle_event(self, event: Event) -> None:
        seq = int(event.get("seq") or 0)
        if seq <= self.last_seq:
            self.duplicates_dropped += 1
            return
        self.last_seq = seq
        self.head = max(self.head, seq)
        self._apply(event)
        if not type_matches(event["type"], self._user_types):
            return
        if self._backlog is not None:
            self._backlog.append(event)
        for sub in self._subs:
            if type_matches(event["type"], sub.patterns):
                sub.queue.put_nowait(event)
        for patterns, handler in self._handlers:
            if type_matches(event["type"], patterns):
                self._call(handler, event)

    def _apply(self, event: Event) -> None:
        """Fold an event into the SDK's own state: presence, handover status, cancels."""
        etype: str = event["type"]
        data = event.get("data") or {}
        if etype == "presence.enter" and data.get("client_id"):
            # The `attached` snapshot may already hold a member whose enter event is live
            # after it: merge, but report an enter only for someone who was not there.
            known = data["client_id"] in self.members
            member = {**self.members.get(data["client_id"], {}), **data}
            member.pop("reason", None)
            self.members[data["client_id"]] = member
            if not known:
                self._emit_presence("enter", member)
        elif etype == "presence.leave" and data.get("client_id"):
            if self.members.pop(data["client_id"], None) is not None:
                self._emit_presence("leave", data)
        elif etype == "presence.update" and data.get("client_id") in self.members:
            self.members[data["client_id"]].update(data)
            self._emit_presence("update", self.members[data["client_id"]])
        elif etype in STATUS_BY_EVENT and event["seq"] > self._status_seq:
            self.status = STATUS_BY_EVENT[etype]
            if etype == "handover.claimed":
                self.controller = data.get("operator")
            elif etype in ("handover.released", "session.closed"):
                self.controller = None
            for handler in self._status_handlers:
                self._call(handler, self.status, event)
        elif etype == "signal.cancel":
            target = data.get("message_id")
            for stream in list(self._streams.values()):
                if target is None or target == stream.message_id:
                    stream._on_cancel(event)
        self._notify_changed()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _emit_presence(self, change: str, member: dict[str, Any]) -> None:
        for handler in self._presence_handlers:
            self._call(handler, change, member)
        for queue in self._presence_queues:
            queue.put_nowait((change, member))

    def _emit_connection(self, state: str) -> None:
        for handler in self._connection_handlers:
            self._call(handler, state)

    def _call(self, handler: Handler, *args: Any) -> None:
        """Handlers run in order on one task, so a slow handler never stalls the socket."""
        self._callbacks.put_nowait((handler, args))

    async def _run_callbacks(self) -> None:
        while True:
            handler, args = await self._callbacks.get()
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("baton: handler %r failed", handler)

    # ------------------------------------------------------------------ reading

    async def events(self, types: Iterable[str] | None = None) -> AsyncIterator[Event]:
        """Every event in seq order, from the position given to `connect()`, across reconnects.

        The first `events()` call also yields what arrived before it was called (the replay),
        so nothing between `connect()` and the loop is lost. Ends when the session is closed;
        raises the `ConnectionRejected` if the server refused us for good.
        """
        sub = _Subscription(list(types) if types else None)
        if self._backlog is not None:
            for event in self._backlog:
                if type_matches(event["type"], sub.patterns):
                    sub.queue.put_nowait(event)
            self._backlog = None
        async for event in self._drain(sub):
            yield event

    async def signals(self) -> AsyncIterator[Event]:
        """`signal.*` events (cancel, redirect, custom) that arrive from now on."""
        async for event in self._drain(_Subscription(["signal.*"])):
            yield event

    async def presence_changes(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """`(change, member)` from now on, change `enter|leave|update`; ends with the session."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = _Subscription(None, queue)
        self._presence_queues.append(queue)
        try:
            async for item in self._drain(sub, register=False):
                yield item
        finally:
            self._presence_queues.remove(queue)

    async def _drain(self, sub: _Subscription, *, register: bool = True) -> AsyncIterator[Any]:
        if self.closed:
            sub.queue.put_nowait(_END)
        if register:
            self._subs.append(sub)
        try:
            while True:
                item = await sub.queue.get()
                if item is _END:
                    if self.error is not None:
                        raise self.error
                    return
                yield item
        finally:
            with contextlib.suppress(ValueError):
                self._subs.remove(sub)

    def on(self, types: str | Iterable[str] | None, handler: Handler) -> Callable[[], None]:
        """Call `handler(event)` (sync or async) for matching events; returns an unsubscribe."""
        patterns = [types] if isinstance(types, str) else (list(types) if types else None)
        entry = (patterns, handler)
        self._handlers.append(entry)
        return lambda: self._handlers.remove(entry)

    def on_presence(self, handler: Handler) -> Callable[[], None]:
        """`handler(change, member)` with change `enter|leave|update`."""
        self._presence_handlers.append(handler)
        return lambda: self._presence_handlers.remove(handler)

    def on_status(self, handler: Handler) -> Callable[[], None]:
        """`handler(status, event)` on every handover transition."""
        self._status_handlers.append(handler)
        return lambda: self._status_handlers.remove(handler)

    def on_connection(self, handler: Handler) -> Callable[[], None]:
        """`handler(state)`: open, disconnected, reconnecting, resumed, closed, failed."""
        self._connection_handlers.append(handler)
        return lambda: self._connection_handlers.remove(handler)

    def on_ephemeral(self, handler: Handler) -> Callable[[], None]:
        """`handler(frame)` for ephemeral frames (typing) from others; they carry no seq."""
        self._ephemeral_handlers.append(handler)
        return lambda: self._ephemeral_handlers.remove(handler)

    # ------------------------------------------------------------------ presence / status

    @property
    def users(self) -> list[dict[str, Any]]:
        """Members of kind `user` currently attached (any device)."""
        return [m for m in self.members.values() if m.get("kind") == "user"]

    async def wait_for(
        self, predicate: Callable[[Session], bool], timeout: float | None = None
    ) -> None:
        """Wait until `predicate(session)` holds; re-checked on every state change."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.error is not None:
                    raise self.error
                if self._closing:
                    raise NotConnected("session closed by the caller")
                await self._changed.wait()

    async def wait_for_user(self, timeout: float | None = None) -> dict[str, Any]:
        """Return a present user, waiting for one to attach; lets an agent idle while alone."""
        await self.wait_for(lambda s: bool(s.users), timeout)
        return self.users[0]

    async def wait_until_released(self, timeout: float | None = None) -> None:
        """Wait while an operator holds the session (`with_human`)."""
        await self.wait_for(lambda s: s.status != "with_human", timeout)

    @property
    def controlled_by_human(self) -> bool:
        return self.status == "with_human"

    def _check_may_message(self) -> None:
        if self.kind == "agent" and self.controlled_by_human:
            raise ControlledByHuman(
                "an operator holds this session; agents may not publish messages until it is "
                "released",
                code="controlled_by_human",
            )

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        message_id: str | None = None,
        client_ref: str | None = None,
    ) -> Ack:
        """Publish one event and wait for its ack; safe across reconnects (see module doc).

        Wrap in `asyncio.timeout()` to bound the wait: the frame stays queued and is still
        delivered at most once, so retrying with the same `client_ref` is safe.
        """
        event: dict[str, Any] = {"type": type, "data": data if data is not None else {}}
        if message_id is not None:
            event["message_id"] = message_id
        event["client_ref"] = client_ref or new_client_ref()
        return await self.publish_event(event)

    async def publish_event(self, event: dict[str, Any]) -> Ack:
        """Publish a ready-made event dict (a `client_ref` is added when missing)."""
        if event["type"].startswith("message."):
            self._check_may_message()
        event = {**event, "client_ref": event.get("client_ref") or new_client_ref()}
        return await self._send_publish({"op": "publish", "event": event})

    async def publish_batch(self, events: Sequence[dict[str, Any]]) -> Ack:
        """Publish several events atomically in one frame; `Ack.seqs` lists their seqs."""
        if any(e["type"].startswith("message.") for e in events):
            self._check_may_message()
        batch = [{**e, "client_ref": e.get("client_ref") or new_client_ref()} for e in events]
        return await self._send_publish({"op": "publish", "events": batch})

    async def _send_publish(self, frame: dict[str, Any]) -> Ack:
        if self.error is not None:
            raise self.error
        if self._closing:
            raise NotConnected("session closed by the caller")
        self._ref_counter += 1
        ref = f"p{self._ref_counter}"
        frame["ref"] = ref
        pending = _Pending(ref, json.dumps(frame), asyncio.get_running_loop().create_future())
        self._pending[ref] = pending
        async with self._send_lock:
            ws = self._ws
            if ws is not None and pending.generation != self._generation:
                pending.generation = self._generation
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(pending.text)  # if this fails, the reconnect re-sends it
        # If our waiter is cancelled the frame stays pending: it keeps its place in the order,
        # so a later `message.complete` can never overtake an `append` that was queued first.
        return await asyncio.shield(pending.future)

    async def send_typing(self, state: bool = True) -> None:
        """Ephemeral typing indicator; dropped (not queued) while disconnected."""
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"op": "typing", "state": state}))

    # ------------------------------------------------------------------ conveniences

    def stream_message(
        self,
        *,
        role: str = "assistant",
        message_id: str | None = None,
        content: str = "",
        parts: list[Any] | None = None,
        window: float | None = None,
    ) -> MessageStream:
        """`async with session.stream_message() as msg: await msg.append(token)`.

        See `MessageStream` for coalescing, cancellation and failure rules.
        """
        from baton_client.stream import MessageStream

        return MessageStream(
            self,
            role=role,
            message_id=message_id,
            content=content,
            parts=parts,
            window=self.coalesce_window if window is None else window,
        )

    async def send_message(
        self,
        content: str,
        *,
        role: str = "assistant",
        message_id: str | None = None,
        parts: list[Any] | None = None,
    ) -> Ack:
        """A whole message in one event (`message.create` with status `complete`)."""
        data: dict[str, Any] = {"role": role, "content": content, "status": "complete"}
        if parts is not None:
            data["parts"] = parts
        return await self.publish("message.create", data, message_id=message_id)

    async def progress(self, name: str, data: dict[str, Any] | None = None) -> Ack:
        """Publish `progress.<name>`: tool calls, steps, reasoning the UI may show."""
        return await self.publish(f"progress.{name}", data or {})

    async def signal(self, name: str, data: dict[str, Any] | None = None) -> Ack:
        """Publish `signal.<name>` (e.g. `cancel`, `redirect`)."""
        return await self.publish(f"signal.{name}", data or {})

    async def request_handover(self, *, reason: str, summary: str | None = None) -> Ack:
        """Ask for a human: publishes `handover.requested`; the session goes `awaiting_human`."""
        data: dict[str, Any] = {"reason": reason}
        if summary is not None:
            data["summary"] = summary
        return await self.publish("handover.requested", data)

    def __repr__(self) -> str:
        return (
            f"<Session {self.id} last_seq={self.last_seq} status={self.status} "
            f"connected={self.connected}>"
        )
