"""Handover reads: the queue, live sessions with presence, search, diagnostics, export.

The queue is derived from the session status and the event log (not only from `Handover` rows),
so a request published as a plain `handover.requested` event by an SDK is queued the same way.
"""

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.utils import timezone

from sessions_app import event_types as et
from sessions_app.models import Connection, Event, Message, PresenceLease, Session
from sessions_app.selectors import get_session, list_wire_events
from sessions_app.wire import format_ts, session_to_wire

QUEUE_LIMIT = 200
LIVE_LIMIT = 50
EXPORT_PAGE = 1000


def _presence_by_session(session_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Live members of many sessions in two queries (open connections + unexpired leases)."""
    members: dict[str, dict[str, dict[str, Any]]] = {sid: {} for sid in session_ids}
    for conn in Connection.objects.filter(
        session_id__in=session_ids, closed_at__isnull=True, counts_for_presence=True
    ).order_by("opened_at"):
        member = members[conn.session_id].setdefault(
            conn.client_id,
            {"client_id": conn.client_id, "kind": conn.kind, "name": conn.name, "connections": 0},
        )
        member["connections"] += 1
    for lease in PresenceLease.objects.filter(
        session_id__in=session_ids, expires_at__gt=timezone.now()
    ):
        members[lease.session_id].setdefault(
            lease.client_id,
            {
                "client_id": lease.client_id,
                "kind": lease.kind,
                "name": lease.name,
                "connections": 0,
            },
        )
    return {sid: list(m.values()) for sid, m in members.items()}


def _session_row(session: Session, presence: list[dict[str, Any]]) -> dict[str, Any]:
    row = session_to_wire(session)
    row["presence"] = presence
    row["user_present"] = any(m["kind"] == et.KIND_USER for m in presence)
    row["agents"] = [m["name"] or m["client_id"] for m in presence if m["kind"] == et.KIND_AGENT]
    return row


def list_queue() -> list[dict[str, Any]]:
    """Sessions awaiting a human, oldest request first, with reason, summary and requester."""
    sessions = {
        s.id: s
        for s in Session.objects.filter(status=et.STATUS_AWAITING_HUMAN).order_by("updated_at")[
            :QUEUE_LIMIT
        ]
    }
    if not sessions:
        return []
    latest: dict[str, Event] = {}
    for event in Event.objects.filter(
        session_id__in=list(sessions), type=et.HANDOVER_REQUESTED
    ).order_by("seq"):
        latest[event.session_id] = event
    presence = _presence_by_session(list(sessions))
    rows = []
    for sid, session in sessions.items():
        row = _session_row(session, presence[sid])
        event = latest.get(sid)
        requested_at: datetime = event.created_at if event else session.updated_at
        row["handover"] = {
            "reason": (event.data.get("reason") if event else "") or "",
            "summary": (event.data.get("summary") if event else "") or "",
            "requested_by": (
                {"kind": event.author_kind, "id": event.author_id, "name": event.author_name}
                if event
                else None
            ),
            "requested_at": format_ts(requested_at),
            "requested_seq": event.seq if event else None,
        }
        rows.append((requested_at, row))
    rows.sort(key=lambda pair: pair[0])
    return [row for _, row in rows]


def search_sessions(*, query: str = "", limit: int = LIVE_LIMIT) -> list[dict[str, Any]]:
    """Live sessions (not closed, most recent activity first), or every session matching
    `query` by session id, title, a member's client id, or message text."""
    query = query.strip()
    qs = Session.objects.all()
    if query:
        qs = qs.filter(
            Q(id__icontains=query)
            | Q(title__icontains=query)
            | Q(id__in=Connection.objects.filter(client_id=query).values("session_id"))
            | Q(id__in=PresenceLease.objects.filter(client_id=query).values("session_id"))
            | Q(id__in=Message.objects.filter(author_id=query).values("session_id"))
            | Q(id__in=Message.objects.filter(content__icontains=query).values("session_id"))
        )
    else:
        qs = qs.exclude(status=et.STATUS_CLOSED)
    sessions = list(qs.order_by("-updated_at")[:limit])
    presence = _presence_by_session([s.id for s in sessions])
    return [_session_row(s, presence[s.id]) for s in sessions]


def console_state() -> dict[str, Any]:
    """What the console's live socket pushes: the queue and the live sessions."""
    return {"queue": list_queue(), "sessions": search_sessions()}


def session_overview(session_id: str) -> dict[str, Any]:
    session = get_session(session_id)
    return _session_row(session, _presence_by_session([session_id])[session_id])


def session_diagnostics(session_id: str) -> dict[str, Any]:
    """Each connection (device) of a session: lifecycle, delivery position vs head, lag."""
    session = get_session(session_id)
    head = session.last_seq
    now = timezone.now()
    rows = []
    for conn in Connection.objects.filter(session_id=session_id).order_by("-opened_at")[:200]:
        last = conn.last_received_seq
        rows.append(
            {
                "id": conn.id,
                "client_id": conn.client_id,
                "kind": conn.kind,
                "name": conn.name,
                "worker": conn.worker_id,
                "user_agent": conn.user_agent,
                "after": conn.after,
                "replayed": conn.replayed,
                "opened_at": format_ts(conn.opened_at),
                "closed_at": format_ts(conn.closed_at) if conn.closed_at else None,
                "close_code": conn.close_code,
                "close_reason": conn.close_reason or None,
                "open": conn.closed_at is None,
                "last_received_seq": last,
                "last_received_at": (
                    format_ts(conn.last_received_at) if conn.last_received_at else None
                ),
                "lag_events": (head - last) if last is not None else None,
                "ack_age_seconds": (
                    round((now - conn.last_received_at).total_seconds(), 1)
                    if conn.last_received_at and conn.closed_at is None
                    else None
                ),
            }
        )
    return {"session": session_id, "head": head, "connections": rows}


def export_pages(*, session_id: str, include_private: bool) -> Iterator[list[dict[str, Any]]]:
    """The event log from seq 1 to the head at the time of the call, a page at a time."""
    head = get_session(session_id).last_seq
    after = 0
    while after < head:
        page = list_wire_events(
            session_id=session_id,
            after=after,
            upto=head,
            limit=EXPORT_PAGE,
            include_private=include_private,
        )
        if not page:
            break
        after = page[-1]["seq"]
        yield page
