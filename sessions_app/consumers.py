"""The session WebSocket: thin protocol glue over streams (reads) and services (writes)."""

import asyncio
import contextlib
import json
import logging
import time
import types
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator, Iterator
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from sessions_app import event_types as et
from sessions_app.auth import AuthError, authenticate_scope, scope_header
from sessions_app.errors import BatonError
from sessions_app.hub import get_hub
from sessions_app.identity import Principal
from sessions_app.selectors import get_session, parse_type_patterns
from sessions_app.services import (
    AppendResult,
    close_connection,
    open_attached,
    parse_event_batch,
    record_delivery_position,
)
from sessions_app.streams import SlowConsumer, Subscription, events_frame
from sessions_app.wire import wire_json

log = logging.getLogger(__name__)

CLOSE_PROTOCOL = 4400
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_SLOW = 4408
CLEAN_CLOSE_CODES = frozenset({1000, 1001})
POSITION_FLUSH_SECONDS = 1.0
MAX_PIPELINED_PUBLISHES = 64  # publishes awaiting their commit before we stop reading frames
# A publish awaiting its ack: its ref, whether it was the batch form, its commit's future.
PendingAck = tuple[Any, bool, "asyncio.Future[list[AppendResult]]"]


def parse_after(raw: Any) -> int:
    if raw is None or raw == "":
        return 0
    if isinstance(raw, bool):
        raise BatonError("bad_after", "'after' must be a non-negative integer.")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BatonError("bad_after", "'after' must be a non-negative integer.") from None
    if value < 0 or (isinstance(raw, float) and raw != value):
        raise BatonError("bad_after", "'after' must be a non-negative integer.")
    return value


class SessionConsumer(AsyncJsonWebsocketConsumer):
    # No per-socket channel-layer channel: the process hub does all fan-out (see __call__).

    async def connect(self) -> None:
        self.session_id: str = self.scope["url_route"]["kwargs"]["session_id"]
        self.principal: Principal | None = None
        self.subscription: Subscription | None = None
        self.connection_id: str | None = None
        self.sender: asyncio.Task[None] | None = None
        self.live = False  # set once `attached` is out: live frames must follow it
        self.attach_started = False
        self.closing = False
        self.torn_down = False
        self.received_seq: int | None = None
        self.flushed_seq: int | None = None
        self.flushed_at = 0.0
        # Made on the first publish: most sockets only subscribe, and each socket's bytes count.
        self.inflight: asyncio.Semaphore | None = None
        self.pending_acks: deque[PendingAck] | None = None
        self.ack_sender: asyncio.Task[None] | None = None
        await self.accept()
        try:
            principal = await database_sync_to_async(authenticate_scope)(self.scope)
            await database_sync_to_async(get_session)(self.session_id)
        except AuthError as exc:
            await self.fail(exc, exc.close_code)
            return
        except BatonError as exc:
            await self.fail(exc, CLOSE_NOT_FOUND)
            return
        if principal.session_id not in (None, self.session_id):
            await self.fail(AuthError("This token is for another session.", forbidden=True), 4403)
            return
        self.principal = principal
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        if {"after", "types", "snapshot"} & set(query):
            await self.op_attach(
                {
                    "after": (query.get("after") or [None])[0],
                    "types": (query.get("types") or [None])[0],
                    "snapshot": (query.get("snapshot") or ["0"])[0] in ("1", "true"),
                }
            )

    # ------------------------------------------------------------------ frames in

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.principal is None or self.closing:
            return
        if text_data is None:
            await self.fail(BatonError("bad_frame", "Binary frames are not supported."), 4400)
            return
        if len(text_data) > settings.BATON_MAX_FRAME_BYTES:
            await self.send_error("payload_too_large", "The frame is over the size limit.")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self.send_error("bad_json", "The frame is not valid JSON.")
            return
        if not isinstance(content, dict) or not isinstance(content.get("op"), str):
            await self.send_error("bad_frame", "A frame is a JSON object with an 'op'.")
            return
        ref = content.get("ref")
        handler = self.handlers.get(content["op"])
        if handler is None:
            await self.send_error("unknown_op", f"Unknown op {content['op']!r}.", ref)
            return
        try:
            await handler(self, content)
        except BatonError as exc:
            await self.send_error(exc.code, exc.message, ref)

    async def op_attach(self, content: dict[str, Any]) -> None:
        assert self.principal is not None
        if self.attach_started:
            await self.fail(BatonError("bad_frame", "This connection is already attached."), 4400)
            return
        if not self.principal.can(et.CAP_SUBSCRIBE, self.session_id):
            raise AuthError("This credential cannot subscribe.", forbidden=True)
        try:
            after = parse_after(content.get("after"))
            types = parse_type_patterns(content.get("types"))
        except BatonError as exc:
            await self.fail(exc, CLOSE_PROTOCOL)
            return
        self.attach_started = True
        subscription = Subscription(
            session_id=self.session_id,
            after=after,
            types=types,
            include_private=self.principal.sees_private,
            hub=get_hub(),
            on_ready=self.live_ready,
        )
        try:
            head = await subscription.open(snapshot=bool(content.get("snapshot")))
        except BatonError as exc:
            await self.fail(exc, CLOSE_PROTOCOL if exc.code == "bad_after" else CLOSE_NOT_FOUND)
            return
        self.subscription = subscription
        if subscription.snapshot is not None:
            await self.send_json(subscription.snapshot)
        async for page in subscription.history():
            await self.send_text(events_frame(page))
        conn, presence, session = await database_sync_to_async(open_attached)(
            session_id=self.session_id,
            author=self.principal.author,
            worker_id=subscription.hub.worker_id,
            after=after,
            replayed=subscription.replayed,
            counts_for_presence=self.principal.can(et.CAP_PRESENCE, self.session_id),
            user_agent=scope_header(self.scope, "user-agent"),
        )
        self.connection_id = conn.id
        await self.send_json(
            {
                "op": "attached",
                "head": head,
                "replayed": subscription.replayed,
                "presence": presence,
                "connection_id": conn.id,
                "status": session.status,
                "controller": session.controller,
            }
        )
        self.live = True
        self.live_ready()  # whatever arrived during the replay

    async def op_publish(self, content: dict[str, Any]) -> None:
        assert self.principal is not None
        ref = content.get("ref")
        if not self.principal.can(et.CAP_PUBLISH, self.session_id):
            raise AuthError("This credential cannot publish.", forbidden=True)
        if "events" in content:
            batch = True
            items = parse_event_batch({"events": content["events"]})
        elif "event" in content:
            batch = False
            items = parse_event_batch(content["event"])
        else:
            raise BatonError("bad_frame", "publish needs 'event' or 'events'.")
        # Pipelined: queue the append now and read the next frame while it commits, so one
        # fast stream shares commits with itself; acks still go out in publish order.
        if self.inflight is None or self.pending_acks is None:
            self.inflight = asyncio.Semaphore(MAX_PIPELINED_PUBLISHES)
            self.pending_acks = deque()
        await self.inflight.acquire()
        future = get_hub().writer.submit(
            session_id=self.session_id, author=self.principal.author, events=items
        )
        self.pending_acks.append((ref, batch, future))
        future.add_done_callback(self.acks_ready)

    def acks_ready(self, _committed: object = None) -> None:
        """Send the acks whose commits have landed, in publish order, right here when the
        server's send completes at once (the usual case); a send that waits is finished by a
        task, which then carries on with the rest, so no ack overtakes another however the
        server's send queues. A publisher whose acks are not read stops being read itself:
        its pipeline slots come back only as its acks go out."""
        if self.ack_sender is not None or self.torn_down or not self.pending_acks:
            return
        for frame in self.ready_acks():
            started = self.send_now(frame)
            if started is not None:
                self.ack_sender = asyncio.get_running_loop().create_task(self.send_acks(started))
                return

    async def send_acks(self, started: Awaitable[None]) -> None:
        try:
            await started
            for frame in self.ready_acks():
                await self.send_text(frame)
        except asyncio.CancelledError:
            raise
        except OSError:
            log.debug("client of %s went away before its acks", self.session_id)
            return
        except Exception:
            log.exception("acks to %s failed", self.session_id)
            return
        finally:
            if self.ack_sender is asyncio.current_task():
                self.ack_sender = None
        self.acks_ready()  # commits that landed while this task held the acks

    def ready_acks(self) -> Iterator[str]:
        """The frames of the acks whose commits have landed, in publish order, each taken off
        the queue as it is asked for."""
        pending = self.pending_acks
        while pending and pending[0][2].done():
            frame = self.ack_frame(*pending.popleft())
            if frame is not None:
                yield frame

    def ack_frame(
        self, ref: Any, batch: bool, future: asyncio.Future[list[AppendResult]]
    ) -> str | None:
        """The ack (or error) frame of one committed publish; None if it was cancelled (the
        server is stopping)."""
        assert self.inflight is not None
        self.inflight.release()
        if future.cancelled():
            return None
        exc = future.exception()
        if isinstance(exc, BatonError):
            return error_frame(exc.code, exc.message, ref)
        if exc is not None:  # the transaction failed as a whole: nothing of it is stored
            log.warning("publish to %s failed", self.session_id, exc_info=exc)
            return error_frame("unavailable", "The database did not take the publish.", ref)
        results = future.result()
        if batch:
            content = {
                "op": "ack",
                "ref": ref,
                "seqs": [r.seq for r in results],
                "events": [r.as_dict() for r in results],
            }
        else:
            content = {"op": "ack", "ref": ref, **results[0].as_dict()}
        return wire_json(content)

    async def op_received(self, content: dict[str, Any]) -> None:
        seq = content.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise BatonError("bad_frame", "'received' needs a non-negative integer 'seq'.")
        self.received_seq = max(seq, self.received_seq or 0)
        if time.monotonic() - self.flushed_at >= POSITION_FLUSH_SECONDS:
            await self.flush_position()

    async def op_typing(self, content: dict[str, Any]) -> None:
        assert self.principal is not None
        if not self.principal.can(et.CAP_PUBLISH, self.session_id):
            raise AuthError("This credential cannot publish.", forbidden=True)
        if self.subscription is None:
            raise BatonError("not_attached", "Attach before sending typing indicators.")
        self.subscription.hub.publish_ephemeral(
            self.session_id,
            {
                "op": "ephemeral",
                "type": "typing",
                "author": self.principal.author.as_dict(),
                "state": bool(content.get("state", True)),
            },
            exclude=self.subscription,
        )

    async def op_ping(self, content: dict[str, Any]) -> None:
        await self.send_json({"op": "pong"})

    handlers = {
        "attach": op_attach,
        "publish": op_publish,
        "received": op_received,
        "typing": op_typing,
        "ping": op_ping,
    }

    # ------------------------------------------------------------------ frames out

    def live_ready(self) -> None:
        """The subscription has something pending: send it now, or start a sender task.

        The usual case, live events that follow the position with nothing else pending, is sent
        right here, inside the feed's fan-out: the server's send almost always completes without
        waiting, and a task per subscriber per batch was a large share of the loop's work. A
        send that does wait (back-pressure), or anything else pending, goes to a sender task;
        one exists only while there is something to send, so an idle socket holds no task.
        """
        if not self.live or self.sender is not None or self.torn_down:
            return
        assert self.subscription is not None
        started: Awaitable[None] | None = None
        events = self.subscription.take_ready()
        if events is not None:
            if not events:
                return
            started = self.send_now(events_frame(events))
            if started is None:
                return
        self.sender = asyncio.get_running_loop().create_task(self.send_live(started))

    def send_now(self, text: str) -> Awaitable[None] | None:
        """Start sending a frame here, outside any task: None if the server's send completed at
        once, else an awaitable that finishes it (or raises its failure) in a task."""
        send = self.base_send({"type": "websocket.send", "text": text})
        if not isinstance(send, Coroutine):  # an awaitable of another kind: await it there
            return send
        try:
            waiting_on = send.send(None)
        except StopIteration:
            return None
        except Exception as exc:  # the send failed at once: the task says how
            return _raise(exc)
        return _finish(send, waiting_on)

    async def send_live(self, started: Awaitable[None] | None = None) -> None:
        """Send what is pending until nothing is, after finishing `started` (a send begun by
        `live_ready` that has to wait, or its failure)."""
        assert self.subscription is not None
        subscription = self.subscription
        try:
            if started is not None:
                await started
            while subscription.has_pending():
                events, ephemeral = await subscription.take_live()
                if events:
                    await self.send_text(events_frame(events))
                for payload in ephemeral:
                    await self.send_json(payload)
        except SlowConsumer:
            await self.send_error("too_slow", "Too far behind; reconnect with 'after'.")
            await self.close(code=CLOSE_TOO_SLOW)
        except asyncio.CancelledError:
            raise
        except OSError:
            log.debug("client of %s went away during a send", self.session_id)
        except Exception:
            log.exception("live sender failed for %s", self.session_id)
            await self.close(code=1011)
        finally:
            if self.sender is asyncio.current_task():
                self.sender = None

    async def send_text(self, text: str) -> None:
        """Straight to the server's send: Channels' generic `send` adds two layers per frame."""
        await self.base_send({"type": "websocket.send", "text": text})

    async def send_json(self, content: Any, close: bool = False) -> None:
        await self.send_text(wire_json(content))
        if close:
            await self.close()

    async def send_error(self, code: str, message: str, ref: Any = None) -> None:
        await self.send_text(error_frame(code, message, ref))

    async def fail(self, exc: BatonError, close_code: int) -> None:
        """Say why in an error frame, then close with the protocol's code."""
        self.closing = True
        await self.send_error(exc.code, exc.message)
        await self.close(code=close_code)

    # ------------------------------------------------------------------ teardown

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch closes stale database connections before every frame, a thread
        hop per publish; our database work runs in `database_sync_to_async`, which does it."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Read frames in a plain loop and tear down however the socket ends.

        Channels' loop (`await_many_dispatch`) exists to multiplex a per-socket channel-layer
        channel, which this consumer does not have (the hub fans out); for one source it costs
        a task and an `asyncio.wait` per frame and a task per idle socket.

        Teardown runs even when the consumer dies without a `websocket.disconnect`: a client
        that drops while the server is still sending (e.g. during the attach) makes that send
        raise; uvicorn swallows the error silently and never delivers a disconnect, which would
        leave the connection open in the database — a ghost member for as long as this worker
        lives. Such a death is a lost connection (1006).
        """
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            await self.disconnect(1006)

    async def disconnect(self, code: int) -> None:
        if getattr(self, "torn_down", True):  # never connected, or already torn down
            return
        self.torn_down = True
        if self.ack_sender is not None:
            self.ack_sender.cancel()  # the appends still commit; only their acks have nowhere to go
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        if self.subscription is not None:
            self.subscription.close()
        if self.connection_id is not None:
            reason = et.LEAVE_CLOSED if code in CLEAN_CLOSE_CODES else et.LEAVE_LOST
            await self.flush_position()
            await database_sync_to_async(close_connection)(
                connection_id=self.connection_id, code=code, reason=reason
            )

    async def flush_position(self) -> None:
        if self.connection_id is None or self.received_seq is None:
            return
        if self.received_seq == self.flushed_seq:
            return
        self.flushed_seq = self.received_seq
        self.flushed_at = time.monotonic()
        await database_sync_to_async(record_delivery_position)(
            connection_id=self.connection_id, seq=self.received_seq
        )


def error_frame(code: str, message: str, ref: Any = None) -> str:
    frame: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return wire_json(frame)


@types.coroutine
def _finish(send: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, None]:
    """Finish, inside the task that awaits this, a coroutine that already ran its first step
    and is waiting on `waiting_on`: what it waits on, and what wakes or cancels it, pass
    through unchanged."""
    while True:
        try:
            value = yield waiting_on
        except BaseException as exc:
            try:
                waiting_on = send.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting_on = send.send(value)
            except StopIteration:
                return


async def _raise(exc: Exception) -> None:
    raise exc
