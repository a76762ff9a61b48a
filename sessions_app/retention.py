"""Retention: fold old token streams into their messages, and delete old closed sessions.

Compaction works on a *prefix* of a session's log, (compacted_through, C]: C is the largest seq
such that every event up to C is older than the cutoff and every message created up to C is
final (complete, cancelled or failed) with no event after C. Inside that prefix each message's
`message.append` / `message.update` events are deleted and its `message.create` event is
rewritten to carry the final content (`data.compacted: true`); `message.complete` and every
other event stay. So a replay from 0 still rebuilds every message exactly, and a resume from
inside the prefix gets a snapshot of the prefix's messages as of C (their current state, as
nothing touched them after C) and then every event after C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.db.models import Min, Q
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from sessions_app import event_types as et
from sessions_app.models import Event, Message, Session

FOLDED_TYPES = (et.MESSAGE_APPEND, et.MESSAGE_UPDATE)
CHUNK = 500


def parse_cutoff(raw: str, *, now: datetime | None = None) -> datetime:
    """`30d`, `12h`, `90m` (ago) or an ISO date / datetime (UTC when naive)."""
    now = now or timezone.now()
    match = re.fullmatch(r"(\d+)([dhm])", raw.strip())
    if match:
        amount, unit = int(match[1]), match[2]
        return now - timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: amount})
    parsed = parse_datetime(raw)
    if parsed is None:
        day = parse_date(raw)
        if day is None:
            raise ValueError(f"Not a duration (30d, 12h, 90m) or an ISO date: {raw!r}")
        parsed = datetime(day.year, day.month, day.day)
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    return parsed


@dataclass
class CompactionResult:
    session_id: str
    through: int
    messages: int = 0
    events_deleted: int = 0


def compactable_through(session: Session, cutoff: datetime) -> int:
    """The end C of the prefix that may be compacted now (see the module docstring)."""
    start = session.compacted_through
    first_recent = (
        Event.objects.filter(session_id=session.id, seq__gt=start, created_at__gte=cutoff)
        .order_by("seq")
        .values_list("seq", flat=True)
        .first()
    )
    through = session.last_seq if first_recent is None else first_recent - 1
    while through > start:
        # A message still open at `through` (streaming, or changed after it) must stay whole.
        open_from = Message.objects.filter(
            session_id=session.id, created_seq__gt=start, created_seq__lte=through
        ).filter(Q(status=et.MESSAGE_STREAMING) | Q(last_seq__gt=through))
        first_open = open_from.aggregate(first=Min("created_seq"))["first"]
        if first_open is None:
            break
        through = first_open - 1
    return max(through, start)


def compact_session(*, session_id: str, cutoff: datetime) -> CompactionResult:
    with transaction.atomic():
        # The row lock orders this with appends; it does not touch anything they write.
        session = Session.objects.select_for_update().get(pk=session_id)
        start = session.compacted_through
        through = compactable_through(session, cutoff)
        result = CompactionResult(session_id=session_id, through=through)
        if through <= start:
            return result
        folded = Event.objects.filter(
            session_id=session_id, seq__gt=start, seq__lte=through, type__in=FOLDED_TYPES
        )
        message_ids = sorted(set(folded.values_list("message_id", flat=True)))
        for i in range(0, len(message_ids), CHUNK):
            chunk = message_ids[i : i + CHUNK]
            messages = Message.objects.filter(session_id=session_id, message_id__in=chunk)
            creates = {
                e.message_id: e
                for e in Event.objects.filter(
                    session_id=session_id, type=et.MESSAGE_CREATE, message_id__in=chunk
                )
            }
            for message in messages:
                create = creates[message.message_id]
                create.data = {**create.data, "content": message.content, "compacted": True}
                if message.parts is not None:
                    create.data["parts"] = message.parts
            Event.objects.bulk_update(creates.values(), ["data"])
            deleted, _ = folded.filter(message_id__in=chunk).delete()
            result.messages += len(creates)
            result.events_deleted += deleted
        Session.objects.filter(pk=session_id).update(compacted_through=through)
    return result


def compact_sessions(*, cutoff: datetime) -> list[CompactionResult]:
    """Compact every session with something older than the cutoff, one transaction each."""
    candidates = (
        Event.objects.filter(created_at__lt=cutoff, type__in=FOLDED_TYPES)
        .values_list("session_id", flat=True)
        .distinct()
    )
    results = []
    for session_id in list(candidates):
        result = compact_session(session_id=session_id, cutoff=cutoff)
        if result.events_deleted:
            results.append(result)
    return results


def purge_sessions(*, closed_before: datetime) -> list[str]:
    """Delete closed sessions untouched since `closed_before`, with everything they own."""
    ids = list(
        Session.objects.filter(status=et.STATUS_CLOSED, updated_at__lt=closed_before).values_list(
            "id", flat=True
        )
    )
    for session_id in ids:
        with transaction.atomic():
            # Events first, in bounded statements; the cascade then has little left to do.
            while True:
                pks = list(
                    Event.objects.filter(session_id=session_id).values_list("pk", flat=True)[:5000]
                )
                if not pks:
                    break
                Event.objects.filter(pk__in=pks).delete()
            Session.objects.filter(pk=session_id).delete()
    return ids
