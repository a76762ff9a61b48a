"""Group commit's fast lane: messages created, streamed and completed, and plain events, in
bulk, with every rule of the general path (seqs, refusals, idempotency, materialization,
fan-out after commit) unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from sessions_app import event_types as et
from sessions_app import services
from sessions_app.errors import BatonError
from sessions_app.hub import get_hub
from sessions_app.identity import Author
from sessions_app.models import Event, Message, Session
from sessions_app.services import (
    AppendRequest,
    AppendResult,
    EventInput,
    append_events,
    append_many,
)

pytestmark = pytest.mark.django_db(transaction=True)

AGENT = Author(kind="agent", id="test-agent", name="Test agent")
OTHER_AGENT = Author(kind="agent", id="other-agent", name="Other agent")
OPERATOR = Author(kind="operator", id="olivia", name="Olivia")


def create(session_id: str, message_id: str, author: Author = AGENT) -> None:
    append_events(
        session_id=session_id,
        author=author,
        events=[EventInput(et.MESSAGE_CREATE, {"role": "assistant"}, message_id=message_id)],
    )


def token(
    session_id: str,
    message_id: str,
    delta: str,
    *,
    author: Author = AGENT,
    client_ref: str | None = None,
) -> AppendRequest:
    return AppendRequest(
        session_id=session_id,
        author=author,
        events=[EventInput(et.MESSAGE_APPEND, {"delta": delta}, message_id, client_ref)],
    )


def message_event(
    session_id: str,
    event_type: str,
    message_id: str | None,
    data: dict[str, Any] | None = None,
    *,
    author: Author = AGENT,
) -> AppendRequest:
    """A `message.create` (role assistant unless given) or `message.complete` publish."""
    if event_type == et.MESSAGE_CREATE:
        data = {"role": "assistant", **(data or {})}
    return AppendRequest(
        session_id=session_id,
        author=author,
        events=[EventInput(event_type, data or {}, message_id=message_id)],
    )


def step(session_id: str, i: int, *, client_ref: str | None = None) -> AppendRequest:
    return AppendRequest(
        session_id=session_id,
        author=AGENT,
        events=[EventInput("progress.step", {"i": i}, client_ref=client_ref)],
    )


def seqs_of(outcome: list[AppendResult] | BatonError) -> list[int]:
    assert not isinstance(outcome, BatonError), outcome
    return [r.seq for r in outcome]


def stored(session_id: str) -> list[tuple[int, str, Any]]:
    return list(
        Event.objects.filter(session_id=session_id)
        .order_by("seq")
        .values_list("seq", "type", "data")
    )


def state(session_id: str) -> tuple[Any, ...]:
    """Everything a refused publish must leave untouched."""
    return (
        Session.objects.get(pk=session_id).last_seq,
        stored(session_id),
        list(
            Message.objects.filter(session_id=session_id)
            .order_by("created_seq")
            .values_list("message_id", "content", "status", "version", "last_seq")
        ),
    )


def fanned(published: list[tuple[str, list[dict[str, Any]]]], session_id: str) -> list[int]:
    return [e["seq"] for sid, events in published if sid == session_id for e in events]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every fan-out, recorded when its transaction commits (as the hub would see it)."""
    calls: list[tuple[str, list[dict[str, Any]]]] = []
    real = services.publish_after_commit

    def record(session_id: str, events: list[dict[str, Any]]) -> None:
        real(session_id, events)
        transaction.on_commit(lambda: calls.append((session_id, events)))

    monkeypatch.setattr(services, "publish_after_commit", record)
    return calls


def test_token_appends_over_sessions_and_messages(make_session, published):
    a, b, c = make_session(), make_session(), make_session()
    create(a.id, "m1")
    create(a.id, "m2")
    create(b.id, "m1")
    published.clear()
    requests = [
        token(a.id, "m1", "Hel", client_ref="r1"),
        token(b.id, "m1", "one "),
        token(a.id, "m2", "x"),
        step(c.id, 1),
        token(a.id, "m1", "lo", client_ref="r2"),
        token(b.id, "m1", "two"),
        token(a.id, "m2", "y"),
        step(c.id, 2),
    ]
    outcomes = append_many(requests)

    assert [seqs_of(o) for o in outcomes] == [[3], [2], [4], [1], [5], [3], [6], [2]]
    assert all(not r.duplicate for o in outcomes for r in o)  # type: ignore[union-attr]
    expected = {("m1", a.id): ("Hello", 3, 5), ("m2", a.id): ("xy", 3, 6)}
    expected[("m1", b.id)] = ("one two", 3, 3)
    for (message_id, session_id), (content, version, last_seq) in expected.items():
        m = Message.objects.get(session_id=session_id, message_id=message_id)
        assert (m.content, m.status, m.version, m.last_seq) == (
            content,
            et.MESSAGE_STREAMING,
            version,
            last_seq,
        )
    assert [s for s, *_ in stored(a.id)] == [1, 2, 3, 4, 5, 6]
    assert stored(c.id) == [(1, "progress.step", {"i": 1}), (2, "progress.step", {"i": 2})]
    assert {s.pk: s.last_seq for s in Session.objects.all()} == {a.id: 6, b.id: 3, c.id: 2}
    row = Event.objects.get(session=a, seq=5)
    assert (row.client_ref, row.author_kind, row.author_id, row.author_name) == (
        "r2",
        "agent",
        "test-agent",
        "Test agent",
    )
    assert row.visibility == et.VISIBILITY_ALL
    assert row.id == outcomes[4][0].id  # type: ignore[index]

    # Each session fanned out once, after commit, in seq order, in the wire shape.
    assert sorted(s for s, _ in published) == sorted([a.id, b.id, c.id])
    by_session = dict(published)
    assert [e["seq"] for e in by_session[a.id]] == [3, 4, 5, 6]
    assert [e["data"]["delta"] for e in by_session[a.id]] == ["Hel", "x", "lo", "y"]
    assert [e["seq"] for e in by_session[c.id]] == [1, 2]
    first = by_session[a.id][0]
    assert first["id"] == outcomes[0][0].id  # type: ignore[index]
    assert Event.objects.get(pk=first["id"]).seq == 3
    assert first["author"] == {"kind": "agent", "id": "test-agent", "name": "Test agent"}
    assert (first["session"], first["type"], first["message_id"]) == (a.id, "message.append", "m1")
    assert first["visibility"] == "all" and first["ts"].endswith("Z")


def _close(session: Session) -> None:
    append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(et.SESSION_CLOSED, {})],
        system=True,
    )


def _complete(session: Session) -> None:
    append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(et.MESSAGE_COMPLETE, {}, message_id="m")],
    )


def _claim(session: Session) -> None:
    append_events(
        session_id=session.id,
        author=OPERATOR,
        events=[EventInput(et.HANDOVER_CLAIMED, {"operator": OPERATOR.id})],
        system=True,
    )


@pytest.mark.parametrize(
    ("prepare", "request_for", "code", "status"),
    [
        (_close, lambda s: token(s.id, "m", "x"), "session_closed", 409),
        (_close, lambda s: step(s.id, 1), "session_closed", 409),
        (_complete, lambda s: token(s.id, "m", "x"), "message_not_streaming", 409),
        (None, lambda s: token(s.id, "m", "x", author=OTHER_AGENT), "forbidden", 403),
        (None, lambda s: token(s.id, "nope", "x"), "message_not_found", 404),
        (None, lambda s: token("ses_missing", "m", "x"), "not_found", 404),
        (_claim, lambda s: token(s.id, "m", "x"), "controlled_by_human", 409),
        (None, lambda s: message_event(s.id, et.MESSAGE_CREATE, "m"), "message_exists", 409),
        (_claim, lambda s: message_event(s.id, et.MESSAGE_CREATE, "n"), "controlled_by_human", 409),
        (
            None,
            lambda s: message_event(s.id, et.MESSAGE_CREATE, "n", {"role": "operator"}),
            "forbidden",
            403,
        ),
        (
            _complete,
            lambda s: message_event(s.id, et.MESSAGE_COMPLETE, "m"),
            "message_not_streaming",
            409,
        ),
        (
            None,
            lambda s: message_event(s.id, et.MESSAGE_COMPLETE, "m", author=OTHER_AGENT),
            "forbidden",
            403,
        ),
        (
            None,
            lambda s: message_event(s.id, et.MESSAGE_COMPLETE, "nope"),
            "message_not_found",
            404,
        ),
    ],
    ids=[
        "closed",
        "closed-plain",
        "not-streaming",
        "wrong-author",
        "missing-message",
        "missing-session",
        "with-human",
        "create-existing",
        "create-with-human",
        "create-wrong-role",
        "complete-finished",
        "complete-wrong-author",
        "complete-missing",
    ],
)
def test_a_refusal_in_a_batch_is_exact_and_its_neighbours_commit(
    make_session, published, prepare, request_for, code, status
):
    before, target, after = make_session(), make_session(), make_session()
    for s in (before, target, after):
        create(s.id, "m")
    if prepare is not None:
        prepare(target)
    untouched = state(target.id)
    published.clear()

    outcomes = append_many(
        [
            token(before.id, "m", "a", client_ref="c1"),
            request_for(target),
            token(after.id, "m", "b"),
            step(before.id, 7),
        ]
    )

    err = outcomes[1]
    assert isinstance(err, BatonError)
    assert (err.code, err.status) == (code, status), err.message
    assert state(target.id) == untouched  # no seq consumed, nothing stored
    assert seqs_of(outcomes[0]) == [2]
    assert seqs_of(outcomes[2]) == [2]
    assert seqs_of(outcomes[3]) == [3]
    assert Message.objects.get(session=before, message_id="m").content == "a"
    assert Message.objects.get(session=after, message_id="m").content == "b"
    assert {s for s, _ in published} == {before.id, after.id}
    assert [sid for sid, _ in published].count(before.id) == 1  # still one fast run
    assert fanned(published, before.id) == [2, 3]


def test_an_answer_ends_and_the_next_begins_in_the_fast_lane(make_session, published, monkeypatch):
    """An agent completing one message and opening the next (every answer does) stays in the
    fast lane, and leaves the same rows as the general path publishing the same events."""
    fast, general = make_session(), make_session()
    for s in (fast, general):
        create(s.id, "m1")
    opened = {"role": "assistant", "content": "Hi", "parts": [{"type": "text"}]}
    sequence = [
        (et.MESSAGE_APPEND, "m1", {"delta": "a"}),
        (et.MESSAGE_COMPLETE, "m1", {"status": "cancelled", "reason": "user left"}),
        (et.MESSAGE_CREATE, "m2", opened),
        (et.MESSAGE_APPEND, "m2", {"delta": " there"}),
        (et.MESSAGE_APPEND, "m2", {"delta": "!"}),
        (et.MESSAGE_COMPLETE, "m2", {}),
    ]
    for event_type, message_id, data in sequence:
        append_events(
            session_id=general.id,
            author=AGENT,
            events=[EventInput(event_type, data, message_id=message_id)],
        )
    published.clear()
    real = services.append_events
    monkeypatch.setattr(
        services, "append_events", lambda **kw: pytest.fail(f"general path: {kw}") or real(**kw)
    )
    outcomes = append_many(
        [AppendRequest(fast.id, AGENT, [EventInput(t, d, message_id=m)]) for t, m, d in sequence]
    )
    assert [seqs_of(o) for o in outcomes] == [[2], [3], [4], [5], [6], [7]]
    assert [r.message_id for o in outcomes for r in o] == ["m1", "m1", "m2", "m2", "m2", "m2"]  # type: ignore[union-attr]
    assert fanned(published, fast.id) == [2, 3, 4, 5, 6, 7]
    fields = (
        "message_id",
        "role",
        "author_kind",
        "author_id",
        "author_name",
        "content",
        "parts",
        "status",
        "reason",
        "version",
        "created_seq",
        "last_seq",
    )

    def messages(session: Session) -> list[tuple[Any, ...]]:
        return list(
            Message.objects.filter(session=session).order_by("created_seq").values_list(*fields)
        )

    assert messages(fast) == messages(general)
    assert messages(fast)[1][5:10] == ("Hi there!", [{"type": "text"}], "complete", "", 4)
    assert stored(fast.id) == stored(general.id)


@pytest.mark.parametrize(
    ("requests_for", "refused", "code"),
    [
        (  # a token still in flight after its message was completed in the same batch
            lambda s: [
                message_event(s, et.MESSAGE_COMPLETE, "m"),
                token(s, "m", "late"),
            ],
            1,
            "message_not_streaming",
        ),
        (  # a message opened complete takes no tokens
            lambda s: [
                message_event(s, et.MESSAGE_CREATE, "n", {"status": "complete"}),
                token(s, "n", "x"),
            ],
            1,
            "message_not_streaming",
        ),
        (  # the same id opened twice in one batch
            lambda s: [
                message_event(s, et.MESSAGE_CREATE, "n"),
                message_event(s, et.MESSAGE_CREATE, "n"),
            ],
            1,
            "message_exists",
        ),
        (  # someone else streaming into a message opened in this batch
            lambda s: [
                message_event(s, et.MESSAGE_CREATE, "n"),
                token(s, "n", "x", author=OTHER_AGENT),
            ],
            1,
            "forbidden",
        ),
    ],
    ids=["append-after-complete", "append-to-opened-complete", "create-twice", "wrong-author"],
)
def test_message_rules_hold_between_publishes_of_one_batch(
    make_session, requests_for, refused, code
):
    s, neighbour = make_session(), make_session()
    create(s.id, "m")
    create(neighbour.id, "m")
    requests = [*requests_for(s.id), token(neighbour.id, "m", "ok")]
    outcomes = append_many(requests)
    err = outcomes[refused]
    assert isinstance(err, BatonError) and err.code == code, err
    assert all(not isinstance(o, BatonError) for i, o in enumerate(outcomes) if i != refused)
    assert Session.objects.get(pk=s.id).last_seq == 1 + len(requests) - 2
    assert Message.objects.get(session=neighbour, message_id="m").content == "ok"


def test_a_message_opened_without_an_id_gets_one_in_the_fast_lane(make_session):
    s = make_session()
    (outcome,) = append_many([message_event(s.id, et.MESSAGE_CREATE, None)])
    (result,) = outcome  # type: ignore[misc]
    assert result.message_id and result.message_id.startswith("msg_")
    assert Event.objects.get(pk=result.id).message_id == result.message_id
    assert Message.objects.get(session=s, message_id=result.message_id).created_seq == 1


def test_only_the_session_at_fault_leaves_the_fast_lane(make_session, monkeypatch):
    """Tokens still in flight when a message is cancelled: the refusal is exact, and the other
    sessions of the batch are not pushed onto the general path with it."""
    sessions = [make_session() for _ in range(9)]
    for s in sessions:
        create(s.id, "m")
    _complete(sessions[4])
    general: list[str] = []
    real = services.append_events

    def counted(**kwargs: Any) -> list[AppendResult]:
        general.append(kwargs["session_id"])
        return real(**kwargs)

    monkeypatch.setattr(services, "append_events", counted)
    requests = [token(s.id, "m", "t", client_ref=f"k{n}") for n in range(2) for s in sessions]
    outcomes = append_many(requests)
    assert general == [sessions[4].id, sessions[4].id]
    for i, outcome in enumerate(outcomes):
        if i % 9 == 4:
            assert isinstance(outcome, BatonError) and outcome.code == "message_not_streaming"
        else:
            assert seqs_of(outcome) == [2 + i // 9]


def test_an_agent_may_still_publish_plain_events_while_a_human_holds_the_session(
    session, published
):
    _claim(session)
    outcomes = append_many([step(session.id, 1), step(session.id, 2)])
    assert [seqs_of(o) for o in outcomes] == [[2], [3]]


def test_duplicate_client_refs_return_the_original_and_store_nothing(make_session):
    a, b = make_session(), make_session()
    create(a.id, "m")
    create(b.id, "m")
    (first,) = append_many([token(a.id, "m", "x", client_ref="r1")])
    assert seqs_of(first) == [2]

    outcomes = append_many(
        [
            token(a.id, "m", "x", client_ref="r1"),  # a retry of a stored publish
            token(a.id, "m", "y", client_ref="r2"),
            token(a.id, "m", "y", client_ref="r2"),  # the same ref twice in one batch
            token(b.id, "m", "x", client_ref="r1"),  # same ref, another session: fresh
            step(a.id, 1, client_ref="r1"),  # same ref by another author kind below
        ]
    )

    assert outcomes[0] == [AppendResult(2, first[0].id, "m", duplicate=True)]  # type: ignore[index]
    assert seqs_of(outcomes[1]) == [3] and not outcomes[1][0].duplicate  # type: ignore[index]
    assert outcomes[2] == [
        AppendResult(3, outcomes[1][0].id, "m", duplicate=True)  # type: ignore[index]
    ]
    assert seqs_of(outcomes[3]) == [2] and not outcomes[3][0].duplicate  # type: ignore[index]
    assert outcomes[4][0].duplicate and outcomes[4][0].seq == 2  # type: ignore[index]
    assert Message.objects.get(session=a, message_id="m").content == "xy"
    assert [s for s, *_ in stored(a.id)] == [1, 2, 3]
    assert Session.objects.get(pk=a.id).last_seq == 3


def test_a_racing_duplicate_found_only_at_insert_falls_back_to_the_general_path(
    make_session, monkeypatch
):
    """Another process stored the ref after the bulk check: the unique index catches it, the
    fast run rolls back and is halved until that session is alone, and the general path
    answers it with the original; the other sessions stay in the fast lane."""
    sessions = [make_session() for _ in range(5)]
    for s in sessions:
        create(s.id, "m")
    culprit = sessions[3].id
    (original,) = append_many([token(culprit, "m", "x", client_ref="r1")])
    monkeypatch.setattr(services, "_known_client_refs", lambda requests, **kwargs: set())
    general: list[str] = []
    real = services.append_events

    def counted(**kwargs: Any) -> list[AppendResult]:
        general.append(kwargs["session_id"])
        return real(**kwargs)

    monkeypatch.setattr(services, "append_events", counted)
    requests = [token(s.id, "m", "a", client_ref="r1") for s in sessions]
    requests.append(token(culprit, "m", "y"))
    outcomes = append_many(requests)

    assert general == [culprit, culprit]
    assert outcomes[3] == [
        AppendResult(2, original[0].id, "m", duplicate=True)  # type: ignore[index]
    ]
    assert seqs_of(outcomes[5]) == [3]
    assert Message.objects.get(session_id=culprit, message_id="m").content == "xy"
    assert Session.objects.get(pk=culprit).last_seq == 3
    for i, s in enumerate(sessions):
        if s.id != culprit:
            assert seqs_of(outcomes[i]) == [2]
            assert Message.objects.get(session=s, message_id="m").content == "a"


def test_mixed_batch_keeps_submission_order_within_a_session(make_session, published):
    s, other = make_session(), make_session()
    create(s.id, "m1")
    create(other.id, "m")
    published.clear()
    outcomes = append_many(
        [
            token(s.id, "m1", "a"),
            AppendRequest(  # not for the fast lane; the next request depends on it
                session_id=s.id,
                author=AGENT,
                events=[EventInput(et.MESSAGE_CREATE, {"role": "assistant"}, "m2")],
            ),
            token(other.id, "m", "o"),
            token(s.id, "m2", "b"),
            token(s.id, "m1", "c"),
        ]
    )
    assert [seqs_of(o) for o in outcomes] == [[2], [3], [2], [4], [5]]
    assert Message.objects.get(session=s, message_id="m1").content == "ac"
    assert Message.objects.get(session=s, message_id="m2").content == "b"
    assert fanned(published, s.id) == [2, 3, 4, 5]


def test_token_appends_take_a_statement_per_session_not_per_publish(make_session):
    """The regression guard of the fast lane: N publishes over M sessions cost M + a constant
    statements (seq allocation per session; the rest is one statement for the whole batch)."""
    sessions = [make_session() for _ in range(4)]
    for s in sessions:
        create(s.id, "m")
    requests = [token(s.id, "m", f"{i},", client_ref=f"r{i}") for i in range(10) for s in sessions]
    with CaptureQueriesContext(connection) as queries:
        outcomes = append_many(requests)
    assert all(not isinstance(o, BatonError) for o in outcomes)
    # One per session (seqs); one each: client_ref check, message UPDATEs (executemany), event
    # INSERT (executemany), BEGIN, SAVEPOINT, RELEASE, COMMIT.
    assert len(queries) <= len(sessions) + 7, [q["sql"][:60] for q in queries]
    for s in sessions:
        m = Message.objects.get(session=s, message_id="m")
        assert (m.content, m.version, m.last_seq) == ("".join(f"{i}," for i in range(10)), 11, 11)


def test_a_publish_of_several_events_stays_contiguous_in_the_fast_lane(make_session):
    s, other = make_session(), make_session()
    create(s.id, "m")
    create(other.id, "m")
    several = AppendRequest(
        session_id=s.id,
        author=AGENT,
        events=[
            EventInput(et.MESSAGE_APPEND, {"delta": "a"}, "m", "x1"),
            EventInput("progress.tool", {"name": "search"}, client_ref="x2"),
            EventInput(et.MESSAGE_APPEND, {"delta": "b"}, "m", "x3"),
        ],
    )
    outcomes = append_many([token(s.id, "m", "0"), several, token(other.id, "m", "z")])
    assert [seqs_of(o) for o in outcomes] == [[2], [3, 4, 5], [2]]
    assert [r.message_id for r in outcomes[1]] == ["m", None, "m"]  # type: ignore[union-attr]
    m = Message.objects.get(session=s, message_id="m")
    assert (m.content, m.version, m.last_seq) == ("0ab", 4, 5)
    assert [t for _, t, _ in stored(s.id)] == [
        "message.create",
        "message.append",
        "message.append",
        "progress.tool",
        "message.append",
    ]


@pytest.mark.usefixtures("hub_cleanup")
async def test_the_writer_answers_each_publish_of_a_shared_batch(make_session):
    a = await database_sync_to_async(make_session)()
    b = await database_sync_to_async(make_session)()
    for s in (a, b):
        await database_sync_to_async(create)(s.id, "m")
    writer = get_hub().writer
    before = writer.stats["batches"]
    futures = [  # queued before the writer runs: one batch
        writer.submit(session_id=r.session_id, author=r.author, events=r.events)
        for r in (
            token(a.id, "m", "x", client_ref="w1"),
            token(b.id, "nope", "y"),
            token(a.id, "m", "y", client_ref="w2"),
            token(b.id, "m", "z"),
        )
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert writer.stats["batches"] == before + 1
    assert [seqs_of(o) for i, o in enumerate(outcomes) if i != 1] == [[2], [3], [2]]
    assert isinstance(outcomes[1], BatonError) and outcomes[1].code == "message_not_found"
    m = await database_sync_to_async(Message.objects.get)(session=a, message_id="m")
    assert m.content == "xy"
