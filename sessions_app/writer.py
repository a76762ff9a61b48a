"""Group commit for the streaming path.

Publishes from this process's WebSockets queue here and are written together by `append_many`:
one transaction per batch; messages opened, streamed and completed, and plain events, share a
few raw statements, anything else (and a run that meets a refusal) goes publish by publish in
savepoints, so one refused publish never fails its neighbours. The batch is ordered by session
id (stable), so two processes' batches always take session row locks in the same order and
cannot deadlock. A caller's ack waits for the commit, so the delivery guarantee is unchanged:
nothing is acknowledged or broadcast before it is durable.

On the embedded SQLite default, what the fast lane takes of a batch commits on the event loop
itself, on a connection of the writer's own (`LoopLane`): no thread hop and no GIL ping-pong with
the loop. The rest of each session's requests (a `message.update`, a status change, …), and a
batch the lane cannot take at all, go to `append_many` in Django's database thread afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.backends.sqlite3.base import SQLiteCursorWrapper

from sessions_app.identity import Author
from sessions_app.services import (
    AppendRequest,
    AppendResult,
    EventInput,
    FastBatch,
    append_many,
    append_many_fast,
    checkpoint_sqlite_wal,
    open_sqlite_side_connection,
)

log = logging.getLogger(__name__)
Publish = Callable[[str, list[dict[str, Any]]], None]

MAX_REQUESTS_PER_BATCH = 500


class BatchSizer:
    """How many publishes a lingering batch waits for: few while the process has CPU to spare,
    more while it nears the one core a Python process can use.

    Why: every batch costs a commit, and every session in it one frame per subscriber; batches
    of a fixed small size keep latency low at moderate load but spend the CPU that a saturated
    process lacks. Side runs with 10 subscribers per session (embedded): at S=64 a fixed 24 used
    1.0 core with p99 257-310 ms, adaptive 0.83 core with p99 161-165 ms; at S=32 both 0.87
    core, p99 36-38 ms (batches bounded only by the window: 0.5 core but p99 80 ms). So the size
    starts at the base, doubles while the process's CPU over the last interval is at or above
    `high` of a core, and halves back at or below `low` (once per interval that passed, so a
    quiet spell returns it to the base); the window still bounds what a batch adds to latency.
    """

    def __init__(
        self,
        *,
        interval: float = 0.5,
        high: float = 0.95,
        low: float = 0.6,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.doublings = 0
        self.interval, self.high, self.low = interval, high, low
        self.clock, self.cpu = clock, cpu
        self.marked_at, self.cpu_at = clock(), cpu()

    def current(self, *, base: int, ceiling: int) -> int:
        """The size for the next batch; re-read the CPU once an interval has passed."""
        base = max(1, base)
        now = self.clock()
        elapsed = now - self.marked_at
        if elapsed >= self.interval and elapsed > 0:
            spent = self.cpu()
            busy = (spent - self.cpu_at) / elapsed
            self.marked_at, self.cpu_at = now, spent
            if busy >= self.high and base << self.doublings < ceiling:
                self.doublings += 1
            elif busy <= self.low:
                # One halving per interval that passed: after a quiet spell, back to the base.
                self.doublings = max(0, self.doublings - int(elapsed // self.interval))
        return max(base, min(base << self.doublings, ceiling))


@dataclass(slots=True)
class _Pending:
    request: AppendRequest
    future: asyncio.Future[list[AppendResult]] = field(repr=False)
    queued_at: float = 0.0


class LoopLane:
    """Commits fast-lane batches on the event loop, on a SQLite connection of the writer's own.

    Why: a batch of ~20 token appends costs ~5 ms of CPU, but handed to the database thread it
    took ~16 ms as seen from the loop (the thread waits for the GIL at each statement while the
    loop delivers). Side runs at half the knee (S=16, after `gc.freeze()`): p99 publish→deliver
    47-50 ms and 0.53 server cores through the thread, 39-44 ms and 0.44 cores on the lane.

    Two rules keep the loop from ever waiting on the disk or a lock: `BEGIN IMMEDIATE` with a
    zero busy timeout, so a write lock held by another connection sends the batch to the thread
    path instead; and no checkpoint on this connection (`wal_autocheckpoint = 0`): the writer
    asks the database thread for a passive checkpoint instead, at most every
    CHECKPOINT_SECONDS. Requests the fast lane does not take are left for `append_many` (after
    this commit, so each session keeps its order); a refusal inside the fast run rolls the whole
    batch back untouched and hands it to `append_many`, whose answer is the precise one.
    """

    CHECKPOINT_SECONDS = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        self.loop = loop
        self.conn = conn
        self.conn.isolation_level = None  # explicit BEGIN/COMMIT below
        self.conn.execute("PRAGMA busy_timeout = 0")
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.checkpointed_at = loop.time()
        self.checkpoint_task: asyncio.Task[None] | None = None
        self.stats = {"batches": 0, "busy": 0, "handed_over": 0, "left": 0, "checkpoints": 0}

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop) -> LoopLane | None:
        """The lane if the database is a SQLite file in WAL mode and the setting allows it."""
        if not settings.BATON_SQLITE_LOOP_WRITES:
            return None
        try:
            conn = await database_sync_to_async(open_sqlite_side_connection)()
        except Exception:
            log.warning("no loop lane for the writer; batches take the thread", exc_info=True)
            return None
        return cls(loop, conn) if conn is not None else None

    def write(self, requests: Sequence[AppendRequest], publish: Publish) -> FastBatch | None:
        """Commit what the fast lane takes of the batch here and fan it out; None (nothing
        written) when the whole batch must take the thread path."""
        cursor = self.conn.cursor(factory=SQLiteCursorWrapper)
        try:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # another connection holds the write lock
                self.stats["busy"] += 1
                return None
            try:
                written = append_many_fast(requests=requests, cursor=cursor)
                cursor.execute("COMMIT")
            except Exception:
                with contextlib.suppress(sqlite3.Error):
                    cursor.execute("ROLLBACK")
                self.stats["handed_over"] += 1
                return None
        finally:
            cursor.close()
        self.stats["batches"] += 1
        self.stats["left"] += len(written.left)
        for session_id, events in written.wires.items():
            publish(session_id, events)
        self._maybe_checkpoint()
        return written

    def _maybe_checkpoint(self) -> None:
        if self.loop.time() - self.checkpointed_at < self.CHECKPOINT_SECONDS:
            return
        if self.checkpoint_task is not None and not self.checkpoint_task.done():
            return
        self.checkpointed_at = self.loop.time()
        self.checkpoint_task = self.loop.create_task(
            self._checkpoint(), context=contextvars.Context()
        )

    async def _checkpoint(self) -> None:
        try:
            await database_sync_to_async(checkpoint_sqlite_wal)()
            self.stats["checkpoints"] += 1
        except Exception:  # the next one retries; the WAL only grows meanwhile
            log.warning("WAL checkpoint failed", exc_info=True)

    async def close(self) -> None:
        if self.checkpoint_task is not None:
            await asyncio.gather(self.checkpoint_task, return_exceptions=True)
        self.conn.close()


def _resolve(
    future: asyncio.Future[list[AppendResult]], outcome: list[AppendResult] | Exception
) -> None:
    if future.done():  # the publisher went away
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class EventWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish) -> None:
        self.loop = loop
        self.publish = publish
        self.lane: LoopLane | None = None
        self.lane_checked = False
        self.queue: deque[_Pending] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last_batch_size = 0
        self.filled: asyncio.Future[None] | None = None  # resolved once a lingering batch is full
        self.sizer = BatchSizer()
        self.batch_size = settings.BATON_GROUP_COMMIT_BATCH
        self.stats = {"batches": 0, "requests": 0}

    def submit(
        self, *, session_id: str, author: Author, events: Sequence[EventInput]
    ) -> asyncio.Future[list[AppendResult]]:
        """Queue an append now (so a connection's publishes keep their order) and return the
        future of its results, resolved once its batch has committed."""
        future: asyncio.Future[list[AppendResult]] = self.loop.create_future()
        self.queue.append(
            _Pending(
                AppendRequest(session_id=session_id, author=author, events=events),
                future,
                self.loop.time(),
            )
        )
        self.wake.set()
        filled = self.filled
        if filled is not None and not filled.done() and len(self.queue) >= self.batch_size:
            filled.set_result(None)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run(), context=contextvars.Context())
        return future

    async def append(
        self, *, session_id: str, author: Author, events: Sequence[EventInput]
    ) -> list[AppendResult]:
        return await self.submit(session_id=session_id, author=author, events=events)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.queue:
                continue
            if self.last_batch_size > 1:
                self.batch_size = self.sizer.current(
                    base=settings.BATON_GROUP_COMMIT_BATCH,
                    ceiling=settings.BATON_GROUP_COMMIT_BATCH_MAX,
                )
                await self._linger()
            batch: list[_Pending] = []
            while self.queue and len(batch) < MAX_REQUESTS_PER_BATCH:
                pending = self.queue.popleft()
                if not pending.future.cancelled():
                    batch.append(pending)
            if self.queue:
                self.wake.set()
            if not batch:
                continue
            self.last_batch_size = len(batch)
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            requests = [p.request for p in batch]
            if not self.lane_checked:
                self.lane = await LoopLane.open(self.loop)
                self.lane_checked = True
            if self.lane is not None:
                written = self.lane.write(requests, self.publish)
                if written is not None:
                    for i, results in written.results.items():
                        _resolve(batch[i].future, results)
                    batch = [batch[i] for i in written.left]
                    requests = [requests[i] for i in written.left]
                    if not batch:
                        continue
            try:
                outcomes = await database_sync_to_async(append_many)(requests)
            except Exception as exc:  # the whole transaction failed (database down, …)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, outcome in zip(batch, outcomes, strict=True):
                _resolve(pending.future, outcome)

    async def _linger(self) -> None:
        """Under concurrent load, hold the batch while publishes keep arriving, until it is full
        or its oldest request has waited the window: commits per token fall as load rises.

        A lull of a quarter window ends the wait early, so publishers that send one frame and
        wait for its ack (nothing more can arrive) are not held the whole window; a lone
        writer (last batch of one) never lingers.
        """
        window = settings.BATON_GROUP_COMMIT_WINDOW
        lull = window / 4
        while window > 0 and len(self.queue) < self.batch_size:
            remaining = self.queue[0].queued_at + window - self.loop.time()
            if remaining <= 0:
                return
            queued = len(self.queue)
            self.filled = self.loop.create_future()
            try:
                await asyncio.wait((self.filled,), timeout=min(lull, remaining))
            finally:
                self.filled = None
            if len(self.queue) == queued:
                return

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for pending in self.queue:
            if not pending.future.done():
                pending.future.cancel()
        self.queue.clear()
        if self.lane is not None:
            lane, self.lane = self.lane, None
            await lane.close()
