"""Streaming one assistant message token by token, with coalescing and cancellation.

Rules (the documented contract of `MessageStream`):

* Entering the block publishes `message.create` (status `streaming`) and waits for its ack, so
  a refusal (`ControlledByHuman`, `SessionClosed`) raises before any token is produced.
* `append()` only buffers. One flusher publishes the buffer as a single `message.append` once
  the coalescing window (default 25 ms) after the first buffered token has passed, and never has
  more than one append in flight: tokens that arrive while an append waits for its ack join the
  next one. Slow servers therefore mean fewer, larger appends, never reordering.
* `update(content)` flushes what is buffered, then publishes `message.update` (same id).
* Cancel: a `signal.cancel` naming this message (or naming none) sets `cancelled`. Text already
  buffered is still flushed; every later `append()` raises `MessageCancelled`, which the `async
  with` swallows, and the message completes with status `cancelled`.
* Leaving the block normally completes with `complete`; an exception completes with `failed`
  (reason = the exception; `cancelled` if a cancel had arrived) and propagates. If the server
  refuses us (operator took over, session closed, credential rejected) nothing more is sent
  and the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any

from baton_client.errors import (
    ConnectionRejected,
    ControlledByHuman,
    MessageCancelled,
    NotConnected,
    SessionClosed,
)
from baton_client.util import new_message_id

if TYPE_CHECKING:
    from baton_client.session import Ack, Session

# One `message.append` carries at most this many characters, so a burst of text stays under
# the server's per-event limit (64 KiB by default) even if every character JSON-escapes to 6.
MAX_DELTA_CHARS = 8000

# Errors after which publishing to this message again is pointless.
_TERMINAL = (ControlledByHuman, SessionClosed, ConnectionRejected, NotConnected)


class MessageStream:
    """A message being streamed; obtained from `Session.stream_message()`."""

    def __init__(
        self,
        session: Session,
        *,
        role: str,
        message_id: str | None,
        content: str,
        parts: list[Any] | None,
        window: float,
    ) -> None:
        self.session = session
        self.role = role
        self.message_id = message_id or new_message_id()
        #: The text as this process has produced it (what readers will see once flushed).
        self.content = content
        self.parts = parts
        self.window = window
        self.status = "pending"
        self.cancelled = False
        self.cancel_reason: str | None = None
        self.cancel_event: dict[str, Any] | None = None
        self.appends_published = 0
        #: Seq of our `message.create`, known once it is acknowledged.
        self.created_seq: int | None = None
        self._early_cancels: list[dict[str, Any]] = []
        self._cancelled = asyncio.Event()
        self._buffer: list[str] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ context manager

    async def __aenter__(self) -> MessageStream:
        data: dict[str, Any] = {"role": self.role, "status": "streaming"}
        if self.content:
            data["content"] = self.content
        if self.parts is not None:
            data["parts"] = self.parts
        # Registered before the create is sent: a cancel that arrives before our ack is kept
        # and judged once we know the create's seq (see _on_cancel).
        self.session._streams[self.message_id] = self
        try:
            ack = await self.session.publish("message.create", data, message_id=self.message_id)
        except BaseException:
            self.session._streams.pop(self.message_id, None)
            raise
        self.created_seq = ack.seq
        self.status = "streaming"
        early, self._early_cancels = self._early_cancels, []
        for event in early:
            self._on_cancel(event)
        self._flusher = asyncio.create_task(self._flush_loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            if isinstance(exc, _TERMINAL) or isinstance(self._error, _TERMINAL):
                # The server will not take more from us: send nothing, surface why.
                await self._stop_flusher()
                if exc is None and self._error is not None:
                    raise self._error
            elif exc is None and self._error is None:
                await self.complete("cancelled" if self.cancelled else "complete")
            elif isinstance(exc, MessageCancelled):
                await self.complete("cancelled")
                return True
            elif isinstance(exc, asyncio.CancelledError):
                # Our task is being torn down: record why, but never block the teardown long.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(5):
                        await self.complete("cancelled", reason="agent task cancelled")
            else:
                # An error after a cancel is usually the generator we aborted: the user's
                # cancel is the truthful status. Otherwise the message failed.
                error = exc or self._error
                reason = None if self.cancelled else f"{type(error).__name__}: {error}"[:500]
                with contextlib.suppress(*_TERMINAL):
                    await self.complete("cancelled" if self.cancelled else "failed", reason)
                if exc is None and self._error is not None:
                    raise self._error
        finally:
            self.session._streams.pop(self.message_id, None)
            await self._stop_flusher()
        return False

    # ------------------------------------------------------------------ producing

    async def append(self, text: str) -> None:
        """Buffer `text`; it is published within the coalescing window (see module rules).

        Raises `MessageCancelled` once the message was cancelled, and the flusher's error
        (e.g. `ControlledByHuman`) if the server refused an earlier append.
        """
        if self.cancelled:
            raise MessageCancelled(self.message_id, self.cancel_reason)
        if self._error is not None:
            raise self._error
        if self.status != "streaming":
            raise RuntimeError(f"message {self.message_id} is {self.status}; cannot append")
        if not text:
            return
        self.session._check_may_message()
        self._buffer.append(text)
        self.content += text
        self._wake.set()

    async def flush(self) -> None:
        """Publish whatever is buffered now and wait for its ack."""
        async with self._lock:
            await self._flush_locked()
        if self._error is not None:
            raise self._error

    async def update(self, content: str, parts: list[Any] | None = None) -> Ack:
        """Replace the content (`message.update`, same message id); later appends extend it."""
        async with self._lock:
            await self._flush_locked()
            if self._error is not None:
                raise self._error
            data: dict[str, Any] = {"content": content}
            if parts is not None:
                data["parts"] = parts
            ack = await self.session.publish("message.update", data, message_id=self.message_id)
            self.content = content
            return ack

    async def complete(self, status: str = "complete", reason: str | None = None) -> Ack | None:
        """Flush, then publish `message.complete`. Idempotent: a second call does nothing."""
        if self.status not in ("streaming",):
            return None
        async with self._lock:
            await self._flush_locked()
            await self._stop_flusher()
            data: dict[str, Any] = {"status": status}
            reason = (
                reason
                if reason is not None
                else (self.cancel_reason if status == "cancelled" else None)
            )
            if reason:
                data["reason"] = reason
            self.status = status
            return await self.session.publish("message.complete", data, message_id=self.message_id)

    async def wait_cancelled(self) -> None:
        """Resolve when a cancel for this message arrives (to race it against generation)."""
        await self._cancelled.wait()

    # ------------------------------------------------------------------ internals

    def _on_cancel(self, event: dict[str, Any]) -> None:
        """Apply a cancel aimed at this message or at none.

        A cancel naming no message only stops a message created before it: one published by
        the user before this message existed was meant for something else.
        """
        data = event.get("data") or {}
        if self.cancelled or self.status not in ("pending", "streaming"):
            return
        if self.created_seq is None:
            self._early_cancels.append(event)
            return
        if data.get("message_id") is None and event["seq"] < self.created_seq:
            return
        self.cancelled = True
        self.cancel_reason = data.get("reason")
        self.cancel_event = event
        self._cancelled.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if self.window > 0:
                await asyncio.sleep(self.window)
            async with self._lock:
                await self._flush_locked()
            if self._error is not None:
                return

    async def _flush_locked(self) -> None:
        self._wake.clear()
        if not self._buffer or self._error is not None:
            return
        delta = "".join(self._buffer)
        self._buffer.clear()
        try:
            for start in range(0, len(delta), MAX_DELTA_CHARS):
                chunk = delta[start : start + MAX_DELTA_CHARS]
                await self.session.publish(
                    "message.append", {"delta": chunk}, message_id=self.message_id
                )
                self.appends_published += 1
        except Exception as exc:
            self._error = exc

    async def _stop_flusher(self) -> None:
        task, self._flusher = self._flusher, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
