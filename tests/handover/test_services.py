"""Handover services on the database: every transition is an event; the claim race has one
winner; the Handover rows follow the log."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection

from handover import services
from handover.models import Handover
from sessions_app import event_types as et
from sessions_app.errors import BatonError
from sessions_app.identity import Author
from sessions_app.models import Event, Session
from sessions_app.services import EventInput, append_events
from tests.handover.conftest import AGENT, OLIVIA, USER, make_operator


def types(session_id: str) -> list[str]:
    return list(
        Event.objects.filter(session_id=session_id).order_by("seq").values_list("type", flat=True)
    )


def status(session_id: str) -> tuple[str, Any]:
    s = Session.objects.get(pk=session_id)
    return s.status, s.controller


def say(session_id: str, author: Author, content: str = "hi") -> None:
    role = {"agent": "assistant", "user": "user", "operator": "operator"}[author.kind]
    append_events(
        session_id=session_id,
        author=author,
        events=[
            EventInput(et.MESSAGE_CREATE, {"role": role, "content": content, "status": "complete"})
        ],
    )


@pytest.mark.django_db
def test_request_appends_the_event_and_a_handover_row(session):
    result = services.request_handover(
        session_id=session.id, author=AGENT, reason="refund", summary="Wants money back"
    )
    event = Event.objects.get(session=session, seq=result.seq)
    assert (event.type, event.author_kind, event.author_id) == (
        et.HANDOVER_REQUESTED,
        "agent",
        "test-agent",
    )
    assert event.data == {"reason": "refund", "summary": "Wants money back"}
    row = Handover.objects.get(session=session)
    assert (row.reason, row.summary, row.requested_seq) == ("refund", "Wants money back", 1)
    assert row.requested_by == AGENT.as_dict()
    assert status(session.id) == (et.STATUS_AWAITING_HUMAN, None)


@pytest.mark.django_db
def test_a_second_request_is_a_conflict_and_stores_nothing(session):
    services.request_handover(session_id=session.id, author=USER, reason="a")
    with pytest.raises(BatonError) as err:
        services.request_handover(session_id=session.id, author=AGENT, reason="b")
    assert (err.value.code, err.value.status) == ("handover_pending", 409)
    assert Handover.objects.count() == 1
    assert types(session.id) == [et.HANDOVER_REQUESTED]


@pytest.mark.django_db
def test_operators_cannot_request_and_bad_input_is_refused(session):
    with pytest.raises(BatonError) as err:
        services.request_handover(session_id=session.id, author=OLIVIA, reason="x")
    assert err.value.status == 403
    with pytest.raises(BatonError) as err:
        services.request_handover(session_id=session.id, author=USER, reason="x" * 501)
    assert err.value.code == "invalid_event"
    assert types(session.id) == []
    assert not Handover.objects.exists()


@pytest.mark.django_db
def test_full_cycle_claim_release_close(session, operator_user):
    say(session.id, AGENT, "Let me look")
    services.request_handover(session_id=session.id, author=USER, reason="human please")
    services.claim(session_id=session.id, operator=OLIVIA, user_id=operator_user.pk)
    assert status(session.id) == (et.STATUS_WITH_HUMAN, OLIVIA.as_dict())
    claimed = Event.objects.get(session=session, type=et.HANDOVER_CLAIMED)
    assert (claimed.author_kind, claimed.author_id) == ("operator", "olivia")
    row = Handover.objects.get(session=session)
    assert row.claimed_by == operator_user and row.claimed_at is not None

    # The agent is refused while the human holds the session; the operator talks.
    with pytest.raises(BatonError) as err:
        say(session.id, AGENT, "I am still here")
    assert (err.value.code, err.value.status) == ("controlled_by_human", 409)
    say(session.id, OLIVIA, "Hello, I am Olivia")

    services.release(session_id=session.id, operator=OLIVIA, reason="resolved")
    assert status(session.id) == (et.STATUS_ACTIVE, None)
    say(session.id, AGENT, "Back to me")  # the agent may publish again
    row.refresh_from_db()
    assert (row.outcome, row.resolved_at is not None) == ("released", True)

    services.close(session_id=session.id, author=AGENT, reason="done")
    assert status(session.id) == (et.STATUS_CLOSED, None)
    with pytest.raises(BatonError) as err:
        say(session.id, USER)
    assert err.value.code == "session_closed"
    assert types(session.id) == [
        et.MESSAGE_CREATE,
        et.HANDOVER_REQUESTED,
        et.HANDOVER_CLAIMED,
        et.MESSAGE_CREATE,
        et.HANDOVER_RELEASED,
        et.MESSAGE_CREATE,
        et.SESSION_CLOSED,
    ]


@pytest.mark.django_db
def test_claim_after_an_sdk_request_builds_the_row_from_the_log(session):
    # SDKs publish handover.requested as a plain event: no Handover row yet.
    append_events(
        session_id=session.id,
        author=USER,
        events=[EventInput(et.HANDOVER_REQUESTED, {"reason": "sdk", "summary": "s"})],
    )
    services.claim(session_id=session.id, operator=OLIVIA)
    row = Handover.objects.get(session=session)
    assert (row.reason, row.summary, row.requested_seq) == ("sdk", "s", 1)
    assert row.requested_by == USER.as_dict()
    services.release(session_id=session.id, operator=OLIVIA)
    # A later claim without a request does not reuse the old request.
    services.claim(session_id=session.id, operator=OLIVIA)
    latest = Handover.objects.order_by("-id").first()
    assert latest is not None and (latest.reason, latest.requested_seq) == (
        "",
        4,
    )  # the claim itself


@pytest.mark.django_db
def test_release_and_close_refused_in_the_wrong_state(session):
    with pytest.raises(BatonError) as err:
        services.release(session_id=session.id, operator=OLIVIA)
    assert (err.value.code, err.value.status) == ("not_claimed", 409)
    services.close(session_id=session.id, author=OLIVIA)
    for call in (
        lambda: services.close(session_id=session.id, author=OLIVIA),
        lambda: services.claim(session_id=session.id, operator=OLIVIA),
        lambda: services.request_handover(session_id=session.id, author=USER),
    ):
        with pytest.raises(BatonError) as err:
            call()
        assert err.value.status == 409
    assert types(session.id) == [et.SESSION_CLOSED]


@pytest.mark.django_db
def test_unknown_session_is_not_found(db):
    with pytest.raises(BatonError) as err:
        services.claim(session_id="ses_nope", operator=OLIVIA)
    assert err.value.status == 404
    assert not Handover.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_operators_claiming_at_once_exactly_one_wins(session):
    """Real threads, each with its own database connection (on Postgres, row locks)."""
    services.request_handover(session_id=session.id, author=USER, reason="race")
    users = [make_operator(f"op{i}") for i in range(4)]
    barrier = threading.Barrier(len(users))
    outcomes: dict[str, str] = {}

    def attempt(user: Any) -> None:
        operator = Author(kind="operator", id=user.username, name=user.username)
        try:
            barrier.wait(5)
            services.claim(session_id=session.id, operator=operator, user_id=user.pk)
            outcomes[user.username] = "won"
        except BatonError as exc:
            outcomes[user.username] = exc.code
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [name for name, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert sorted(o for o in outcomes.values() if o != "won") == ["already_claimed"] * 3
    claimed = Event.objects.filter(session=session, type=et.HANDOVER_CLAIMED)
    assert [e.author_id for e in claimed] == winners
    assert status(session.id)[1]["id"] == winners[0]
    assert Handover.objects.get(session=session).claimed_by.username == winners[0]


@pytest.mark.django_db(transaction=True)
async def test_transitions_poke_the_console_group_after_commit(session):
    """On the in-memory layer and on Redis pub/sub alike."""
    import asyncio

    from channels.db import database_sync_to_async
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel("test.console.")
    await layer.group_add(services.CONSOLE_GROUP, channel)
    try:
        await database_sync_to_async(services.request_handover)(
            session_id=session.id, author=USER, reason="x"
        )
        message = await asyncio.wait_for(layer.receive(channel), 5)
        assert message == {
            "type": services.CONSOLE_MESSAGE,
            "session": session.id,
            "change": "requested",
        }
    finally:
        await layer.group_discard(services.CONSOLE_GROUP, channel)
        if hasattr(layer, "flush"):
            await layer.flush()


def test_claim_ends_the_bots_half_streamed_reply(session):
    """The bot cannot publish while a human holds the session, so the claim completes its
    streaming messages (cancelled, by the server) instead of leaving them streaming forever."""
    from handover.services import claim
    from sessions_app.identity import Author
    from sessions_app.models import Event, Message
    from sessions_app.services import EventInput, append_events

    bot = Author(kind="agent", id="test-agent", name="test-agent")
    append_events(
        session_id=session.id,
        author=bot,
        events=[
            EventInput("message.create", {"role": "assistant"}, message_id="half"),
            EventInput("message.append", {"delta": "Let me che"}, message_id="half"),
            EventInput(
                "message.create",
                {"role": "assistant", "status": "complete", "content": "done"},
                message_id="whole",
            ),
        ],
    )
    claim(session_id=session.id, operator=Author(kind="operator", id="olivia", name="Olivia"))
    half = Message.objects.get(session=session, message_id="half")
    assert (half.status, half.reason, half.content) == (
        "cancelled",
        "An operator took over.",
        "Let me che",
    )
    assert Message.objects.get(session=session, message_id="whole").status == "complete"
    last = Event.objects.filter(session=session).order_by("-seq")[0]
    assert (last.type, last.message_id, last.author_kind) == ("message.complete", "half", "system")
