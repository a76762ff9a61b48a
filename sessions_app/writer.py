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

With several workers (a remote channel layer), group commit spans them: every worker but the
committing one hands its publishes to that worker (`Forwarder`), whose batches then hold
everyone's. Each handed-over event carries an id chosen before it left, so a publish the
committing worker does not answer in time is committed here instead and can never be stored
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.backends.sqlite3.base import SQLiteCursorWrapper

from sessions_app.errors import BatonError
from sessions_app.hub import ANSWER_MESSAGE, FORWARD_MESSAGE, LAYER_CALL_TIMEOUT
from sessions_app.identity import Author
from sessions_app.ids import new_event_id
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
Send = Callable[[str, dict[str, Any]], Awaitable[None]]

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

    Between the two it does not simply hold: one busy spike under steady load could ratchet the
    size up for good, and every batch would wait the whole window (seen at S=64 for 16 s under
    py-spy: 1.78 events per frame, p99 97 ms). After `probe_after` calm intervals it tries half
    the size; if that is too small (the next interval is busy again) it doubles back and waits
    twice as long before the next try (up to `max_probe_after`), so a load that needs big
    batches is rarely disturbed. (A/B at S=64 for 16 s, two runs each, after the write path got
    cheaper: p99 44.7 / 28.3 ms holding, 42.9 / 22.8 ms probing; within the noise.)
    """

    def __init__(
        self,
        *,
        interval: float = 0.5,
        high: float = 0.95,
        low: float = 0.6,
        probe_after: int = 4,
        max_probe_after: int = 32,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.doublings = 0
        self.interval, self.high, self.low = interval, high, low
        self.clock, self.cpu = clock, cpu
        self.marked_at, self.cpu_at = clock(), cpu()
        self.min_probe_after, self.max_probe_after = probe_after, max_probe_after
        self.probe_after = probe_after  # calm intervals before trying half the size
        self.calm = 0  # calm intervals at the current size
        self.probing = False  # the last change was a try at half the size

    def current(self, *, base: int, ceiling: int) -> int:
        """The size for the next batch; re-read the CPU once an interval has passed."""
        base = max(1, base)
        now = self.clock()
        elapsed = now - self.marked_at
        if elapsed >= self.interval and elapsed > 0:
            spent = self.cpu()
            busy = (spent - self.cpu_at) / elapsed
            self.marked_at, self.cpu_at = now, spent
            if busy >= self.high:
                if self.probing:  # half was too small: back, and try again later
                    self.probe_after = min(self.probe_after * 2, self.max_probe_after)
                if base << self.doublings < ceiling:
                    self.doublings += 1
                self.calm, self.probing = 0, False
            elif busy <= self.low:
                # One halving per interval that passed: after a quiet spell, back to the base.
                self.doublings = max(0, self.doublings - int(elapsed // self.interval))
                self.calm, self.probing = 0, False
                self.probe_after = self.min_probe_after
            elif self.doublings:
                if self.probing:  # half held for an interval: keep it
                    self.probe_after, self.probing = self.min_probe_after, False
                self.calm += 1
                if self.calm >= self.probe_after:
                    self.doublings -= 1
                    self.calm, self.probing = 0, True
        return max(base, min(base << self.doublings, ceiling))


@dataclass(slots=True)
class _Pending:
    request: AppendRequest
    future: asyncio.Future[list[AppendResult]] = field(repr=False)
    queued_at: float = 0.0
    # The channel of the worker that handed this publish here to commit; None: our own.
    served_for: str | None = None


class LoopLane:
    """Commits fast-lane batches on the event loop, on a SQLite connection of the writer's own.

    Why: a batch of ~20 token appends costs ~5 ms of CPU, but handed to the database thread it
    took ~16 ms as seen from the loop (the thread waits for the GIL at each statement while the
    loop delivers). Side runs at half the knee (S=16, after `gc.freeze()`): p99 publish→deliver
    47-50 ms and 0.53 server cores through the thread, 39-44 ms and 0.44 cores on the lane.

    Two rules keep the loop from ever waiting on the disk or a lock: `BEGIN IMMEDIATE` with a
    zero busy timeout, so a write lock held by another connection sends the batch to the thread
    path instead; and no checkpoint on this connection (`wal_autocheckpoint = 0`): checkpoints
    run at most every CHECKPOINT_SECONDS in a thread of the lane's own, on a second connection
    (not in Django's database thread, where a 30-100 ms copy would hold up every read queued
    behind it, and where the lane would queue behind those reads).
    Requests the fast lane does not take are left for `append_many` (after this commit, so each
    session keeps its order); a refusal inside the fast run rolls the whole batch back untouched
    and hands it to `append_many`, whose answer is the precise one.

    The WAL must also start over now and then, or it grows for as long as writes keep coming:
    SQLite rewinds it only at a write that finds every frame copied back, and a checkpoint in
    another thread never finishes before the lane commits again (seen: 540 MB of WAL after 10 s
    at 4,800 tokens/s). So when a checkpoint finds more than REWIND_FRAMES in the WAL, a second
    pass copies what was committed during the first (a few commits) while the lane's next batch
    waits for it (`wait_for_checkpoint`); that batch's commit then rewinds the WAL, whose file
    is then written over from the start instead of growing. The wait (7-14 ms once a second at
    4,800 tokens/s, the first pass taking 29-58 ms) falls on one batch and is capped at
    FENCE_SECONDS (past it the batch commits and the rewind waits for the next checkpoint);
    doing that pass on this connection instead took 4-9 ms of the loop itself. The file is not
    trimmed at a rewind (`journal_size_limit`): truncating ~60 MB stalled that commit, on the
    loop, for 8-12 ms (36-48 ms with checkpoints 4 s apart).
    """

    CHECKPOINT_SECONDS = 1.0
    REWIND_FRAMES = 4096  # WAL frames (pages) past which a checkpoint makes sure it rewinds
    FENCE_SECONDS = 0.05  # the longest a batch waits for a checkpoint's second pass

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: sqlite3.Connection,
        checkpointer: sqlite3.Connection,
    ) -> None:
        self.loop = loop
        self.conn = conn
        self.conn.isolation_level = None  # explicit BEGIN/COMMIT below
        self.conn.execute("PRAGMA busy_timeout = 0")
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.checkpointer = checkpointer  # used only in `checkpoint_thread`
        self.checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="baton-checkpoint")
        self.checkpointed_at = loop.time()
        self.checkpoint_task: asyncio.Task[None] | None = None
        self.fence: asyncio.Future[None] | None = None  # set while the lane must wait
        self.stats = {
            "batches": 0,
            "busy": 0,
            "handed_over": 0,
            "left": 0,
            "checkpoints": 0,
            "rewinds": 0,
        }

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop) -> LoopLane | None:
        """The lane if the database is a SQLite file in WAL mode and the setting allows it."""
        if not settings.BATON_SQLITE_LOOP_WRITES:
            return None
        try:
            conn = await database_sync_to_async(open_sqlite_side_connection)()
            if conn is None:
                return None
            checkpointer = await database_sync_to_async(open_sqlite_side_connection)()
        except Exception:
            log.warning("no loop lane for the writer; batches take the thread", exc_info=True)
            return None
        if checkpointer is None:  # the database changed under us: no lane, nothing leaks
            conn.close()
            return None
        return cls(loop, conn, checkpointer)

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

    async def wait_for_checkpoint(self) -> None:
        """Hold the next batch while a checkpoint copies the last few commits back."""
        if self.fence is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.fence), self.FENCE_SECONDS)

    async def _checkpoint(self) -> None:
        def checkpoint() -> Awaitable[tuple[int, int]]:
            return self.loop.run_in_executor(
                self.checkpoint_thread, partial(checkpoint_sqlite_wal, conn=self.checkpointer)
            )

        try:
            frames, copied = await checkpoint()  # the bulk, while the lane writes on
            self.stats["checkpoints"] += 1
            if frames < self.REWIND_FRAMES:
                return
            self.fence = self.loop.create_future()
            try:
                frames, copied = await checkpoint()  # the rest, while the lane waits
            finally:
                self.fence.set_result(None)
                self.fence = None
            if frames == copied:
                self.stats["rewinds"] += 1
        except Exception:  # the next one retries; the WAL only grows meanwhile
            log.warning("WAL checkpoint failed", exc_info=True)

    async def close(self) -> None:
        if self.checkpoint_task is not None:
            await asyncio.gather(self.checkpoint_task, return_exceptions=True)
        self.checkpoint_thread.shutdown(wait=True)
        self.checkpointer.close()
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


class Forwarder:
    """Group commit across workers: hands this worker's publishes to the committing worker and
    serves the publishes other workers hand to this one.

    Why: group commit is per process, so N workers at R publishes/s each make N times the
    commits of one worker at N x R; with two workers streaming 500 tokens/s between them, each
    committed ~11 tokens per commit (the target is 20) while waiting the same window.

    The committing worker is the hub's choice (`get_committing_worker`, the oldest live worker),
    set here as `target`. Handed-over publishes keep their order (one ordered sender, and the
    committing worker queues them in arrival order); our own publishes never overtake ones in
    flight, nor go to another target while some are in flight. Each handed-over event carries
    an event id chosen here, so when no answer comes within BATON_FORWARD_TIMEOUT_SECONDS
    (the worker died, stalled, or the layer lost the message), every publish in flight is
    *reclaimed*: committed here, in order, where the primary key finds one the other worker
    committed after all (its original result is returned, nothing is stored twice). The target
    is then avoided for a worker timeout, and this worker commits its own meanwhile.
    """

    SEND_EVERY = 0.005  # at most one hand-over message per this many seconds
    RATE_INTERVAL = 1.0  # how often our own publish rate is re-read
    KEEP_AT, RESUME_BELOW = 0.6, 0.45  # of a base batch per window: see `_reread_rate`
    SLOW_ANSWER_WINDOWS = 4  # an answer later than this many windows: the committer is loaded
    AVOID_SECONDS = 2.0  # how long a loaded committer is left alone

    def __init__(self, writer: EventWriter, *, send: Send, origin: str) -> None:
        self.writer = writer
        self.loop = writer.loop
        self.send = send
        self.origin = origin
        self.reply_to: str | None = None  # this worker's channel, once the layer gave it
        self.target: str | None = None  # the committing worker's channel; None: commit here
        self.avoid_until = 0.0
        self.inflight: dict[int, tuple[float, _Pending]] = {}
        self.inflight_target: str | None = None
        self.drained = asyncio.Event()
        self.drained.set()
        self.next_id = 0
        self.sent_at = 0.0
        # Our own publishes counted since `counted_at`; `busy`: enough of them to fill batches
        # here on their own, so handing them over would save no commit.
        self.own = 0
        self.counted_at = self.loop.time()
        self.busy = False
        self.watchdog: asyncio.Task[None] | None = None
        self.answers: dict[str, list[list[Any]]] = {}
        self.served_workers: set[str] = set()  # told at shutdown to take their publishes back
        self.answer_tasks: set[asyncio.Task[None]] = set()
        self.stats = {"forwarded": 0, "answered": 0, "reclaimed": 0, "served": 0}

    def route(self) -> str | None:
        """Where our own publishes go now: the committing worker's channel, or None to commit
        them here (we are it, none is known, it failed us lately, or publishes are still in
        flight to a previous one)."""
        target = self.target
        now = self.loop.time()
        if now - self.counted_at >= self.RATE_INTERVAL:
            self._reread_rate(now)
        if target is None or self.reply_to is None or self.busy or now < self.avoid_until:
            return None
        if self.inflight and self.inflight_target != target:
            return None
        return target

    def _reread_rate(self, now: float) -> None:
        """Hand over only publishes that would commit in small batches here: at or above
        KEEP_AT of a base batch per window of our own (293/s at the defaults) we commit them
        ourselves, below RESUME_BELOW of it (220/s) we hand them over again. Handing over costs
        CPU (two more layer messages) and puts everyone's commits on one database thread: in
        side runs with two workers at 600/s each the p99 went from 58 to 62-176 ms, while the
        commits it saves matter most where batches are smallest."""
        window = settings.BATON_GROUP_COMMIT_WINDOW
        rate = self.own / (now - self.counted_at)
        self.own, self.counted_at = 0, now
        if window <= 0:  # no lingering, no group commit to share
            self.busy = True
            return
        fills = settings.BATON_GROUP_COMMIT_BATCH / window
        if rate >= self.KEEP_AT * fills:
            self.busy = True
        elif rate < self.RESUME_BELOW * fills:
            self.busy = False

    async def forward(self, target: str, pendings: list[_Pending]) -> None:
        """Hand these publishes (in order) to `target` in one layer message."""
        batch: list[list[Any]] = []
        sent_at = self.loop.time()
        for pending in pendings:
            request = pending.request
            if any(item.event_id is None for item in request.events):
                events = [
                    replace(item, event_id=item.event_id or new_event_id())
                    for item in request.events
                ]
                request = pending.request = replace(request, events=events)
            rid = self.next_id
            self.next_id += 1
            self.inflight[rid] = (sent_at, pending)
            author = request.author
            batch.append(
                [
                    rid,
                    request.session_id,
                    [author.kind, author.id, author.name],
                    [
                        [item.type, item.data, item.message_id, item.client_ref, item.event_id]
                        for item in request.events
                    ],
                ]
            )
        self.inflight_target = target
        self.drained.clear()
        self.stats["forwarded"] += len(batch)
        message = {"type": FORWARD_MESSAGE, "o": self.origin, "r": self.reply_to, "q": batch}
        try:
            await asyncio.wait_for(self.send(target, message), LAYER_CALL_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not hand publishes to the committing worker", exc_info=True)
            self.reclaim()
            return
        if self.watchdog is None or self.watchdog.done():
            self.watchdog = self.loop.create_task(self._watch(), context=contextvars.Context())

    def on_answers(self, message: dict[str, Any]) -> None:
        """The committing worker's answers: resolve what is still ours to resolve (a reclaimed
        publish's late answer is dropped; its local commit answers it)."""
        now = self.loop.time()
        slow = now - self.SLOW_ANSWER_WINDOWS * settings.BATON_GROUP_COMMIT_WINDOW
        for rid, results, code, text, status in message.get("a") or []:
            entry = self.inflight.pop(rid, None)
            if entry is None:
                continue
            self.stats["answered"] += 1
            if entry[0] < slow:  # the committing worker lags: commit our own for a while
                self.avoid_until = max(self.avoid_until, now + self.AVOID_SECONDS)
            future = entry[1].future
            if code is not None:
                _resolve(future, BatonError(code, text, status))
            else:
                _resolve(future, [AppendResult(*result) for result in results])
        if not self.inflight:
            self.drained.set()
        if message.get("gone") and self.inflight_target is not None:
            # The committing worker is shutting down: take back at once what it may not commit
            # (committing it twice is harmless, waiting out the timeout is not).
            self.reclaim()

    def reclaim(self) -> None:
        """Take back every publish in flight, to commit here ahead of anything newer."""
        if not self.inflight:
            return
        pendings = [pending for _, pending in self.inflight.values()]
        self.inflight.clear()
        self.drained.set()
        self.avoid_until = self.loop.time() + settings.BATON_WORKER_TIMEOUT_SECONDS
        self.stats["reclaimed"] += len(pendings)
        self.writer.queue.extendleft(reversed(pendings))
        self.writer.wake.set()

    async def _watch(self) -> None:
        timeout = settings.BATON_FORWARD_TIMEOUT_SECONDS
        while self.inflight:
            oldest = next(iter(self.inflight.values()))[0]
            delay = oldest + timeout - self.loop.time()
            if delay <= 0:
                log.warning(
                    "the committing worker did not answer %d publishes in %.1f s; "
                    "committing them here",
                    len(self.inflight),
                    timeout,
                )
                self.reclaim()
                return
            await asyncio.sleep(delay)

    def serve(self, message: dict[str, Any]) -> None:
        """Queue publishes another worker handed here, to commit with our own."""
        reply_to = message.get("r")
        if not isinstance(reply_to, str):
            return
        self.served_workers.add(reply_to)
        for rid, session_id, (kind, author_id, name), items in message.get("q") or []:
            events = [
                EventInput(type=t, data=d, message_id=m, client_ref=c, event_id=e)
                for t, d, m, c, e in items
            ]
            request = AppendRequest(
                session_id=session_id, author=Author(kind, author_id, name), events=events
            )
            future = self.writer.enqueue(request, served_for=reply_to)
            future.add_done_callback(lambda done, rid=rid: self._answer(reply_to, rid, done))
            self.stats["served"] += 1

    def _answer(self, reply_to: str, rid: int, future: asyncio.Future[list[AppendResult]]) -> None:
        if future.cancelled():  # shutting down mid-batch: the sender reclaims it
            return
        exc = future.exception()
        if isinstance(exc, BatonError):
            answer = [rid, None, exc.code, exc.message, exc.status]
        elif exc is not None:  # the transaction failed as a whole: nothing of it is stored
            answer = [rid, None, "unavailable", "The database did not take the publish.", 503]
        else:
            results = [[r.seq, r.id, r.message_id, r.duplicate] for r in future.result()]
            answer = [rid, results, None, None, None]
        queued = self.answers.setdefault(reply_to, [])
        queued.append(answer)
        if len(queued) == 1:  # the first answer for this worker since the last send
            task = self.loop.create_task(
                self._send_answers(reply_to), context=contextvars.Context()
            )
            self.answer_tasks.add(task)
            task.add_done_callback(self.answer_tasks.discard)

    async def _send_answers(self, reply_to: str) -> None:
        answers = self.answers.pop(reply_to, [])
        if not answers:
            return
        try:
            await asyncio.wait_for(
                self.send(reply_to, {"type": ANSWER_MESSAGE, "o": self.origin, "a": answers}),
                LAYER_CALL_TIMEOUT,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # the other worker reclaims them when its wait runs out
            log.warning("could not answer handed-over publishes", exc_info=True)

    async def close(self) -> None:
        """Stop; tell the workers we served to take back what they handed us, so a rolling
        restart of the committing worker costs them no timeout."""
        for task in [self.watchdog, *self.answer_tasks]:
            if task is not None:
                task.cancel()
        gone = {"type": ANSWER_MESSAGE, "o": self.origin, "a": [], "gone": True}
        for channel in self.served_workers:
            try:
                await asyncio.wait_for(self.send(channel, gone), 1.0)
            except Exception:  # they reclaim after their timeout instead
                log.warning("could not tell a worker that this one stops", exc_info=True)
        self.served_workers.clear()
        for _, pending in self.inflight.values():
            pending.future.cancel()
        self.inflight.clear()
        self.drained.set()


class EventWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish) -> None:
        self.loop = loop
        self.publish = publish
        self.forwarder: Forwarder | None = None  # set by the hub when there are other workers
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
        return self.enqueue(AppendRequest(session_id=session_id, author=author, events=events))

    def enqueue(
        self, request: AppendRequest, *, served_for: str | None = None
    ) -> asyncio.Future[list[AppendResult]]:
        future: asyncio.Future[list[AppendResult]] = self.loop.create_future()
        if served_for is None and self.forwarder is not None:
            self.forwarder.own += 1
        self.queue.append(_Pending(request, future, self.loop.time(), served_for))
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
            forwarder = self.forwarder
            if forwarder is not None:
                target = forwarder.route()
                if target is not None:
                    await self._hand_over(forwarder, target)
                    if not self.queue:
                        continue
                elif forwarder.inflight and any(p.served_for is None for p in self.queue):
                    # Our own must not overtake those in flight: wait for their answers (or
                    # for them to be reclaimed, to the front of the queue).
                    await forwarder.drained.wait()
            if self.last_batch_size > 1:
                self.batch_size = self.sizer.current(
                    base=settings.BATON_GROUP_COMMIT_BATCH,
                    ceiling=settings.BATON_GROUP_COMMIT_BATCH_MAX,
                )
                await self._linger()
            batch: list[_Pending] = []
            # Our own publishes that arrived while others were being handed over wait for the
            # next hand-over (or for those in flight to be answered or reclaimed).
            hold_own = forwarder is not None and bool(forwarder.inflight)
            held: list[_Pending] = []
            while self.queue and len(batch) < MAX_REQUESTS_PER_BATCH:
                pending = self.queue.popleft()
                if pending.future.cancelled():
                    continue
                if hold_own and pending.served_for is None:
                    held.append(pending)
                else:
                    batch.append(pending)
            self.queue.extendleft(reversed(held))
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
                await self.lane.wait_for_checkpoint()
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

    async def _hand_over(self, forwarder: Forwarder, target: str) -> None:
        """Forward our own queued publishes; those served for other workers stay to commit."""
        wait = forwarder.sent_at + Forwarder.SEND_EVERY - self.loop.time()
        if wait > 0:  # let a few gather: each layer message costs both workers CPU
            await asyncio.sleep(wait)
        forwarder.sent_at = self.loop.time()
        own = [p for p in self.queue if p.served_for is None and not p.future.cancelled()]
        self.queue = deque(p for p in self.queue if p.served_for is not None)
        if own:
            await forwarder.forward(target, own)

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
        if self.forwarder is not None:
            await self.forwarder.close()
        for pending in self.queue:
            if not pending.future.done():
                pending.future.cancel()
        self.queue.clear()
        if self.lane is not None:
            lane, self.lane = self.lane, None
            await lane.close()
