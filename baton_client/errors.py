"""Exceptions raised by the SDK, one class per thing a caller may want to handle differently."""

from __future__ import annotations

from typing import Any


class BatonError(Exception):
    """Base class: every SDK error carries the server's wire `code` when there is one."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class PublishError(BatonError):
    """The server refused a publish (`error` frame with our `ref`, or a 4xx REST answer)."""


class ControlledByHuman(PublishError):
    """An operator holds the session: agents may not publish `message.*` until it is released.

    Raised locally (nothing is sent) once `handover.claimed` has been seen, and also when the
    server refuses with `controlled_by_human` (the claim raced our publish).
    """


class SessionClosed(PublishError):
    """The session is `closed`; every publish is refused for good."""


class ConnectionRejected(BatonError):
    """The server closed the socket with a code that reconnecting cannot fix (44xx but 4408).

    Reconnecting with the same credential would be refused again, so the SDK stops and raises.
    """

    def __init__(self, message: str, *, close_code: int, reason: str = ""):
        super().__init__(message, code=f"close_{close_code}")
        self.close_code = close_code
        self.reason = reason


class Unauthenticated(ConnectionRejected):
    """4401: missing, garbage or expired credential."""


class Forbidden(ConnectionRejected):
    """4403: authenticated, but not allowed (other session, missing capability, bad Origin)."""


class SessionNotFound(ConnectionRejected):
    """4404: no such session."""


class ProtocolViolation(ConnectionRejected):
    """4400: the server rejected our frames; a bug in this SDK or a server mismatch."""


class MessageCancelled(BatonError):
    """A `signal.cancel` stopped this message stream.

    Raised by `MessageStream.append()` after the cancel so a token loop breaks out without
    checking a flag; `async with session.stream_message()` swallows it and completes the message
    as `cancelled`.
    """

    def __init__(self, message_id: str, reason: str | None = None):
        super().__init__(f"message {message_id} was cancelled" + (f": {reason}" if reason else ""))
        self.message_id = message_id
        self.reason = reason


class NotConnected(BatonError):
    """The session object was closed by the caller (or failed for good) and cannot publish."""


FATAL_CLOSE_CODES: dict[int, type[ConnectionRejected]] = {
    4400: ProtocolViolation,
    4401: Unauthenticated,
    4403: Forbidden,
    4404: SessionNotFound,
}


def rejection_for_close(code: int, reason: str = "") -> ConnectionRejected | None:
    """The exception for a fatal close code, or None if the SDK should reconnect."""
    cls = FATAL_CLOSE_CODES.get(code)
    if cls is None:
        return None
    text = f"server closed the connection with {code}" + (f" ({reason})" if reason else "")
    return cls(text, close_code=code, reason=reason)


def error_from_wire(
    payload: dict[str, Any] | None,
    *,
    status: int | None = None,
    default: str = "request failed",
    fallback: type[BatonError] = PublishError,
) -> BatonError:
    """Map an `{"code","message"}` error (frame or REST body) onto the SDK's exception classes.

    `fallback` is the class for codes without a dedicated one: `PublishError` for publishes,
    `BatonError` for reads.
    """
    payload = payload or {}
    code = payload.get("code")
    message = payload.get("message") or default
    if code == "controlled_by_human":
        return ControlledByHuman(message, code=code, status=status)
    if code == "session_closed":
        return SessionClosed(message, code=code, status=status)
    return fallback(message, code=code, status=status)
