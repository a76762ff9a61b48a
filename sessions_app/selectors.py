"""Reads. Everything that looks at sessions, the event log, messages and presence."""

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models import F, Func, Q, QuerySet, TextField
from django.utils import timezone

from sessions_app import event_types as et
from sessions_app.errors import BatonError, not_found
from sessions_app.models import (
    AgentKey,
    Connection,
    Event,
    Message,
    PresenceLease,
    Session,
    Worker,
)
from sessions_app.wire import EVENT_WIRE_FIELDS, event_wire, format_ts, wire_json

MAX_TYPE_PATTERNS = 20


def parse_type_patterns(raw: Any) -> tuple[str, ...] | None:
    """Validate type globs (`message.*`, `progress.*`, `signal.cancel`); None means all types."""
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise BatonError("invalid_filter", "'types' must be a list of type patterns.", 400)
    if len(raw) > MAX_TYPE_PATTERNS or any(len(p) > 100 for p in raw):
        raise BatonError("invalid_filter", f"At most {MAX_TYPE_PATTERNS} type patterns.", 400)
    for pattern in raw:
        if "*" in pattern and not (pattern == "*" or pattern.endswith(".*")):
            raise BatonError(
                "invalid_filter", f"Bad pattern {pattern!r}: use 'x.*' or an exact type.", 400
            )
    if "*" in raw:
        return None
    return tuple(raw)


def type_matcher(patterns: Sequence[str] | None):
    """A fast predicate for the live path: exact types plus `prefix.*` families."""
    if patterns is None:
        return None
    exact = frozenset(p for p in patterns if not p.endswith(".*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))

    def matches(event_type: str) -> bool:
        return event_type in exact or event_type.startswith(prefixes)

    return matches


def _type_q(patterns: Sequence[str] | None) -> Q:
    if patterns is None:
        return Q()
    q = Q(type__in=[p for p in patterns if not p.endswith(".*")])
    for p in patterns:
        if p.endswith(".*"):
            q |= Q(type__startswith=p[:-1])
    return q


def get_session(session_id: str) -> Session:
    try:
        return Session.objects.get(pk=session_id)
    except Session.DoesNotExist:
        raise not_found() from None


def get_head(session_id: str) -> int | None:
    return Session.objects.filter(pk=session_id).values_list("last_seq", flat=True).first()


def get_positions(session_id: str) -> tuple[int, int] | None:
    """(head, compacted_through) of a session, or None if there is no such session."""
    return (
        Session.objects.filter(pk=session_id).values_list("last_seq", "compacted_through").first()
    )


def get_compacted_snapshot(*, session_id: str, through: int) -> list[Message]:
    """The messages created at or before `through`, a compacted prefix: they are final and
    unchanged since, so their current state is their state as of `through`."""
    return list(
        Message.objects.filter(session_id=session_id, created_seq__lte=through).order_by(
            "created_seq"
        )
    )


def get_heads(session_ids: Sequence[str]) -> dict[str, int]:
    return dict(Session.objects.filter(pk__in=list(session_ids)).values_list("id", "last_seq"))


def list_sessions(*, status: str | None = None, limit: int = 100) -> list[Session]:
    qs = Session.objects.all()
    if status:
        if status not in et.SESSION_STATUSES:
            raise BatonError("invalid_filter", f"Unknown status {status!r}.", 400)
        qs = qs.filter(status=status)
    return list(qs.order_by("-created_at")[:limit])


def _history(
    *, session_id: str, after: int, upto: int, types: Sequence[str] | None, include_private: bool
) -> QuerySet[Event]:
    """The visible events of (after, upto] matching `types`, in seq order."""
    qs = Event.objects.filter(session_id=session_id, seq__gt=after, seq__lte=upto)
    if not include_private:
        qs = qs.filter(visibility=et.VISIBILITY_ALL)
    return qs.filter(_type_q(types)).order_by("seq")


def list_wire_events(
    *,
    session_id: str,
    after: int,
    upto: int,
    limit: int,
    types: Sequence[str] | None = None,
    include_private: bool = False,
) -> list[dict[str, Any]]:
    """History as wire dicts, without building model instances (REST history, export)."""
    rows = _history(
        session_id=session_id,
        after=after,
        upto=upto,
        types=types,
        include_private=include_private,
    ).values_list(*EVENT_WIRE_FIELDS)[:limit]
    return [event_wire(*row) for row in rows]


class EventWireJSON(Func):
    """An event's wire JSON (the content of `wire.event_wire`), as text built by the database.

    SQLite: `json_object()`, the cheapest there. Postgres: a `||` chain, which keeps
    `event_wire`'s compact separators (`json_build_object` writes `"seq" : 1`) and is cheaper
    than `jsonb_build_object`. The timestamp is truncated to milliseconds exactly like
    `format_ts`: SQLite stores a DateTimeField as naive UTC text 'YYYY-MM-DD HH:MM:SS[.ffffff]'
    and is cut, not parsed (`strftime('%f')` rounds); Postgres' `to_char(... 'MS')` truncates.
    """

    output_field = TextField()
    vendors = frozenset({"sqlite", "postgresql"})

    def __init__(self) -> None:
        super().__init__(*(F(field) for field in EVENT_WIRE_FIELDS))

    def _compile_columns(self, compiler: Any) -> dict[str, str]:
        """The SQL of each (plain column) source, by field name."""
        columns: dict[str, str] = {}
        for name, expression in zip(EVENT_WIRE_FIELDS, self.get_source_expressions(), strict=True):
            sql, params = compiler.compile(expression)
            assert not params
            columns[name] = sql
        return columns

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        c = self._compile_columns(compiler)
        at = c["created_at"]
        ts = (
            f"substr({at}, 1, 10) || 'T' || substr({at}, 12, 8) || '.' || "
            f"substr(substr({at}, 21, 3) || '000', 1, 3) || 'Z'"
        )
        sql = (
            f"json_object('seq', {c['seq']}, 'id', {c['id']}, 'session', {c['session_id']}, "
            f"'type', {c['type']}, 'message_id', {c['message_id']}, 'author', json_object("
            f"'kind', {c['author_kind']}, 'id', {c['author_id']}, 'name', {c['author_name']}), "
            f"'data', json({c['data']}), 'visibility', {c['visibility']}, 'ts', {ts})"
        )
        return sql, []

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        c = self._compile_columns(compiler)

        def quote(name: str) -> str:
            return f"coalesce(to_json({c[name]})::text, 'null')"

        pieces = [
            ('{"seq":', f"{c['seq']}::text"),
            (',"id":', quote("id")),
            (',"session":', quote("session_id")),
            (',"type":', quote("type")),
            (',"message_id":', quote("message_id")),
            (',"author":{"kind":', quote("author_kind")),
            (',"id":', quote("author_id")),
            (',"name":', quote("author_name")),
            ('},"data":', f"{c['data']}::text"),
            (',"visibility":', quote("visibility")),
            (
                ',"ts":"',
                f"""to_char({c["created_at"]} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS')""",
            ),
            ('Z"}', None),
        ]
        chain = [f"'{literal}'" + (f" || {sql}" if sql else "") for literal, sql in pieces]
        return " || ".join(chain), []


def list_event_json(
    *,
    session_id: str,
    after: int,
    upto: int,
    limit: int,
    types: Sequence[str] | None = None,
    include_private: bool = False,
) -> list[tuple[int, str, str, str]]:
    """History as (seq, type, visibility, wire JSON text): the replay hot path.

    The database builds each event's JSON (`EventWireJSON`), so a page costs no per-event
    Python decoding or encoding — that was most of a 10k-event resume. Same rows and order as
    `list_wire_events`; on another database vendor, the JSON is encoded here instead.
    """
    qs = _history(
        session_id=session_id,
        after=after,
        upto=upto,
        types=types,
        include_private=include_private,
    )
    if connections[qs.db].vendor in EventWireJSON.vendors:
        return list(
            qs.annotate(wire_json=EventWireJSON()).values_list(
                "seq", "type", "visibility", "wire_json"
            )[:limit]
        )
    rows = [event_wire(*row) for row in qs.values_list(*EVENT_WIRE_FIELDS)[:limit]]
    return [
        (
            r["seq"],
            r["type"],
            r["visibility"],
            wire_json(r),
        )
        for r in rows
    ]


def wire_events_between(*, session_id: str, after: int, upto: int) -> list[dict[str, Any]]:
    """Every event in (after, upto], unfiltered: what the hub uses to repair a hole."""
    return list_wire_events(
        session_id=session_id, after=after, upto=upto, limit=upto - after, include_private=True
    )


def get_message_snapshot(*, session_id: str) -> tuple[int, list[Message]]:
    """Messages and the seq they are current as of, read under the session lock so they agree."""
    with transaction.atomic():
        try:
            head = (
                Session.objects.select_for_update()
                .values_list("last_seq", flat=True)
                .get(pk=session_id)
            )
        except Session.DoesNotExist:
            raise not_found() from None
        messages = list(Message.objects.filter(session_id=session_id).order_by("created_seq"))
    return head, messages


def list_presence(*, session_id: str) -> list[dict[str, Any]]:
    """The live member set: client_ids with an open counted connection or an unexpired lease."""
    members: dict[str, dict[str, Any]] = {}
    for conn in Connection.objects.filter(
        session_id=session_id, closed_at__isnull=True, counts_for_presence=True
    ).order_by("opened_at"):
        member = members.setdefault(
            conn.client_id,
            {
                "client_id": conn.client_id,
                "kind": conn.kind,
                "name": conn.name,
                "connections": 0,
                "since": format_ts(conn.opened_at),
                "state": None,
            },
        )
        member["connections"] += 1
    for lease in PresenceLease.objects.filter(session_id=session_id, expires_at__gt=timezone.now()):
        member = members.setdefault(
            lease.client_id,
            {
                "client_id": lease.client_id,
                "kind": lease.kind,
                "name": lease.name,
                "connections": 0,
                "since": format_ts(lease.since),
                "state": None,
            },
        )
        member["state"] = lease.state
        member["lease_expires_at"] = format_ts(lease.expires_at)
    return list(members.values())


def find_agent_key(*, key_hash: str) -> AgentKey | None:
    return AgentKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()


def list_connections(*, session_id: str, limit: int = 200) -> list[Connection]:
    return list(Connection.objects.filter(session_id=session_id).order_by("-opened_at")[:limit])


def list_streaming_messages(*, session_id: str, author_kind: str) -> list[Message]:
    return list(
        Message.objects.filter(
            session_id=session_id, status=et.MESSAGE_STREAMING, author_kind=author_kind
        ).order_by("created_seq")
    )


def get_committing_worker(*, now: datetime | None = None) -> Worker | None:
    """The worker that commits everyone's streaming publishes: the oldest one with a channel
    whose heartbeat is fresh. Every worker computes the same answer from the same rows, and it
    stays put while that worker lives (a newcomer is younger)."""
    now = now or timezone.now()
    fresh = now - timedelta(seconds=settings.BATON_WORKER_TIMEOUT_SECONDS)
    return (
        Worker.objects.filter(heartbeat_at__gte=fresh)
        .exclude(channel="")
        .order_by("started_at", "id")
        .first()
    )
