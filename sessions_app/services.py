"""Writes. Sequence numbers come only from `_allocate`: via `append_events` (the general path)
or `append_many`'s fast lane (messages opened, streamed and completed, and plain events, in
bulk).

Every durable change to a session is an event appended here, in one transaction with the state it
derives (message materialization, session status, controller); fan-out happens after commit.
"""

import hashlib
import json
import os
import secrets
import socket
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    IntegrityError,
    connection,
    connections,
    transaction,
)
from django.db.backends.utils import CursorWrapper
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from sessions_app import event_types as et
from sessions_app.errors import BatonError, conflict, forbidden, invalid, not_found, too_large
from sessions_app.hub import publish_after_commit
from sessions_app.identity import Author
from sessions_app.ids import new_event_id, new_message_id
from sessions_app.models import (
    AgentKey,
    Connection,
    Event,
    Message,
    PresenceLease,
    Session,
    Worker,
)
from sessions_app.selectors import get_session, list_presence
from sessions_app.wire import event_to_wire, event_wire, wire_json

MAX_CLIENT_REF = 100
MAX_MESSAGE_ID = 64


@dataclass(frozen=True, slots=True)
class EventInput:
    """A validated event as a publisher asked for it, before it gets a seq."""

    type: str
    data: dict[str, Any]
    message_id: str | None = None
    client_ref: str | None = None
    # Set by the server only (never parsed from the wire): an id chosen before the commit, so a
    # publish handed to another worker can be committed again here without being stored twice
    # (see `sessions_app.writer.Forwarder`).
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    seq: int
    id: str
    message_id: str | None
    duplicate: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "id": self.id,
            "message_id": self.message_id,
            "duplicate": self.duplicate,
        }


# --------------------------------------------------------------------------- input validation


def parse_event_input(
    raw: Any, *, idempotency_key: str | None = None, index: int = 0
) -> EventInput:
    """Turn one wire event object into an EventInput, or raise a BatonError saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise invalid("An event must be a JSON object.")
    unknown = set(raw) - {"type", "data", "message_id", "client_ref"}
    if unknown:
        raise invalid(f"Unknown event field(s): {', '.join(sorted(unknown))}.")
    event_type = raw.get("type")
    if not isinstance(event_type, str) or not et.is_known_type(event_type):
        raise invalid(f"Unknown event type: {event_type!r}.")
    if len(event_type) > 100:
        raise invalid("Event type is longer than 100 characters.")
    data = raw.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise invalid("Event 'data' must be a JSON object.")
    size = len(wire_json(data).encode())
    if size > settings.BATON_MAX_EVENT_BYTES:
        raise too_large(
            f"Event data is {size} bytes; the limit is {settings.BATON_MAX_EVENT_BYTES}."
        )
    message_id = raw.get("message_id")
    if message_id is not None and (
        not isinstance(message_id, str) or not message_id or len(message_id) > MAX_MESSAGE_ID
    ):
        raise invalid(f"'message_id' must be a non-empty string of at most {MAX_MESSAGE_ID}.")
    client_ref = raw.get("client_ref")
    if client_ref is None and idempotency_key:
        client_ref = f"{idempotency_key}:{index}"
    if client_ref is not None and (
        not isinstance(client_ref, str) or not client_ref or len(client_ref) > MAX_CLIENT_REF
    ):
        raise invalid(f"'client_ref' must be a non-empty string of at most {MAX_CLIENT_REF}.")
    _check_data_shape(event_type, data, message_id)
    return EventInput(type=event_type, data=data, message_id=message_id, client_ref=client_ref)


def parse_event_batch(raw: Any, *, idempotency_key: str | None = None) -> list[EventInput]:
    """Accept one event object or `{"events": [...]}`."""
    if isinstance(raw, Mapping) and "events" in raw:
        if set(raw) != {"events"}:
            raise invalid("A batch body has only an 'events' list.")
        items = raw["events"]
        if not isinstance(items, list) or not items:
            raise invalid("'events' must be a non-empty list.")
    else:
        items = [raw]
    if len(items) > settings.BATON_MAX_BATCH_EVENTS:
        raise too_large(f"At most {settings.BATON_MAX_BATCH_EVENTS} events per batch.")
    return [
        parse_event_input(item, idempotency_key=idempotency_key, index=i)
        for i, item in enumerate(items)
    ]


def _require_str(data: dict[str, Any], key: str, event_type: str, optional: bool = False) -> None:
    value = data.get(key)
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise invalid(f"'{event_type}' needs data.{key} as a string.")


def _check_data_shape(event_type: str, data: dict[str, Any], message_id: str | None) -> None:
    if event_type in et.MESSAGE_TYPES and event_type != et.MESSAGE_CREATE and not message_id:
        raise invalid(f"'{event_type}' needs a message_id.")
    if event_type == et.MESSAGE_CREATE:
        _require_str(data, "role", event_type)
        _require_str(data, "content", event_type, optional=True)
        status = data.get("status", et.MESSAGE_STREAMING)
        if status not in (et.MESSAGE_STREAMING, et.MESSAGE_COMPLETE_STATUS):
            raise invalid("message.create data.status must be 'streaming' or 'complete'.")
        if data.get("parts") is not None and not isinstance(data["parts"], list):
            raise invalid("data.parts must be a list.")
    elif event_type == et.MESSAGE_APPEND:
        _require_str(data, "delta", event_type)
    elif event_type == et.MESSAGE_UPDATE:
        _require_str(data, "content", event_type)
        if data.get("parts") is not None and not isinstance(data["parts"], list):
            raise invalid("data.parts must be a list.")
    elif event_type == et.MESSAGE_COMPLETE:
        if data.get("status", et.MESSAGE_COMPLETE_STATUS) not in et.MESSAGE_FINAL_STATUSES:
            raise invalid("message.complete data.status must be complete, cancelled or failed.")
        _require_str(data, "reason", event_type, optional=True)
    elif event_type == et.SIGNAL_REDIRECT:
        _require_str(data, "text", event_type)
    elif event_type == et.SIGNAL_CANCEL:
        _require_str(data, "message_id", event_type, optional=True)
        _require_str(data, "reason", event_type, optional=True)
    elif event_type == et.HANDOVER_REQUESTED:
        _require_str(data, "reason", event_type, optional=True)
        _require_str(data, "summary", event_type, optional=True)
    elif event_type == et.NOTE_INTERNAL:
        _require_str(data, "text", event_type)


def _check_author_may_publish(author: Author, item: EventInput) -> None:
    if item.type in et.SERVER_ONLY_TYPES:
        raise forbidden(f"'{item.type}' is published by the server only.")
    if item.type == et.NOTE_INTERNAL and author.kind != et.KIND_OPERATOR:
        raise forbidden("Only operators write internal notes.")
    if item.type == et.HANDOVER_REQUESTED and author.kind not in (et.KIND_USER, et.KIND_AGENT):
        raise forbidden("Only users and agents request a human; operators claim.")
    if item.type == et.MESSAGE_CREATE:
        role = item.data["role"]
        allowed = et.ROLES_BY_KIND.get(author.kind, frozenset())
        if role not in allowed:
            raise forbidden(f"A {author.kind} cannot create a message with role {role!r}.")


# --------------------------------------------------------------------------- the append


def _visibility_for(event_type: str) -> str:
    if event_type == et.NOTE_INTERNAL:
        return et.VISIBILITY_OPERATORS
    if event_type.startswith("connection."):
        return et.VISIBILITY_DIAGNOSTICS
    return et.VISIBILITY_ALL


# Status transitions driven by event types: type -> (allowed from, to).
_TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    et.HANDOVER_REQUESTED: (frozenset({et.STATUS_ACTIVE}), et.STATUS_AWAITING_HUMAN),
    et.HANDOVER_CLAIMED: (
        frozenset({et.STATUS_ACTIVE, et.STATUS_AWAITING_HUMAN}),
        et.STATUS_WITH_HUMAN,
    ),
    et.HANDOVER_RELEASED: (
        frozenset({et.STATUS_WITH_HUMAN, et.STATUS_AWAITING_HUMAN}),
        et.STATUS_ACTIVE,
    ),
    et.SESSION_CLOSED: (
        frozenset({et.STATUS_ACTIVE, et.STATUS_AWAITING_HUMAN, et.STATUS_WITH_HUMAN}),
        et.STATUS_CLOSED,
    ),
}
_TRANSITION_ERRORS = {
    et.HANDOVER_REQUESTED: ("handover_pending", "A human was already requested or holds it."),
    et.HANDOVER_CLAIMED: ("already_claimed", "Another operator already holds this session."),
    et.HANDOVER_RELEASED: ("not_claimed", "No human holds this session."),
    et.SESSION_CLOSED: ("session_closed", "The session is already closed."),
}


def append_events(
    *,
    session_id: str,
    author: Author,
    events: Sequence[EventInput],
    system: bool = False,
) -> list[AppendResult]:
    """Append events atomically: the general path, every rule of an append in one place.

    `system=True` is for the server's own events (presence, handover, diagnostics): it may use
    server-only types and write to closed sessions. A repeated `client_ref` of the same author
    returns the original seq and stores nothing; a concurrent duplicate that loses the race on the
    unique constraint is retried once and then found.
    """
    if not events:
        return []
    if not system:
        for item in events:
            _check_author_may_publish(author, item)
    refs = [item.client_ref for item in events if item.client_ref]
    if len(refs) != len(set(refs)):
        raise invalid("The same client_ref appears twice in one batch.")
    for attempt in range(2):
        try:
            with transaction.atomic():
                return _append_locked(session_id, author, events, system)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _append_locked(
    session_id: str, author: Author, events: Sequence[EventInput], system: bool
) -> list[AppendResult]:
    existing: dict[str, Event] = {}
    refs = [item.client_ref for item in events if item.client_ref]
    if refs:
        existing = {
            e.client_ref: e
            for e in Event.objects.filter(
                session_id=session_id,
                author_kind=author.kind,
                author_id=author.id,
                client_ref__in=refs,
            ).only("id", "seq", "message_id", "client_ref")
        }
    ids = [item.event_id for item in events if item.event_id]
    if ids:
        # Committed already by the worker this publish was first handed to: its original result.
        stored = {
            e.id: e
            for e in Event.objects.filter(session_id=session_id, id__in=ids).only(
                "id", "seq", "message_id"
            )
        }
        if stored:
            return [_stored_result(stored, existing, item) for item in events]
    fresh = [item for item in events if not (item.client_ref and item.client_ref in existing)]
    if not fresh:
        if not Session.objects.filter(pk=session_id).exists():
            raise not_found()
        return [_duplicate_result(existing[item.client_ref]) for item in events]  # type: ignore[index]

    now = timezone.now()
    head, status, controller = _allocate(session_id, len(fresh), now)
    first_seq = head - len(fresh) + 1
    if status == et.STATUS_CLOSED and not system:
        raise conflict("session_closed", "The session is closed.")
    if (
        status == et.STATUS_WITH_HUMAN
        and author.kind == et.KIND_AGENT
        and any(item.type in et.MESSAGE_TYPES for item in fresh)
    ):
        raise conflict("controlled_by_human", "A human operator holds this session.")

    new_status, new_controller = status, controller
    rows: list[Event] = []
    message_events: list[tuple[EventInput, Event]] = []
    for offset, item in enumerate(fresh):
        message_id = item.message_id
        if item.type == et.MESSAGE_CREATE and not message_id:
            message_id = new_message_id()
        row = Event(
            id=item.event_id or new_event_id(),
            session_id=session_id,
            seq=first_seq + offset,
            type=item.type,
            message_id=message_id,
            author_kind=author.kind,
            author_id=author.id,
            author_name=author.name,
            data=item.data,
            visibility=_visibility_for(item.type),
            client_ref=item.client_ref,
            created_at=now,
        )
        rows.append(row)
        if item.type in et.MESSAGE_TYPES:
            message_events.append((item, row))
        if item.type in _TRANSITIONS:
            allowed_from, to = _TRANSITIONS[item.type]
            if new_status not in allowed_from:
                raise conflict(*_TRANSITION_ERRORS[item.type])
            new_status = to
            if item.type == et.HANDOVER_CLAIMED:
                new_controller = author.as_dict()
            elif item.type in (et.HANDOVER_RELEASED, et.SESSION_CLOSED):
                new_controller = None

    if message_events:
        _materialize_messages(session_id, message_events, now, system=system)
    Event.objects.bulk_create(rows)
    if (new_status, new_controller) != (status, controller):
        Session.objects.filter(pk=session_id).update(status=new_status, controller=new_controller)

    publish_after_commit(session_id, [event_to_wire(row) for row in rows])

    by_ref = {row.client_ref: row for row in rows if row.client_ref}
    results: list[AppendResult] = []
    fresh_iter = iter(rows)
    for item in events:
        if item.client_ref and item.client_ref in existing:
            results.append(_duplicate_result(existing[item.client_ref]))
        else:
            row = (
                by_ref[item.client_ref]
                if item.client_ref
                else next(r for r in fresh_iter if not r.client_ref)
            )
            results.append(AppendResult(row.seq, row.id, row.message_id, duplicate=False))
    return results


def _duplicate_result(event: Event) -> AppendResult:
    return AppendResult(event.seq, event.id, event.message_id, duplicate=True)


def _stored_result(
    stored: dict[str, Event], existing: dict[str, Event], item: EventInput
) -> AppendResult:
    """The result a pre-identified event got when its request was committed: its own row, or,
    for one that was a `client_ref` duplicate then, the original it was answered with (a
    request commits whole, so nothing else can be missing)."""
    event = stored.get(item.event_id or "")
    if event is not None:
        return AppendResult(event.seq, event.id, event.message_id, duplicate=False)
    if item.client_ref and item.client_ref in existing:
        return _duplicate_result(existing[item.client_ref])
    raise IntegrityError("a request was stored in part")  # cannot happen: one transaction


def open_sqlite_side_connection() -> sqlite3.Connection | None:
    """A new DB-API connection to the default database, configured as Django's own (pragmas,
    functions), for `sessions_app.writer.LoopLane`; None unless it is a SQLite file in WAL mode
    (an in-memory database would be another database; without WAL a writer blocks readers)."""
    wrapper = connections.create_connection(DEFAULT_DB_ALIAS)
    if wrapper.vendor != "sqlite" or wrapper.is_in_memory_db():
        return None
    wrapper.connect()  # Django's own path, so `connection_created` receivers see it too
    conn = wrapper.connection
    wrapper.connection = None  # the writer owns it from here
    (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() != "wal":
        conn.close()
        return None
    return conn


def checkpoint_sqlite_wal(*, conn: sqlite3.Connection) -> tuple[int, int]:
    """Copy the write-ahead log back into the database file without blocking anyone (what
    SQLite's auto-checkpoint does, taken off the connection that commits on the event loop).
    Returns the frames the WAL holds (its size since it last rewound) and how many of them are
    copied back (-1 if the copy could not run): all of them, and the next write rewinds it."""
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return max(frames, 0), (max(copied, 0) if not busy else -1)


class FastLaneMiss(Exception):
    """A batch (or run) needs the general path: roll it back and go through `append_many`."""


def _allocate(
    session_id: str, count: int, now: datetime, *, cursor: CursorWrapper | None = None
) -> tuple[int, str, Any]:
    """Take the session row lock and `count` seqs in one round trip (on `cursor` if given: a
    fresh Django cursor costs more CPU than the statement)."""
    table = Session._meta.db_table
    with nullcontext(cursor) if cursor is not None else connection.cursor() as c:
        c.execute(
            f"UPDATE {table} SET last_seq = last_seq + %s, updated_at = %s "
            "WHERE id = %s RETURNING last_seq, status, controller",
            [count, now, session_id],
        )
        row = c.fetchone()
    if row is None:
        raise not_found()
    head, status, controller = row
    if isinstance(controller, str):  # SQLite returns JSON as text
        controller = json.loads(controller)
    return int(head), status, controller


def _allocate_sessions(
    counts: dict[str, int], now: datetime, *, cursor: CursorWrapper
) -> dict[str, tuple[int, str]]:
    """Seqs for every session of a fast run: session id -> (new head, status).

    One statement for all sessions (one per session cost most of a batch's CPU). SQLite has one
    writer: `UPDATE … CASE … RETURNING`. Postgres locks the rows in id order first, so
    concurrent batches of several processes always lock in the same order and cannot deadlock.
    A missing session is a miss.
    """
    heads: dict[str, tuple[int, str]] = {}
    table = connection.ops.quote_name(Session._meta.db_table)
    if connection.vendor == "postgresql":
        # Lock every row first, in id order (a materialized CTE sorted under FOR UPDATE), then
        # take all the seqs: one round trip instead of one per session (each round trip also
        # cost the database thread a wait for the GIL).
        ids = sorted(counts)
        cursor.execute(
            f"WITH locked AS MATERIALIZED (SELECT id FROM {table} WHERE id = ANY(%s) "
            f"ORDER BY id FOR UPDATE) UPDATE {table} AS s SET last_seq = s.last_seq + w.n, "
            "updated_at = %s FROM locked JOIN unnest(%s::text[], %s::bigint[]) AS w(id, n) "
            "ON w.id = locked.id WHERE s.id = locked.id RETURNING s.id, s.last_seq, s.status",
            [ids, now, ids, [counts[i] for i in ids]],
        )
        heads.update((session_id, (int(head), status)) for session_id, head, status in cursor)
    elif connection.vendor == "sqlite":
        items = list(counts.items())
        for start in range(0, len(items), 300):
            chunk = items[start : start + 300]
            cases = " ".join(["WHEN %s THEN %s"] * len(chunk))
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                f"UPDATE {table} SET last_seq = last_seq + CASE id {cases} END, updated_at = %s "
                f"WHERE id IN ({marks}) RETURNING id, last_seq, status",
                [*(v for pair in chunk for v in pair), now, *(k for k, _ in chunk)],
            )
            heads.update((session_id, (int(head), status)) for session_id, head, status in cursor)
    else:
        for session_id, count in counts.items():
            head, status, _controller = _allocate(session_id, count, now, cursor=cursor)
            heads[session_id] = (head, status)
    missing = counts.keys() - heads.keys()
    if missing:
        raise FastLaneMiss(min(missing))
    return heads


def _opened_message(
    *, session_id: str, message_id: str, item: EventInput, author: Author, seq: int, now: datetime
) -> Message:
    """The message a `message.create` opens (unsaved): the general path bulk-creates it, the fast
    lane inserts its field values."""
    return Message(
        session_id=session_id,
        message_id=message_id,
        role=item.data["role"],
        author_kind=author.kind,
        author_id=author.id,
        author_name=author.name,
        content=item.data.get("content") or "",
        parts=item.data.get("parts"),
        status=item.data.get("status", et.MESSAGE_STREAMING),
        version=1,
        created_seq=seq,
        last_seq=seq,
        created_at=now,
        updated_at=now,
    )


def _completion(item: EventInput) -> tuple[str, str]:
    """The status and reason a `message.complete` leaves on its message."""
    return (
        item.data.get("status", et.MESSAGE_COMPLETE_STATUS),
        (item.data.get("reason") or "")[:200],
    )


def _materialize_messages(
    session_id: str,
    message_events: list[tuple[EventInput, Event]],
    now: datetime,
    system: bool = False,
) -> None:
    if all(item.type == et.MESSAGE_APPEND for item, _ in message_events) and _append_in_place(
        session_id, message_events, now
    ):
        return
    ids = {row.message_id for _, row in message_events}
    known = {
        m.message_id: m for m in Message.objects.filter(session_id=session_id, message_id__in=ids)
    }
    created: dict[str, Message] = {}
    changed: dict[str, Message] = {}
    for item, row in message_events:
        message_id = row.message_id
        assert message_id is not None
        message = created.get(message_id) or known.get(message_id)
        if item.type == et.MESSAGE_CREATE:
            if message is not None:
                raise conflict("message_exists", f"Message {message_id} already exists.")
            created[message_id] = _opened_message(
                session_id=session_id,
                message_id=message_id,
                item=item,
                author=Author(row.author_kind, row.author_id, row.author_name),
                seq=row.seq,
                now=now,
            )
            continue
        if message is None:
            raise BatonError("message_not_found", f"No message {message_id} in this session.", 404)
        if not system and (message.author_kind, message.author_id) != (
            row.author_kind,
            row.author_id,
        ):
            raise forbidden("Only a message's author may change it.")
        if item.type == et.MESSAGE_APPEND:
            if message.status != et.MESSAGE_STREAMING:
                raise conflict(
                    "message_not_streaming", f"Message {message_id} is {message.status}."
                )
            message.content += item.data["delta"]
        elif item.type == et.MESSAGE_UPDATE:
            message.content = item.data["content"]
            if "parts" in item.data:
                message.parts = item.data["parts"]
        elif item.type == et.MESSAGE_COMPLETE:
            if message.status != et.MESSAGE_STREAMING:
                raise conflict(
                    "message_not_streaming", f"Message {message_id} is {message.status}."
                )
            message.status, message.reason = _completion(item)
        message.version += 1
        message.last_seq = row.seq
        message.updated_at = now
        if message_id not in created:
            changed[message_id] = message
    if created:
        Message.objects.bulk_create(created.values())
    if changed:
        Message.objects.bulk_update(
            changed.values(),
            ["content", "parts", "status", "reason", "version", "last_seq", "updated_at"],
        )


@dataclass(frozen=True, slots=True)
class AppendRequest:
    session_id: str
    author: Author
    events: Sequence[EventInput]


def append_many(requests: Sequence[AppendRequest]) -> list[list[AppendResult] | BatonError]:
    """Group commit: several publishers' appends in one transaction (two when some session's
    requests need the slow path after its fast run).

    Sessions are taken in id order, each session's requests in submission order, so concurrent
    batches in other processes lock session rows in the same order and cannot deadlock, and one
    connection's acks follow its seqs. Messages opened, streamed and completed, and plain
    events, go through the fast lane (raw SQL, a few statements for the whole run); everything
    else, and any fast run that meets a problem, goes request by request through
    `append_events`, each in its own savepoint. A refused request yields its BatonError in its
    slot; the others commit.
    """
    if not connection.in_atomic_block:
        written = _append_fast_transaction(requests)
        if written is not None:
            outcomes: list[list[AppendResult] | BatonError] = [[] for _ in requests]
            for i, request_results in written.results.items():
                outcomes[i] = request_results
            rest = _append_many_in_savepoints([requests[i] for i in written.left])
            for i, outcome in zip(written.left, rest, strict=True):
                outcomes[i] = outcome
            return outcomes
    return _append_many_in_savepoints(requests)


def _append_fast_transaction(requests: Sequence[AppendRequest]) -> "FastBatch | None":
    """The usual batch, whole in the fast lane, as a transaction of its own: no savepoint, two
    round trips fewer on Postgres. None (rolled back, no seq consumed) when anything in it is
    refused; `_append_many_in_savepoints` then gives the precise answers. What the fast lane
    leaves (a session's slow tail) is the caller's to write after this commit."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            written = append_many_fast(requests=requests, cursor=cursor)
            for session_id, events in written.wires.items():
                publish_after_commit(session_id, events)
    except (FastLaneMiss, BatonError, DatabaseError):
        return None
    return written


def _append_many_in_savepoints(
    requests: Sequence[AppendRequest],
) -> list[list[AppendResult] | BatonError]:
    """`append_many` in one transaction, each fast run and each slow request in a savepoint."""
    outcomes: list[list[AppendResult] | BatonError] = [[] for _ in requests]
    if not requests:
        return outcomes
    with transaction.atomic():
        fast: list[int] = []
        for run, tail in _fast_runs(requests):
            fast += run
            if tail:
                # Keep submission order: the run so far is written before this session's slow tail.
                _append_fast(requests=requests, indices=fast, outcomes=outcomes)
                fast = []
                for i in tail:
                    outcomes[i] = _append_isolated(requests[i])
        _append_fast(requests=requests, indices=fast, outcomes=outcomes)
    return outcomes


def _fast_runs(
    requests: Sequence[AppendRequest], *, cursor: Any = None
) -> list[tuple[list[int], list[int]]]:
    """Per session, in id order: the indices of its leading run of requests the fast lane may
    take (eligible, no client_ref stored already or repeated in the run), and of the rest."""
    by_session: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        by_session.setdefault(request.session_id, []).append(i)
    candidates = [_fast_lane_eligible(request) for request in requests]
    known = _known_client_refs(
        [r for r, ok in zip(requests, candidates, strict=True) if ok], cursor=cursor
    )
    runs = []
    for session_id in sorted(by_session):
        indices = by_session[session_id]
        refs: set[tuple[str, str, str]] = set()
        run = 0
        while run < len(indices) and _fresh_refs(
            requests[indices[run]], eligible=candidates[indices[run]], known=known, seen=refs
        ):
            run += 1
        runs.append((indices[:run], indices[run:]))
    return runs


@dataclass(frozen=True, slots=True)
class FastBatch:
    """What `append_many_fast` wrote: results by request index, the wire events per session to
    fan out after the commit, and the indices it left for `append_many`."""

    results: dict[int, list[AppendResult]]
    wires: dict[str, list[dict[str, Any]]]
    left: list[int]


def append_many_fast(*, requests: Sequence[AppendRequest], cursor: Any) -> FastBatch:
    """The fast lane alone, inside a transaction the caller owns on `cursor`.

    For the embedded writer, which commits on its own SQLite connection from the event loop
    (see `sessions_app.writer`). Per session it takes the leading run of requests the fast lane
    may take and leaves the rest (a `message.update`, a status change, a stored client_ref) for
    `append_many`, to be written after this commit, so each session keeps its order. Raises
    (FastLaneMiss, a database error) when the run meets a refusal: the caller rolls back and
    hands the whole batch to `append_many`, whose answer is then the precise one.
    """
    indices: list[int] = []
    left: list[int] = []
    for run, tail in _fast_runs(requests, cursor=cursor):
        indices += run
        left += tail
    results, wires = _write_fast(requests=requests, indices=indices, cursor=cursor)
    for i in indices:
        results.setdefault(i, [])
    return FastBatch(results, wires, sorted(left))


def _append_isolated(request: AppendRequest) -> list[AppendResult] | BatonError:
    try:
        return append_events(
            session_id=request.session_id, author=request.author, events=request.events
        )
    except BatonError as exc:
        return exc


# Message events the fast lane writes itself; a `message.update` (a rewrite between appends)
# takes `append_events`.
_FAST_MESSAGE_TYPES = frozenset({et.MESSAGE_CREATE, et.MESSAGE_APPEND, et.MESSAGE_COMPLETE})


def _fast_lane_eligible(request: AppendRequest) -> bool:
    """Messages created, streamed and completed, and plain events: no session status change,
    no message rewrite, nothing the author may not publish. Anything else takes
    `append_events`."""
    refs: set[str] = set()
    for item in request.events:
        if item.type == et.MESSAGE_APPEND:
            if not item.message_id or not isinstance(item.data.get("delta"), str):
                return False
        elif item.type in _FAST_MESSAGE_TYPES:
            pass  # shapes were checked when parsed; the state is checked where it is written
        elif (
            item.type in et.MESSAGE_TYPES
            or item.type in _TRANSITIONS
            or _visibility_for(item.type) != et.VISIBILITY_ALL
        ):
            return False
        try:
            _check_author_may_publish(request.author, item)
        except BatonError:
            return False
        if item.client_ref:
            if item.client_ref in refs:
                return False
            refs.add(item.client_ref)
    return True


def _fresh_refs(
    request: AppendRequest,
    *,
    eligible: bool,
    known: set[tuple[str, str, str, str]],
    seen: set[tuple[str, str, str]],
) -> bool:
    """True if `request` may join the fast run: none of its client_refs is stored already or
    used by an earlier request of the run (those are duplicates `append_events` resolves)."""
    if not eligible:
        return False
    author = request.author
    keys = [(author.kind, author.id, item.client_ref) for item in request.events if item.client_ref]
    if any((request.session_id, *key) in known or key in seen for key in keys):
        return False
    seen.update(keys)
    return True


def _known_client_refs(
    requests: Sequence[AppendRequest], *, cursor: Any = None
) -> set[tuple[str, str, str, str]]:
    """The (session, author kind, author id, client_ref) of these requests that are stored
    already, in as few SELECTs as the backend's parameter limit allows (via the unique index);
    on `cursor` if given."""
    wanted: dict[tuple[str, str, str], list[str]] = {}
    for request in requests:
        refs = [item.client_ref for item in request.events if item.client_ref]
        if refs:
            key = (request.session_id, request.author.kind, request.author.id)
            wanted.setdefault(key, []).extend(refs)
    if not wanted:
        return set()
    table = connection.ops.quote_name(Event._meta.db_table)
    # SQLite allows 999 parameters (older builds) and 500 terms of a compound SELECT.
    limit = min(connection.features.max_query_params or 999, 999)
    found: set[tuple[str, str, str, str]] = set()
    chunks: list[list[tuple[tuple[str, str, str], list[str]]]] = [[]]
    size = 0
    for key, all_refs in wanted.items():
        for start in range(0, len(all_refs), limit - 3):
            refs = all_refs[start : start + limit - 3]
            if chunks[-1] and size + 3 + len(refs) > limit:
                chunks.append([])
                size = 0
            chunks[-1].append((key, refs))
            size += 3 + len(refs)
    select = (
        f"SELECT session_id, author_kind, author_id, client_ref FROM {table} "
        "WHERE session_id = %s AND author_kind = %s AND author_id = %s AND client_ref IN ({})"
    )
    with nullcontext(cursor) if cursor is not None else connection.cursor() as c:
        for chunk in chunks:
            # UNION ALL of exact index lookups: the plan cannot drift to scanning an author's
            # refs across sessions, as an OR of the same conditions may on Postgres.
            c.execute(
                " UNION ALL ".join(
                    select.format(", ".join(["%s"] * len(refs))) for _, refs in chunk
                ),
                [value for key, refs in chunk for value in (*key, *refs)],
            )
            found.update(c.fetchall())
    return found


def _append_fast(
    *,
    requests: Sequence[AppendRequest],
    indices: list[int],
    outcomes: list[list[AppendResult] | BatonError],
) -> None:
    """Write a run of eligible requests (ordered by session, then submission) in one savepoint.

    Problems are rare but real (tokens in flight when a message is cancelled or a human takes
    over; a missing message, someone else's, a racing duplicate client_ref): the savepoint is
    rolled back, consuming no seq, the sessions at fault are found (or, for a race, the run is
    halved) and only their requests go one by one through `append_events`, which says why. Their
    neighbours stay in the fast lane, so one misbehaving publisher cannot slow the batch down.
    """
    if not indices:
        return
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            results, wires = _write_fast(requests=requests, indices=indices, cursor=cursor)
    except (FastLaneMiss, BatonError, IntegrityError):
        by_session: dict[str, list[int]] = {}
        for i in indices:  # already in session order
            by_session.setdefault(requests[i].session_id, []).append(i)
        if len(by_session) == 1:
            at_fault = set(by_session)
        else:
            at_fault = _sessions_at_fault(requests=requests, indices=indices)
        if not at_fault:  # a race, no state to blame: halve the run
            half = len(by_session) // 2
            for sessions in (list(by_session)[:half], list(by_session)[half:]):
                part = [i for session_id in sessions for i in by_session[session_id]]
                _append_fast(requests=requests, indices=part, outcomes=outcomes)
            return
        part = []
        for session_id, mine in by_session.items():  # in session order: locks stay ordered
            if session_id in at_fault:
                _append_fast(requests=requests, indices=part, outcomes=outcomes)
                part = []
                for i in mine:
                    outcomes[i] = _append_isolated(requests[i])
            else:
                part += mine
        _append_fast(requests=requests, indices=part, outcomes=outcomes)
        return
    for session_id, events in wires.items():
        publish_after_commit(session_id, events)
    for i, request_results in results.items():
        outcomes[i] = request_results


def _sessions_at_fault(*, requests: Sequence[AppendRequest], indices: list[int]) -> set[str]:
    """After a fast run missed: the sessions whose state refuses one of their requests there
    (missing, closed, held by a human against an agent's message, a message event the stored
    message does not allow, replayed in run order). A few reads, only on this rare path."""
    session_ids = sorted({requests[i].session_id for i in indices})
    quote = connection.ops.quote_name
    status: dict[str, str] = {}
    stored: dict[tuple[str, str], _RunMessage] = {}
    with connection.cursor() as cursor:
        for start in range(0, len(session_ids), 90):
            chunk = session_ids[start : start + 90]
            marks = ", ".join(["%s"] * len(chunk))
            in_chunk = set(chunk)
            cursor.execute(
                f"SELECT id, status FROM {quote(Session._meta.db_table)} WHERE id IN ({marks})",
                chunk,
            )
            status.update(cursor.fetchall())
            mentioned = sorted(
                {
                    item.message_id
                    for i in indices
                    if requests[i].session_id in in_chunk
                    for item in requests[i].events
                    if item.type in _FAST_MESSAGE_TYPES and item.message_id
                }
            )
            for first in range(0, len(mentioned), 900):
                ids = mentioned[first : first + 900]
                cursor.execute(
                    "SELECT session_id, message_id, author_kind, author_id, status FROM "
                    f"{quote(Message._meta.db_table)} WHERE session_id IN ({marks}) "
                    f"AND message_id IN ({', '.join(['%s'] * len(ids))})",
                    [*chunk, *ids],
                )
                for session_id, message_id, kind, author_id, state in cursor.fetchall():
                    stored[(session_id, message_id)] = _RunMessage((kind, author_id), state)
    at_fault: set[str] = set()
    runs: dict[str, dict[str, _RunMessage]] = {}
    for i in indices:
        session_id, author, events = requests[i].session_id, requests[i].author, requests[i].events
        run = runs.setdefault(session_id, {})
        if (
            status.get(session_id) in (None, et.STATUS_CLOSED)
            or (
                status[session_id] == et.STATUS_WITH_HUMAN
                and author.kind == et.KIND_AGENT
                and any(item.type in et.MESSAGE_TYPES for item in events)
            )
            or not all(
                _run_message_step(
                    run,
                    item.message_id,
                    item,
                    author,
                    stored=stored.get((session_id, item.message_id)),
                )
                for item in events
                if item.type in _FAST_MESSAGE_TYPES and item.message_id
            )
        ):
            at_fault.add(session_id)
    return at_fault


@dataclass(slots=True)
class _RunMessage:
    """A message as a fast run sees it: its author (kind, id) and status."""

    author: tuple[str, str]
    status: str


def _run_message_step(
    run: dict[str, _RunMessage],
    message_id: str,
    item: EventInput,
    author: Author,
    *,
    stored: _RunMessage | None,
) -> bool:
    """Apply one create/append/complete to the run's view of a session's messages (`stored`:
    the message before the run, None if absent); False where `append_events` would refuse it
    (`_materialize_messages` says why)."""
    known = run.get(message_id, stored)
    who = (author.kind, author.id)
    if item.type == et.MESSAGE_CREATE:
        if known is not None:
            return False
        run[message_id] = _RunMessage(who, item.data.get("status", et.MESSAGE_STREAMING))
        return True
    if known is None or known.author != who or known.status != et.MESSAGE_STREAMING:
        return False
    status = et.MESSAGE_STREAMING
    if item.type == et.MESSAGE_COMPLETE:
        status = item.data.get("status", et.MESSAGE_COMPLETE_STATUS)
    run[message_id] = _RunMessage(who, status)
    return True


def _message_row(message: Message) -> list[Any]:
    """The INSERT parameters of an opened message, in `Message._meta.concrete_fields` order
    without the auto id."""
    return [
        field.get_db_prep_save(getattr(message, field.attname), connection)
        for field in Message._meta.concrete_fields
        if not field.primary_key
    ]


def _write_fast(
    *, requests: Sequence[AppendRequest], indices: list[int], cursor: CursorWrapper
) -> tuple[dict[int, list[AppendResult]], dict[str, list[dict[str, Any]]]]:
    """Per session one seq allocation; per message one conditional UPDATE; one INSERT for all
    events. Raw SQL: ORM query building cost ~1 ms of CPU per publish on this path."""
    now = timezone.now()
    db_now = Event._meta.get_field("created_at").get_db_prep_save(now, connection)
    data_field = Event._meta.get_field("data")
    rows: list[tuple[Any, ...]] = []
    results: dict[int, list[AppendResult]] = {}
    wires: dict[str, list[dict[str, Any]]] = {}
    # Messages created (INSERT rows) and completed (UPDATE parameters) by the run.
    creates: list[list[Any]] = []
    completes: list[tuple[Any, ...]] = []
    # Per (session, message, author kind, author id): its deltas in seq order, and its last seq.
    appends: dict[tuple[str, str, str, str], list[str]] = {}
    last_seq: dict[tuple[str, str, str, str], int] = {}
    by_session: dict[str, list[int]] = {}
    for i in indices:
        by_session.setdefault(requests[i].session_id, []).append(i)
    counts = {
        session_id: sum(len(requests[i].events) for i in group)
        for session_id, group in by_session.items()
    }
    heads = _allocate_sessions({k: n for k, n in counts.items() if n}, now, cursor=cursor)
    for session_id, group in by_session.items():
        count = counts[session_id]
        if not count:
            continue
        head, status = heads[session_id]
        if status == et.STATUS_CLOSED or (
            status == et.STATUS_WITH_HUMAN
            and any(
                requests[i].author.kind == et.KIND_AGENT
                and any(item.type in et.MESSAGE_TYPES for item in requests[i].events)
                for i in group
            )
        ):
            raise FastLaneMiss(session_id)
        seq = head - count
        session_wires = wires[session_id] = []
        run: dict[str, _RunMessage] = {}
        for i in group:
            author = requests[i].author
            request_results = results[i] = []
            for item in requests[i].events:
                seq += 1
                event_id = item.event_id or new_event_id()
                visibility = _visibility_for(item.type)
                message_id = item.message_id
                if item.type in _FAST_MESSAGE_TYPES:
                    if item.type == et.MESSAGE_CREATE:
                        message_id = message_id or new_message_id()
                        stored = None  # the INSERT below meets the unique constraint if not
                    else:  # the conditional UPDATEs below check the stored state
                        stored = _RunMessage((author.kind, author.id), et.MESSAGE_STREAMING)
                    assert message_id is not None
                    if not _run_message_step(run, message_id, item, author, stored=stored):
                        raise FastLaneMiss(session_id)
                    if item.type == et.MESSAGE_CREATE:
                        opened = _opened_message(
                            session_id=session_id,
                            message_id=message_id,
                            item=item,
                            author=author,
                            seq=seq,
                            now=now,
                        )
                        creates.append(_message_row(opened))
                    elif item.type == et.MESSAGE_COMPLETE:
                        completes.append(
                            (
                                *_completion(item),
                                seq,
                                db_now,
                                session_id,
                                message_id,
                                author.kind,
                                author.id,
                                et.MESSAGE_STREAMING,
                            )
                        )
                rows.append(
                    (
                        event_id,
                        session_id,
                        seq,
                        item.type,
                        message_id,
                        author.kind,
                        author.id,
                        author.name,
                        data_field.get_db_prep_save(item.data, connection),
                        visibility,
                        item.client_ref,
                        db_now,
                    )
                )
                session_wires.append(
                    event_wire(
                        seq,
                        event_id,
                        session_id,
                        item.type,
                        message_id,
                        author.kind,
                        author.id,
                        author.name,
                        item.data,
                        visibility,
                        now,
                    )
                )
                request_results.append(AppendResult(seq, event_id, message_id, False))
                if item.type == et.MESSAGE_APPEND:
                    key = (session_id, message_id or "", author.kind, author.id)
                    appends.setdefault(key, []).append(item.data["delta"])
                    last_seq[key] = seq
    if not rows:
        return results, wires
    quote = connection.ops.quote_name
    columns = ", ".join(
        quote(Event._meta.get_field(name).column)
        for name in (
            "id",
            "session",
            "seq",
            "type",
            "message_id",
            "author_kind",
            "author_id",
            "author_name",
            "data",
            "visibility",
            "client_ref",
            "created_at",
        )
    )
    message_table = quote(Message._meta.db_table)
    if creates:
        message_columns = [
            quote(field.column) for field in Message._meta.concrete_fields if not field.primary_key
        ]
        cursor.executemany(
            f"INSERT INTO {message_table} ({', '.join(message_columns)}) "
            f"VALUES ({', '.join(['%s'] * len(message_columns))})",
            creates,
        )
    # After the INSERTs (a run may create a message and stream into it) and before the
    # completions (the run view above puts every append of a message before its completion).
    if appends and connection.vendor == "postgresql":
        # One statement for every message of the run (`executemany` ran one per message).
        keys = list(appends)
        cursor.execute(
            f"UPDATE {message_table} AS m SET content = m.content || w.delta, "
            "version = m.version + w.n, last_seq = w.last_seq, updated_at = %s "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::int[], %s::bigint[]) AS w(session_id, message_id, author_kind, author_id, "
            "delta, n, last_seq) WHERE m.session_id = w.session_id AND m.message_id = "
            "w.message_id AND m.author_kind = w.author_kind AND m.author_id = w.author_id "
            "AND m.status = %s",
            [
                db_now,
                *([key[column] for key in keys] for column in range(4)),
                ["".join(appends[key]) for key in keys],
                [len(appends[key]) for key in keys],
                [last_seq[key] for key in keys],
                et.MESSAGE_STREAMING,
            ],
        )
        if cursor.rowcount != len(appends):
            raise FastLaneMiss("message")
    elif appends:
        cursor.executemany(
            f"UPDATE {message_table} SET content = content || %s, "
            "version = version + %s, last_seq = %s, updated_at = %s WHERE session_id = %s "
            "AND message_id = %s AND author_kind = %s AND author_id = %s AND status = %s",
            [
                ("".join(deltas), len(deltas), last_seq[key], db_now, *key, et.MESSAGE_STREAMING)
                for key, deltas in appends.items()
            ],
        )
        if cursor.rowcount != len(appends):
            raise FastLaneMiss("message")
    if completes:
        cursor.executemany(
            f"UPDATE {message_table} SET status = %s, reason = %s, version = version + 1, "
            "last_seq = %s, updated_at = %s WHERE session_id = %s AND message_id = %s "
            "AND author_kind = %s AND author_id = %s AND status = %s",
            completes,
        )
        if cursor.rowcount != len(completes):
            raise FastLaneMiss("message")
    cursor.executemany(
        f"INSERT INTO {quote(Event._meta.db_table)} ({columns}) VALUES ({', '.join(['%s'] * 12)})",
        rows,
    )
    return results, wires


def _append_in_place(
    session_id: str, message_events: list[tuple[EventInput, Event]], now: datetime
) -> bool:
    """The streaming hot path: tokens appended with one conditional UPDATE per message, no read.

    Returns False (having changed nothing) when a message is missing, not streaming or not the
    author's, so the general path can raise the precise error.
    """
    by_message: dict[str, list[tuple[EventInput, Event]]] = {}
    for item, row in message_events:
        by_message.setdefault(row.message_id or "", []).append((item, row))
    if len(by_message) != 1:
        return False
    ((message_id, group),) = by_message.items()
    first = group[0][1]
    updated = Message.objects.filter(
        session_id=session_id,
        message_id=message_id,
        status=et.MESSAGE_STREAMING,
        author_kind=first.author_kind,
        author_id=first.author_id,
    ).update(
        content=Concat(F("content"), Value("".join(item.data["delta"] for item, _ in group))),
        version=F("version") + len(group),
        last_seq=group[-1][1].seq,
        updated_at=now,
    )
    return updated == 1


# --------------------------------------------------------------------------- sessions


def create_session(
    *, created_by: Author, title: str = "", metadata: dict[str, Any] | None = None
) -> Session:
    if len(title) > 200:
        raise invalid("'title' is longer than 200 characters.")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("'metadata' must be a JSON object.")
    return Session.objects.create(
        title=title, metadata=metadata or {}, created_by=created_by.as_dict()
    )


# --------------------------------------------------------------------------- presence


def _lock_session(session_id: str) -> Session:
    try:
        return Session.objects.select_for_update().only("id", "status").get(pk=session_id)
    except Session.DoesNotExist:
        raise not_found() from None


def _is_member(session_id: str, client_id: str, now: datetime) -> bool:
    return (
        Connection.objects.filter(
            session_id=session_id,
            client_id=client_id,
            closed_at__isnull=True,
            counts_for_presence=True,
        ).exists()
        or PresenceLease.objects.filter(
            session_id=session_id, client_id=client_id, expires_at__gt=now
        ).exists()
    )


def _presence_event(event_type: str, member: Author, **extra: Any) -> EventInput:
    return EventInput(
        event_type, {"client_id": member.id, "kind": member.kind, "name": member.name, **extra}
    )


def _leave(session_id: str, member: Author, reason: str) -> None:
    append_events(
        session_id=session_id,
        author=member,
        events=[_presence_event(et.PRESENCE_LEAVE, member, reason=reason)],
        system=True,
    )


def open_connection(
    *,
    session_id: str,
    author: Author,
    worker_id: str,
    after: int,
    replayed: int,
    counts_for_presence: bool,
    user_agent: str = "",
) -> Connection:
    """Record an attached connection; the first one of a client_id makes it enter presence."""
    now = timezone.now()
    with transaction.atomic():
        _lock_session(session_id)
        entering = counts_for_presence and not _is_member(session_id, author.id, now)
        conn = Connection.objects.create(
            session_id=session_id,
            client_id=author.id,
            kind=author.kind,
            name=author.name,
            counts_for_presence=counts_for_presence,
            worker_id=worker_id,
            after=after,
            replayed=replayed,
            user_agent=user_agent[:300],
            opened_at=now,
        )
        inputs = []
        if entering:
            inputs.append(_presence_event(et.PRESENCE_ENTER, author))
        lifecycle = et.CONNECTION_RESUMED if after > 0 else et.CONNECTION_OPENED
        inputs.append(
            EventInput(
                lifecycle,
                {
                    "connection_id": conn.id,
                    "client_id": author.id,
                    "kind": author.kind,
                    "after": after,
                    "replayed": replayed,
                    "worker": worker_id,
                },
            )
        )
        append_events(session_id=session_id, author=author, events=inputs, system=True)
    return conn


def open_attached(
    *,
    session_id: str,
    author: Author,
    worker_id: str,
    after: int,
    replayed: int,
    counts_for_presence: bool,
    user_agent: str,
) -> tuple[Connection, list[dict[str, Any]], Session]:
    """The attach's bookkeeping in one thread hop, not three: record the connection (entering
    presence), then read the presence and session state the `attached` frame reports."""
    conn = open_connection(
        session_id=session_id,
        author=author,
        worker_id=worker_id,
        after=after,
        replayed=replayed,
        counts_for_presence=counts_for_presence,
        user_agent=user_agent,
    )
    return conn, list_presence(session_id=session_id), get_session(session_id)


def close_connection(*, connection_id: str, code: int | None, reason: str) -> None:
    """Close a connection record; the last one of a client_id makes it leave with `reason`."""
    now = timezone.now()
    with transaction.atomic():
        try:
            conn = Connection.objects.get(pk=connection_id)
        except Connection.DoesNotExist:
            return
        _lock_session(conn.session_id)
        updated = Connection.objects.filter(pk=connection_id, closed_at__isnull=True).update(
            closed_at=now, close_code=code, close_reason=reason
        )
        if not updated:
            return  # already closed (e.g. reaped) — never emit a second leave
        author = Author(kind=conn.kind, id=conn.client_id, name=conn.name)
        inputs = []
        if conn.counts_for_presence and not _is_member(conn.session_id, conn.client_id, now):
            inputs.append(_presence_event(et.PRESENCE_LEAVE, author, reason=reason))
        inputs.append(
            EventInput(
                et.CONNECTION_CLOSED,
                {
                    "connection_id": conn.id,
                    "client_id": conn.client_id,
                    "code": code,
                    "reason": reason,
                    "last_received_seq": conn.last_received_seq,
                },
            )
        )
        append_events(session_id=conn.session_id, author=author, events=inputs, system=True)


def record_delivery_position(*, connection_id: str, seq: int) -> None:
    """Keep a connection's last acknowledged seq (for the diagnostics view); monotonic."""
    Connection.objects.filter(pk=connection_id, closed_at__isnull=True).exclude(
        last_received_seq__gte=seq
    ).update(last_received_seq=seq, last_received_at=timezone.now())


def set_presence_lease(
    *,
    session_id: str,
    author: Author,
    ttl: float,
    state: dict[str, Any] | None = None,
) -> PresenceLease | None:
    """Enter (or renew) presence for `ttl` seconds; `ttl == 0` leaves at once."""
    now = timezone.now()
    with transaction.atomic():
        _lock_session(session_id)
        lapsed = PresenceLease.objects.filter(
            session_id=session_id, client_id=author.id, expires_at__lte=now
        ).first()
        if lapsed is not None:
            # Expired but not reaped yet: close it out first, so every enter has its leave.
            lapsed.delete()
            if not _is_member(session_id, author.id, now):
                _leave(session_id, author, et.LEAVE_TIMEOUT)
        was_member = _is_member(session_id, author.id, now)
        if ttl <= 0:
            PresenceLease.objects.filter(session_id=session_id, client_id=author.id).delete()
            if was_member and not _is_member(session_id, author.id, now):
                _leave(session_id, author, et.LEAVE_CLOSED)
            return None
        renewal: dict[str, Any] = {
            "kind": author.kind,
            "name": author.name,
            "expires_at": now + timedelta(seconds=ttl),
        }
        if state is not None:
            renewal["state"] = state  # a renewal without state keeps the last one
        lease, _created = PresenceLease.objects.update_or_create(
            session_id=session_id,
            client_id=author.id,
            defaults=renewal,
            create_defaults={
                "kind": author.kind,
                "name": author.name,
                "state": state,
                "since": now,
                "expires_at": now + timedelta(seconds=ttl),
            },
        )
        inputs = []
        if not was_member:
            inputs.append(_presence_event(et.PRESENCE_ENTER, author))
        elif state is not None:
            inputs.append(_presence_event(et.PRESENCE_UPDATE, author, state=state))
        if inputs:
            append_events(session_id=session_id, author=author, events=inputs, system=True)
        return lease


def heartbeat_worker(*, worker_id: str, channel: str = "") -> None:
    now = timezone.now()
    Worker.objects.update_or_create(
        pk=worker_id,
        defaults={"heartbeat_at": now, "channel": channel},
        create_defaults={
            "heartbeat_at": now,
            "channel": channel,
            "hostname": socket.gethostname()[:200],
            "pid": os.getpid(),
        },
    )


def reap_presence(*, now: datetime | None = None, worker_timeout: float | None = None) -> int:
    """Expire leases and the connections of workers that stopped heart-beating.

    Any surviving worker may run this; each expiry is a `presence.leave` with reason `timeout`
    exactly once, because closing is a conditional update under the session lock.
    """
    now = now or timezone.now()
    timeout = worker_timeout or settings.BATON_WORKER_TIMEOUT_SECONDS
    reaped = 0
    dead_workers = list(
        Worker.objects.filter(heartbeat_at__lt=now - timedelta(seconds=timeout)).values_list(
            "id", flat=True
        )
    )
    if dead_workers:
        stale = Connection.objects.filter(
            worker_id__in=dead_workers, closed_at__isnull=True
        ).values_list("id", flat=True)
        for connection_id in list(stale):
            close_connection(connection_id=connection_id, code=None, reason=et.LEAVE_TIMEOUT)
            reaped += 1
        Worker.objects.filter(pk__in=dead_workers).exclude(
            pk__in=Connection.objects.filter(closed_at__isnull=True).values("worker_id")
        ).delete()
    for lease in list(PresenceLease.objects.filter(expires_at__lte=now)):
        with transaction.atomic():
            _lock_session(lease.session_id)
            deleted, _ = PresenceLease.objects.filter(pk=lease.pk, expires_at__lte=now).delete()
            if not deleted or _is_member(lease.session_id, lease.client_id, now):
                continue
            member = Author(kind=lease.kind, id=lease.client_id, name=lease.name)
            _leave(lease.session_id, member, et.LEAVE_TIMEOUT)
            reaped += 1
    return reaped


# --------------------------------------------------------------------------- keys


def hash_agent_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_agent_key(*, name: str) -> tuple[AgentKey, str]:
    """Create a key and return it with its raw value, which is never stored or shown again."""
    name = name.strip()
    if not name or len(name) > 100:
        raise invalid("An agent key needs a name of 1 to 100 characters.")
    raw = f"bk_{secrets.token_urlsafe(32)}"
    try:
        with transaction.atomic():
            key = AgentKey.objects.create(name=name, prefix=raw[:10], key_hash=hash_agent_key(raw))
    except IntegrityError:
        raise conflict("conflict", f"An agent key named {name!r} already exists.") from None
    return key, raw
