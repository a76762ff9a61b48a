"""Group commit for the streaming path.

Publishes from this process's WebSockets queue here and are written together by `append_many`:
one transaction per batch; token appends and plain events share a few raw statements, anything
else (and a run that meets a refusal) goes publish by publish in savepoints, so one refused
publish never fails its neighbours. The batch is ordered by session id (stable), so two
processes' batches always take session row locks in the same order and cannot deadlock. A
caller's ack waits for the commit, so the delivery guarantee is unchanged: nothing is
acknowledged or broadcast before it is durable.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from django.conf import settings

from sessions_app.identity import Author
from sessions_app.services import AppendRequest, AppendResult, EventInput, append_many

MAX_REQUESTS_PER_BATCH = 500


@dataclass(slots=True)
class _Pending:
    request: AppendRequest
    future: asyncio.Future[list[AppendResult]] = field(repr=False)
    queued_at: float = 0.0


class EventWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[_Pending] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last_batch_size = 0
        self.filled: asyncio.Future[None] | None = None  # resolved once a lingering batch is full
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
        if (
            filled is not None
            and not filled.done()
            and len(self.queue) >= settings.BATON_GROUP_COMMIT_BATCH
        ):
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
            try:
                outcomes = await database_sync_to_async(append_many)([p.request for p in batch])
            except Exception as exc:  # the whole transaction failed (database down, …)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    async def _linger(self) -> None:
        """Under concurrent load, hold the batch while publishes keep arriving, until it is full
        or its oldest request has waited the window: commits per token fall as load rises.

        A lull of a quarter window ends the wait early, so publishers that send one frame and
        wait for its ack (nothing more can arrive) are not held the whole window; a lone
        writer (last batch of one) never lingers.
        """
        window = settings.BATON_GROUP_COMMIT_WINDOW
        lull = window / 4
        while window > 0 and len(self.queue) < settings.BATON_GROUP_COMMIT_BATCH:
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
