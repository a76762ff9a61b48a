"""Handover writes: request, claim, release, close.

Each transition is one event appended through `sessions_app.services.append_events`, whose
locked transaction enforces the state machine (two claims at once: exactly one wins). The
`Handover` row is bookkeeping for the queue's audit trail, written in the same transaction. The
console is poked after commit through the channel-layer group `baton.console`.
"""

import logging
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.utils import timezone

from handover.models import Handover
from sessions_app import event_types as et
from sessions_app.errors import invalid
from sessions_app.identity import SYSTEM, Author
from sessions_app.models import Event
from sessions_app.selectors import list_streaming_messages
from sessions_app.services import AppendResult, EventInput, append_events

log = logging.getLogger(__name__)

CONSOLE_GROUP = "baton.console"
CONSOLE_MESSAGE = "console.changed"
MAX_REASON = 500
MAX_SUMMARY = 10_000
_TRANSITION_TYPES = (
    et.HANDOVER_REQUESTED,
    et.HANDOVER_CLAIMED,
    et.HANDOVER_RELEASED,
    et.SESSION_CLOSED,
)


def notify_console(session_id: str, change: str) -> None:
    """Tell every console socket, in every process, that the queue may have changed.

    Best effort: consoles also re-read the queue every few seconds, so a lost poke only delays.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(
            CONSOLE_GROUP, {"type": CONSOLE_MESSAGE, "session": session_id, "change": change}
        )
    except Exception:
        log.warning("console notification failed", exc_info=True)


def _notify_after_commit(session_id: str, change: str) -> None:
    transaction.on_commit(partial(notify_console, session_id, change))


def _open_handover(session_id: str) -> Handover | None:
    return (
        Handover.objects.select_for_update()
        .filter(session_id=session_id, resolved_at__isnull=True)
        .order_by("-requested_at")
        .first()
    )


@transaction.atomic
def request_handover(
    *, session_id: str, author: Author, reason: str = "", summary: str = ""
) -> AppendResult:
    """A user or agent asks for a human: `handover.requested`, and the session joins the queue."""
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise invalid(f"'reason' must be a string of at most {MAX_REASON} characters.")
    if not isinstance(summary, str) or len(summary) > MAX_SUMMARY:
        raise invalid(f"'summary' must be a string of at most {MAX_SUMMARY} characters.")
    data: dict[str, Any] = {"reason": reason}
    if summary:
        data["summary"] = summary
    (result,) = append_events(
        session_id=session_id,
        author=author,
        events=[EventInput(et.HANDOVER_REQUESTED, data)],
    )
    Handover.objects.create(
        session_id=session_id,
        reason=reason,
        summary=summary,
        requested_by=author.as_dict(),
        requested_at=timezone.now(),
        requested_seq=result.seq,
    )
    _notify_after_commit(session_id, "requested")
    return result


@transaction.atomic
def claim(*, session_id: str, operator: Author, user_id: int | None = None) -> AppendResult:
    """An operator takes control; a second claimer gets 409 `already_claimed` from the core."""
    (result,) = append_events(
        session_id=session_id,
        author=operator,
        events=[EventInput(et.HANDOVER_CLAIMED, {"operator": operator.id, "name": operator.name})],
        system=True,
    )
    # The bot may not publish again until released, so its half-streamed replies would stay
    # `streaming` forever: end them here, as the server, in the claim's transaction.
    unfinished = list_streaming_messages(session_id=session_id, author_kind=et.KIND_AGENT)
    if unfinished:
        append_events(
            session_id=session_id,
            author=SYSTEM,
            events=[
                EventInput(
                    et.MESSAGE_COMPLETE,
                    {"status": "cancelled", "reason": "An operator took over."},
                    message_id=m.message_id,
                )
                for m in unfinished
            ],
            system=True,
        )
    now = timezone.now()
    handover = _open_handover(session_id)
    if handover is None:
        # Requested through the generic event path (SDKs), or claimed without a request.
        handover = _handover_from_log(session_id, fallback_seq=result.seq)
    handover.claimed_by_id = user_id
    handover.claimed_at = now
    handover.save()
    _notify_after_commit(session_id, "claimed")
    return result


@transaction.atomic
def release(*, session_id: str, operator: Author, reason: str = "") -> AppendResult:
    """Hand the session back to the agent: `handover.released`, status `active`."""
    data = {"operator": operator.id, **({"reason": reason} if reason else {})}
    return _end_handover(session_id, operator, et.HANDOVER_RELEASED, data, "released")


@transaction.atomic
def close(*, session_id: str, author: Author, reason: str = "") -> AppendResult:
    """Close the session for good: `session.closed`; every later publish gets `session_closed`."""
    data = {"reason": reason} if reason else {}
    return _end_handover(session_id, author, et.SESSION_CLOSED, data, "closed")


def _end_handover(
    session_id: str, author: Author, event_type: str, data: dict[str, Any], outcome: str
) -> AppendResult:
    """Append the transition event and resolve the open Handover row with `outcome`."""
    (result,) = append_events(
        session_id=session_id,
        author=author,
        events=[EventInput(event_type, data)],
        system=True,
    )
    Handover.objects.filter(session_id=session_id, resolved_at__isnull=True).update(
        resolved_at=timezone.now(), outcome=outcome
    )
    _notify_after_commit(session_id, outcome)
    return result


def _handover_from_log(session_id: str, *, fallback_seq: int) -> Handover:
    """A Handover row for a request that was published as a plain event (or never made)."""
    last = (
        Event.objects.filter(
            session_id=session_id, seq__lt=fallback_seq, type__in=_TRANSITION_TYPES
        )
        .order_by("-seq")
        .first()
    )
    requested = last if last is not None and last.type == et.HANDOVER_REQUESTED else None
    if requested is None:
        return Handover(
            session_id=session_id,
            reason="",
            requested_by={},
            requested_at=timezone.now(),
            requested_seq=fallback_seq,
        )
    return Handover(
        session_id=session_id,
        reason=str(requested.data.get("reason") or "")[:MAX_REASON],
        summary=str(requested.data.get("summary") or ""),
        requested_by={
            "kind": requested.author_kind,
            "id": requested.author_id,
            "name": requested.author_name,
        },
        requested_at=requested.created_at,
        requested_seq=requested.seq,
    )
