"""Baton agent SDK: durable, resumable sessions over WebSocket, plus a small REST helper.

No Django import: agents run anywhere with `websockets` and `httpx`.
"""

from baton_client.client import BatonClient
from baton_client.errors import (
    BatonError,
    ConnectionRejected,
    ControlledByHuman,
    Forbidden,
    MessageCancelled,
    NotConnected,
    ProtocolViolation,
    PublishError,
    SessionClosed,
    SessionNotFound,
    Unauthenticated,
)
from baton_client.rest import BatonREST
from baton_client.session import Ack, Session
from baton_client.stream import MessageStream

__all__ = [
    "Ack",
    "BatonClient",
    "BatonError",
    "BatonREST",
    "ConnectionRejected",
    "ControlledByHuman",
    "Forbidden",
    "MessageCancelled",
    "MessageStream",
    "NotConnected",
    "ProtocolViolation",
    "PublishError",
    "Session",
    "SessionClosed",
    "SessionNotFound",
    "Unauthenticated",
]
