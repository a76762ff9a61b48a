"""The JSON shapes Baton puts on the wire, built in one place for REST, WebSocket and SSE."""

from datetime import datetime
from typing import Any

from sessions_app.models import Event, Message, Session


def format_ts(value: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: sortable and identical across databases."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def event_to_wire(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.id,
        "session": event.session_id,
        "type": event.type,
        "message_id": event.message_id,
        "author": {"kind": event.author_kind, "id": event.author_id, "name": event.author_name},
        "data": event.data,
        "visibility": event.visibility,
        "ts": format_ts(event.created_at),
    }


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
