"""The JSON shapes Baton puts on the wire, built in one place for REST, WebSocket and SSE."""

import json
from datetime import datetime
from typing import Any

from sessions_app.models import Event, Message, Session

# The last timestamp formatted: every event of a committed batch shares one datetime object,
# and strftime per event was ~2% of the event loop's time at half the knee. (Held here, so the
# object cannot be freed and its identity reused; threads that race at worst format again.)
_last_ts: tuple[datetime | None, str] = (None, "")


def format_ts(value: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: sortable and identical across databases."""
    global _last_ts
    last, text = _last_ts
    if value is last:
        return text
    text = value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    _last_ts = (value, text)
    return text


def wire_json(value: Any) -> str:
    """JSON as Baton puts it on the wire and stores it: compact, non-ASCII kept as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# The Event fields an event's wire form is made of, in the order `event_wire` takes them.
EVENT_WIRE_FIELDS = (
    "seq",
    "id",
    "session_id",
    "type",
    "message_id",
    "author_kind",
    "author_id",
    "author_name",
    "data",
    "visibility",
    "created_at",
)


def event_wire(
    seq: int,
    event_id: str,
    session_id: str,
    event_type: str,
    message_id: str | None,
    author_kind: str,
    author_id: str,
    author_name: str,
    data: Any,
    visibility: str,
    created_at: datetime,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "id": event_id,
        "session": session_id,
        "type": event_type,
        "message_id": message_id,
        "author": {"kind": author_kind, "id": author_id, "name": author_name},
        "data": data,
        "visibility": visibility,
        "ts": format_ts(created_at),
    }


def event_to_wire(event: Event) -> dict[str, Any]:
    return event_wire(*(getattr(event, field) for field in EVENT_WIRE_FIELDS))


def message_to_wire(message: Message) -> dict[str, Any]:
    return {
        "message_id": message.message_id,
        "role": message.role,
        "author": {
            "kind": message.author_kind,
            "id": message.author_id,
            "name": message.author_name,
        },
        "content": message.content,
        "parts": message.parts,
        "status": message.status,
        "reason": message.reason or None,
        "version": message.version,
        "created_seq": message.created_seq,
        "last_seq": message.last_seq,
        "created_at": format_ts(message.created_at),
        "updated_at": format_ts(message.updated_at),
    }


def session_to_wire(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "title": session.title,
        "metadata": session.metadata,
        "status": session.status,
        "controller": session.controller,
        "last_seq": session.last_seq,
        "created_by": session.created_by,
        "created_at": format_ts(session.created_at),
        "updated_at": format_ts(session.updated_at),
    }
