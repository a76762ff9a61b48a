"""A subscription: history then live, each visible event exactly once, in order, no gap.

Shared by the WebSocket consumer and the SSE endpoint. The order of operations is what makes
the guarantee: join the hub's feed first, then read the head and replay (after, head] from the
database, then serve live events, dropping any at or below the position already sent and
back-filling from the database if a hole ever shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from sessions_app import event_types as et
from sessions_app.errors import BatonError
from sessions_app.hub import Hub, WireEvent, get_hub
from sessions_app.selectors import (
    get_compacted_snapshot,
    get_message_snapshot,
    get_positions,
    list_event_json,
    list_wire_events,
    type_matcher,
)
from sessions_app.wire import message_to_wire


class SlowConsumer(Exception):
    """The connection fell more than the buffer limit behind; it should resume with `after`."""


def events_frame(events: Sequence[WireEvent]) -> str:
    """One `events` frame from pre-encoded events: no per-connection JSON encoding."""
    return '{"op":"events","events":[' + ",".join(e.json for e in events) + "]}"


def compacted_snapshot_frame(through: int, messages: Sequence[Any]) -> dict[str, Any]:
    return {
        "op": "snapshot",
        "seq": through,
        "compacted": True,
        "messages": [message_to_wire(m) for m in messages],
    }


class Subscription:
    # Slots: one per connected socket, so its size is per-socket memory.
    __slots__ = (
        "after",
        "buffer",
        "ephemeral",
        "head",
        "hub",
        "include_private",
        "joined",
        "matches",
        "max_buffer",
        "on_ready",
        "overflowed",
        "position",
        "replayed",
        "session_id",
        "snapshot",
        "types",
        "wake",
    )

    def __init__(
        self,
        *,
        session_id: str,
        after: int,
        types: Sequence[str] | None,
        include_private: bool,
        max_buffer: int | None = None,
        hub: Hub | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.after = after
        self.types = types
        self.include_private = include_private
        self.matches = type_matcher(types)
        self.max_buffer = max_buffer or settings.BATON_MAX_BUFFERED_EVENTS
        self.hub = hub or get_hub()
        self.position = after  # highest seq already handled (sent or filtered out)
        self.head = after
        self.buffer: list[WireEvent] = []
        self.ephemeral: list[dict[str, Any]] = []
        # Who hears that something is pending: a callback (the WebSocket starts a sender task
        # only then, so an idle socket holds no task), or else an Event for `next_live` (SSE).
        self.on_ready = on_ready
        self.wake: asyncio.Event | None = None if on_ready is not None else asyncio.Event()
        self.overflowed = False
        self.joined = False
        self.replayed = 0
        self.snapshot: dict[str, Any] | None = None

    # -- called by the hub's feed, on the event loop
    def push(self, events: list[WireEvent]) -> None:
        if self.overflowed:
            return
        self.buffer.extend(events)
        if len(self.buffer) > self.max_buffer:
            self.overflowed = True
            self.buffer.clear()
        self._ready()

    def push_ephemeral(self, payload: dict[str, Any]) -> None:
        if len(self.ephemeral) < 1000:
            self.ephemeral.append(payload)
            self._ready()

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
        elif self.wake is not None:
            self.wake.set()

    def has_pending(self) -> bool:
        return self.overflowed or bool(self.buffer) or bool(self.ephemeral)

    def visible(self, event: WireEvent) -> bool:
        if not self.include_private and event.visibility != et.VISIBILITY_ALL:
            return False
        return self.matches is None or self.matches(event.type)

    async def open(self, *, snapshot: bool = False) -> int:
        """Join the feed, then fix the head. Raises `bad_after` if `after` is past the head."""
        await self.hub.subscribe(self.session_id, self)
        self.joined = True
        try:
            if snapshot:
                seq, messages = await database_sync_to_async(get_message_snapshot)(
                    session_id=self.session_id
                )
                self.snapshot = {
                    "op": "snapshot",
                    "seq": seq,
                    "messages": [message_to_wire(m) for m in messages],
                }
                head = seq
            else:
                positions = await database_sync_to_async(get_positions)(self.session_id)
                if positions is None:
                    raise BatonError("not_found", "No such session.", 404)
                head, compacted = positions
                if 0 < self.after < compacted <= head:
                    # Tokens inside a compacted range are gone: start from the messages as of
                    # the end of that range instead, then go on after it.
                    messages = await database_sync_to_async(get_compacted_snapshot)(
                        session_id=self.session_id, through=compacted
                    )
                    self.snapshot = compacted_snapshot_frame(compacted, messages)
                    self.position = compacted
            if self.after > head:
                raise BatonError(
                    "bad_after", f"'after' is {self.after} but the session head is {head}.", 400
                )
        except BaseException:
            self.close()
            raise
        self.head = head
        if snapshot:
            self.position = max(self.position, head)
        return head

    async def history(self) -> AsyncIterator[list[WireEvent]]:
        """Pages of (position, head] from the database, each event's JSON built by the database.

        The next page is read (on the DB thread) while the caller sends this one.
        """
        page = settings.BATON_REPLAY_PAGE
        read = database_sync_to_async(list_event_json)

        def fetch(after: int) -> asyncio.Future[list[tuple[int, str, str, str]]]:
            return asyncio.ensure_future(
                read(
                    session_id=self.session_id,
                    after=after,
                    upto=self.head,
                    limit=page,
                    types=self.types,
                    include_private=self.include_private,
                )
            )

        pending = fetch(self.position) if self.position < self.head else None
        try:
            while pending is not None:
                rows = await pending
                pending = None
                if len(rows) < page:
                    self.position = self.head
                else:
                    self.position = rows[-1][0]
                    if self.position < self.head:
                        pending = fetch(self.position)
                if rows:
                    batch = [WireEvent(*row) for row in rows]
                    self.replayed += len(batch)
                    yield batch
        finally:
            if pending is not None and not pending.cancel():
                with contextlib.suppress(BaseException):
                    pending.exception()  # read ahead for a caller that left: an error is moot

    async def next_live(self) -> tuple[list[WireEvent], list[dict[str, Any]]]:
        """Wait for live events; returns (visible events in order, ephemeral payloads)."""
        assert self.wake is not None, "a subscription with on_ready is drained with take_live"
        while not self.has_pending():
            self.wake.clear()
            await self.wake.wait()
        return await self.take_live()

    def take_ready(self) -> list[WireEvent] | None:
        """What `take_live` would return, taken without waiting: the visible events pending,
        when they follow the position without a hole and nothing else is pending; otherwise
        None, and nothing is taken (`take_live` then does the rest)."""
        if self.overflowed or self.ephemeral:
            return None
        position = self.position
        out: list[WireEvent] = []
        for event in self.buffer:
            if event.seq <= position:
                continue
            if event.seq > position + 1:
                return None
            position = event.seq
            if self.visible(event):
                out.append(event)
        self.buffer = []
        self.position = position
        return out

    async def take_live(self) -> tuple[list[WireEvent], list[dict[str, Any]]]:
        """What is pending now: (visible events in order, ephemeral payloads); may be empty."""
        if self.overflowed:
            raise SlowConsumer()
        ephemeral, self.ephemeral = self.ephemeral, []
        pending, self.buffer = self.buffer, []
        out: list[WireEvent] = []
        for event in pending:
            if event.seq <= self.position:
                continue
            if event.seq > self.position + 1:
                out.extend(await self._backfill(event.seq - 1))
            self.position = event.seq
            if self.visible(event):
                out.append(event)
        return out, ephemeral

    async def _backfill(self, upto: int) -> list[WireEvent]:
        """A safety net: the feed is contiguous, but never trust a hole to be harmless."""
        rows = await database_sync_to_async(list_wire_events)(
            session_id=self.session_id,
            after=self.position,
            upto=upto,
            limit=upto - self.position,
            types=self.types,
            include_private=self.include_private,
        )
        self.position = upto
        return [WireEvent.from_dict(r) for r in rows]

    def close(self) -> None:
        if self.joined:
            self.hub.unsubscribe(self.session_id, self)
            self.joined = False
