"""The services layer: the one append (seqs, idempotency, materialization, rules) and presence."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection as db_connection
from django.utils import timezone

from sessions_app import event_types as et
from sessions_app.errors import BatonError
from sessions_app.identity import SYSTEM, Author
from sessions_app.models import (
    AgentKey,
    Connection,
    Event,
    Message,
    PresenceLease,
    Session,
    Worker,
)
from sessions_app.services import (
    EventInput,
    append_events,
    close_connection,
    create_agent_key,
    hash_agent_key,
    heartbeat_worker,
    open_connection,
    parse_event_batch,
    reap_presence,
    set_presence_lease,
)

AGENT = Author(kind="agent", id="test-agent", name="Test agent")
OTHER_AGENT = Author(kind="agent", id="other-agent", name="Other agent")
USER = Author(kind="user", id="user-1", name="User One")
OPERATOR = Author(kind="operator", id="olivia", name="Olivia")


# --------------------------------------------------------------------------- helpers


def ev(
    event_type: str,
    data: dict[str, Any] | None = None,
    *,
    message_id: str | None = None,
    client_ref: str | None = None,
) -> EventInput:
    return EventInput(
        type=event_type, data=data or {}, message_id=message_id, client_ref=client_ref
    )


def append(session_id: str, author: Author, *events: EventInput, system: bool = False):
    return append_events(session_id=session_id, author=author, events=list(events), system=system)


def head(session_id: str) -> int:
    return Session.objects.get(pk=session_id).last_seq


def seqs(session_id: str) -> list[int]:
    return list(
        Event.objects.filter(session_id=session_id).order_by("seq").values_list("seq", flat=True)
    )


def types(session_id: str) -> list[str]:
    return list(
        Event.objects.filter(session_id=session_id).order_by("seq").values_list("type", flat=True)
    )


def message(session_id: str, message_id: str) -> Message:
    return Message.objects.get(session_id=session_id, message_id=message_id)


def snapshot(session_id: str) -> tuple[int, int, int, list[tuple[Any, ...]]]:
    """Everything a failed write must leave untouched."""
    s = Session.objects.get(pk=session_id)
    return (
        s.last_seq,
        Event.objects.filter(session_id=session_id).count(),
        Message.objects.filter(session_id=session_id).count(),
        list(
            Message.objects.filter(session_id=session_id)
            .order_by("created_seq")
            .values_list("message_id", "content", "status", "version", "last_seq")
        ),
    )


@contextmanager
def raises(code: str, status: int) -> Iterator[None]:
    """The block raises a BatonError with this code and status."""
    with pytest.raises(BatonError) as excinfo:
        yield
    err = excinfo.value
    assert (err.code, err.status) == (code, status), (err.code, err.status, err.message)


def claim(session_id: str, operator: Author = OPERATOR) -> None:
    append(session_id, operator, ev(et.HANDOVER_CLAIMED, {"operator": operator.id}), system=True)


# --------------------------------------------------------------------------- seq allocation


@pytest.mark.django_db
def test_single_appends_get_consecutive_seqs_from_one(session):
    results = [append(session.id, AGENT, ev("progress.step", {"i": i}))[0] for i in range(3)]
    assert [r.seq for r in results] == [1, 2, 3]
    assert all(r.duplicate is False for r in results)
    assert len({r.id for r in results}) == 3
    assert all(r.id.startswith("evt_") for r in results)
    assert seqs(session.id) == [1, 2, 3]
    assert head(session.id) == 3


@pytest.mark.django_db
def test_event_ids_of_later_appends_sort_after_earlier_ones(session):
    """Time-ordered ids keep each commit's inserts at the end of the primary-key index."""
    ids = []
    for i in range(3):
        ids.append(append(session.id, AGENT, ev("progress.step", {"i": i}))[0].id)
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert len(ids[0]) == len("evt_") + 13 + 12


@pytest.mark.django_db
def test_batch_of_n_gets_n_consecutive_seqs_in_order(session):
    append(session.id, AGENT, ev("progress.a"))
    results = append(session.id, AGENT, *[ev("progress.step", {"i": i}) for i in range(5)])
    assert [r.seq for r in results] == [2, 3, 4, 5, 6]
    stored = Event.objects.filter(session_id=session.id, seq__gte=2).order_by("seq")
    assert [e.data["i"] for e in stored] == [0, 1, 2, 3, 4]
    assert head(session.id) == 6


@pytest.mark.django_db
def test_stored_event_carries_author_visibility_and_timestamp(session):
    (result,) = append(session.id, AGENT, ev("progress.tool", {"name": "search"}))
    row = Event.objects.get(pk=result.id)
    assert (row.session_id, row.seq, row.type) == (session.id, 1, "progress.tool")
    assert (row.author_kind, row.author_id, row.author_name) == (
        "agent",
        "test-agent",
        "Test agent",
    )
    assert row.data == {"name": "search"}
    assert row.visibility == et.VISIBILITY_ALL
    assert row.client_ref is None
    assert abs((timezone.now() - row.created_at).total_seconds()) < 60


@pytest.mark.django_db
def test_seqs_are_per_session(make_session):
    a, b = make_session("a"), make_session("b")
    append(a.id, AGENT, ev("progress.x"), ev("progress.x"))
    (rb,) = append(b.id, AGENT, ev("progress.x"))
    (ra,) = append(a.id, AGENT, ev("progress.x"))
    assert rb.seq == 1
    assert ra.seq == 3
    assert (head(a.id), head(b.id)) == (3, 1)


@pytest.mark.django_db
def test_empty_batch_is_a_no_op(session):
    assert append_events(session_id=session.id, author=AGENT, events=[]) == []
    assert head(session.id) == 0


@pytest.mark.django_db
def test_append_to_unknown_session_is_not_found(db):
    with raises("not_found", 404):
        append("ses_nope", AGENT, ev("progress.x"))
    assert not Event.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_get_every_seq_exactly_once(session):
    threads_n, per_thread = 8, 40
    errors: list[BaseException] = []
    returned: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_n)

    def writer(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            author = Author(kind="agent", id=f"w{t}", name=f"w{t}")
            done = 0
            while done < per_thread:
                # Every third write is a batch of 3; the rest are single events.
                n = 3 if done % 3 == 0 and per_thread - done >= 3 else 1
                results = append(
                    session.id,
                    author,
                    *[ev("progress.w", {"t": t, "i": done + k}) for k in range(n)],
                )
                got = [r.seq for r in results]
                assert got == list(range(got[0], got[0] + n)), got  # a batch is contiguous
                with lock:
                    returned.extend(got)
                done += n
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            db_connection.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    total = threads_n * per_thread
    assert sorted(returned) == list(range(1, total + 1))
    assert seqs(session.id) == list(range(1, total + 1))
    assert head(session.id) == total
    # Each writer's own events are stored in the order it wrote them.
    for t in range(threads_n):
        mine = Event.objects.filter(session_id=session.id, author_id=f"w{t}").order_by("seq")
        assert [e.data["i"] for e in mine] == list(range(per_thread))


@pytest.mark.django_db(transaction=True)
def test_concurrent_duplicates_of_one_client_ref_store_one_event(session):
    threads_n = 6
    errors: list[BaseException] = []
    results: list[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_n)

    def writer() -> None:
        try:
            barrier.wait(timeout=30)
            (result,) = append(session.id, AGENT, ev("progress.x", client_ref="same"))
            with lock:
                results.append(result)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            db_connection.close()

    threads = [threading.Thread(target=writer) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert {r.seq for r in results} == {1}
    assert sorted(r.duplicate for r in results) == [False] + [True] * (threads_n - 1)
    assert Event.objects.filter(session_id=session.id).count() == 1
    assert head(session.id) == 1


# --------------------------------------------------------------------------- idempotency


@pytest.mark.django_db
def test_repeated_client_ref_returns_original_seq_and_stores_nothing(session):
    (first,) = append(session.id, AGENT, ev("progress.x", {"n": 1}, client_ref="r1"))
    append(session.id, AGENT, ev("progress.y"))
    (again,) = append(session.id, AGENT, ev("progress.x", {"n": 2}, client_ref="r1"))
    assert (again.seq, again.id, again.duplicate) == (first.seq, first.id, True)
    assert first.duplicate is False
    assert Event.objects.filter(session_id=session.id, client_ref="r1").count() == 1
    assert Event.objects.get(pk=first.id).data == {"n": 1}
    assert head(session.id) == 2


@pytest.mark.django_db
def test_duplicate_message_create_returns_original_message_id(session):
    (first,) = append(
        session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, client_ref="c")
    )
    (again,) = append(
        session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, client_ref="c")
    )
    assert first.message_id and first.message_id.startswith("msg_")
    assert again.message_id == first.message_id
    assert again.duplicate is True
    assert Message.objects.filter(session_id=session.id).count() == 1


@pytest.mark.django_db
def test_same_client_ref_by_another_author_is_a_new_event(session):
    (a,) = append(session.id, AGENT, ev("progress.x", client_ref="r1"))
    (b,) = append(session.id, OTHER_AGENT, ev("progress.x", client_ref="r1"))
    (c,) = append(session.id, USER, ev("progress.x", client_ref="r1"))
    assert [a.seq, b.seq, c.seq] == [1, 2, 3]
    assert not any(r.duplicate for r in (a, b, c))
    assert head(session.id) == 3


@pytest.mark.django_db
def test_same_client_ref_in_another_session_is_a_new_event(make_session):
    a, b = make_session(), make_session()
    append(a.id, AGENT, ev("progress.x", client_ref="r1"))
    (rb,) = append(b.id, AGENT, ev("progress.x", client_ref="r1"))
    assert (rb.seq, rb.duplicate) == (1, False)


@pytest.mark.django_db
def test_duplicate_client_ref_within_one_batch_is_refused(session):
    before = snapshot(session.id)
    with raises("invalid_event", 400):
        append(
            session.id,
            AGENT,
            ev("progress.x", client_ref="r1"),
            ev("progress.y", client_ref="r1"),
        )
    assert snapshot(session.id) == before


@pytest.mark.django_db
def test_mixed_batch_of_known_and_new_refs(session):
    (known,) = append(session.id, AGENT, ev("progress.x", client_ref="k"))
    results = append(
        session.id,
        AGENT,
        ev("progress.a", client_ref="n1"),
        ev("progress.b"),
        ev("progress.x", client_ref="k"),
        ev("progress.c", client_ref="n2"),
        ev("progress.d"),
    )
    assert [r.seq for r in results] == [2, 3, 1, 4, 5]
    assert [r.duplicate for r in results] == [False, False, True, False, False]
    assert results[2].id == known.id
    assert types(session.id) == [
        "progress.x",
        "progress.a",
        "progress.b",
        "progress.c",
        "progress.d",
    ]
    for r in results:
        assert Event.objects.get(pk=r.id).seq == r.seq
    assert head(session.id) == 5


@pytest.mark.django_db
def test_batch_of_only_known_refs_stores_nothing(session):
    first = append(
        session.id, AGENT, ev("progress.a", client_ref="a"), ev("progress.b", client_ref="b")
    )
    again = append(
        session.id, AGENT, ev("progress.b", client_ref="b"), ev("progress.a", client_ref="a")
    )
    assert [r.seq for r in again] == [2, 1]
    assert [r.id for r in again] == [first[1].id, first[0].id]
    assert all(r.duplicate for r in again)
    assert head(session.id) == 2


@pytest.mark.django_db
def test_idempotency_key_derives_one_ref_per_event(session):
    items = parse_event_batch(
        {"events": [{"type": "progress.a"}, {"type": "progress.b", "client_ref": "own"}]},
        idempotency_key="K",
    )
    assert [i.client_ref for i in items] == ["K:0", "own"]
    first = append(session.id, AGENT, *items)
    again = append(
        session.id,
        AGENT,
        *parse_event_batch(
            {"events": [{"type": "progress.a"}, {"type": "progress.b", "client_ref": "own"}]},
            idempotency_key="K",
        ),
    )
    assert [r.seq for r in again] == [r.seq for r in first] == [1, 2]
    assert all(r.duplicate for r in again)
    assert head(session.id) == 2


# --------------------------------------------------------------------------- messages


@pytest.mark.django_db
def test_message_lifecycle_is_materialized(session):
    (created,) = append(
        session.id,
        AGENT,
        ev(et.MESSAGE_CREATE, {"role": "assistant", "content": "He"}, message_id="m1"),
    )
    assert created.message_id == "m1"
    m = message(session.id, "m1")
    assert (m.role, m.content, m.status, m.version) == ("assistant", "He", "streaming", 1)
    assert (m.created_seq, m.last_seq) == (1, 1)
    assert (m.author_kind, m.author_id, m.author_name) == ("agent", "test-agent", "Test agent")

    append(session.id, AGENT, ev(et.MESSAGE_APPEND, {"delta": "llo"}, message_id="m1"))
    append(session.id, AGENT, ev("progress.tool", {"name": "x"}))  # unrelated event
    append(session.id, AGENT, ev(et.MESSAGE_APPEND, {"delta": " world"}, message_id="m1"))
    m = message(session.id, "m1")
    assert (m.content, m.version, m.last_seq, m.created_seq) == ("Hello world", 3, 4, 1)

    append(
        session.id,
        AGENT,
        ev(et.MESSAGE_UPDATE, {"content": "Hi", "parts": [{"t": "text"}]}, message_id="m1"),
    )
    m = message(session.id, "m1")
    assert (m.content, m.parts, m.version, m.last_seq, m.status) == (
        "Hi",
        [{"t": "text"}],
        4,
        5,
        "streaming",
    )

    append(
        session.id,
        AGENT,
        ev(et.MESSAGE_COMPLETE, {"status": "failed", "reason": "boom"}, message_id="m1"),
    )
    m = message(session.id, "m1")
    assert (m.status, m.reason, m.version, m.last_seq, m.content) == ("failed", "boom", 5, 6, "Hi")


@pytest.mark.django_db
def test_create_append_complete_in_one_batch(session):
    results = append(
        session.id,
        AGENT,
        ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"),
        ev(et.MESSAGE_APPEND, {"delta": "a"}, message_id="m1"),
        ev(et.MESSAGE_APPEND, {"delta": "b"}, message_id="m1"),
        ev(et.MESSAGE_COMPLETE, {}, message_id="m1"),
    )
    assert [r.seq for r in results] == [1, 2, 3, 4]
    assert all(r.message_id == "m1" for r in results)
    m = message(session.id, "m1")
    assert (m.content, m.status, m.version, m.created_seq, m.last_seq) == (
        "ab",
        "complete",
        4,
        1,
        4,
    )


@pytest.mark.django_db
def test_create_without_message_id_generates_one(session):
    (r,) = append(session.id, USER, ev(et.MESSAGE_CREATE, {"role": "user", "content": "hi"}))
    assert r.message_id.startswith("msg_")
    assert Event.objects.get(pk=r.id).message_id == r.message_id
    assert message(session.id, r.message_id).content == "hi"


@pytest.mark.django_db
def test_create_complete_message_then_append_is_not_streaming(session):
    append(
        session.id,
        USER,
        ev(
            et.MESSAGE_CREATE,
            {"role": "user", "content": "q", "status": "complete"},
            message_id="u1",
        ),
    )
    assert message(session.id, "u1").status == "complete"
    before = snapshot(session.id)
    with raises("message_not_streaming", 409):
        append(session.id, USER, ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="u1"))
    with raises("message_not_streaming", 409):
        append(session.id, USER, ev(et.MESSAGE_COMPLETE, {}, message_id="u1"))
    assert snapshot(session.id) == before


@pytest.mark.django_db
def test_append_to_completed_message_is_not_streaming(session):
    append(
        session.id,
        AGENT,
        ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"),
        ev(et.MESSAGE_COMPLETE, {"status": "cancelled"}, message_id="m1"),
    )
    before = snapshot(session.id)
    with raises("message_not_streaming", 409):
        append(session.id, AGENT, ev(et.MESSAGE_APPEND, {"delta": "late"}, message_id="m1"))
    assert snapshot(session.id) == before
    assert message(session.id, "m1").status == "cancelled"


@pytest.mark.django_db
def test_only_the_author_changes_a_message(session):
    append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    before = snapshot(session.id)
    for who in (OTHER_AGENT, USER):
        for item in (
            ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="m1"),
            ev(et.MESSAGE_UPDATE, {"content": "x"}, message_id="m1"),
            ev(et.MESSAGE_COMPLETE, {}, message_id="m1"),
        ):
            with raises("forbidden", 403):
                append(session.id, who, item)
    assert snapshot(session.id) == before


@pytest.mark.django_db
def test_changing_an_unknown_message_is_not_found(session):
    for item in (
        ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="ghost"),
        ev(et.MESSAGE_UPDATE, {"content": "x"}, message_id="ghost"),
        ev(et.MESSAGE_COMPLETE, {}, message_id="ghost"),
    ):
        with raises("message_not_found", 404):
            append(session.id, AGENT, item)
    assert snapshot(session.id) == (0, 0, 0, [])


@pytest.mark.django_db
def test_message_ids_are_per_session(make_session):
    a, b = make_session(), make_session()
    append(a.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    with raises("message_not_found", 404):
        append(b.id, AGENT, ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="m1"))
    append(b.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    assert Message.objects.filter(message_id="m1").count() == 2


@pytest.mark.django_db
def test_creating_an_existing_message_is_a_conflict(session):
    append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    before = snapshot(session.id)
    with raises("message_exists", 409):
        append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    with raises("message_exists", 409):
        append(
            session.id,
            AGENT,
            ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m2"),
            ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m2"),
        )
    assert snapshot(session.id) == before


@pytest.mark.django_db
def test_a_failing_batch_stores_nothing_and_consumes_no_seq(session):
    append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    before = snapshot(session.id)
    with raises("message_not_found", 404):
        append(
            session.id,
            AGENT,
            ev("progress.step"),
            ev(et.MESSAGE_APPEND, {"delta": "kept?"}, message_id="m1"),
            ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m2"),
            ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="ghost"),
        )
    assert snapshot(session.id) == before
    assert message(session.id, "m1").content == ""
    assert not Message.objects.filter(message_id="m2").exists()
    # The next append takes the next seq: nothing was burned.
    (r,) = append(session.id, AGENT, ev("progress.after"))
    assert r.seq == 2
    assert seqs(session.id) == [1, 2]


# --------------------------------------------------------------------------- who may publish what


@pytest.mark.django_db
@pytest.mark.parametrize("event_type", sorted(et.SERVER_ONLY_TYPES))
@pytest.mark.parametrize("author", [AGENT, USER, OPERATOR], ids=lambda a: a.kind)
def test_server_only_types_are_refused_for_non_system_writes(session, event_type, author):
    with raises("forbidden", 403):
        append(session.id, author, ev(event_type, {}))
    assert snapshot(session.id) == (0, 0, 0, [])
    assert Session.objects.get(pk=session.id).status == et.STATUS_ACTIVE


@pytest.mark.django_db
def test_server_only_type_anywhere_in_a_batch_refuses_the_batch(session):
    with raises("forbidden", 403):
        append(session.id, AGENT, ev("progress.ok"), ev(et.SESSION_CLOSED, {}))
    assert snapshot(session.id) == (0, 0, 0, [])
    assert Session.objects.get(pk=session.id).status == et.STATUS_ACTIVE


@pytest.mark.django_db
def test_system_writes_may_use_server_only_types(session):
    (r,) = append(session.id, SYSTEM, ev(et.PRESENCE_UPDATE, {"state": {}}), system=True)
    assert r.seq == 1


@pytest.mark.django_db
def test_internal_notes_are_for_operators_only(session):
    for who in (AGENT, USER):
        with raises("forbidden", 403):
            append(session.id, who, ev(et.NOTE_INTERNAL, {"text": "psst"}))
    assert head(session.id) == 0
    (r,) = append(session.id, OPERATOR, ev(et.NOTE_INTERNAL, {"text": "psst"}))
    assert Event.objects.get(pk=r.id).visibility == et.VISIBILITY_OPERATORS


@pytest.mark.django_db
def test_connection_events_get_diagnostics_visibility(session):
    results = append(
        session.id,
        SYSTEM,
        ev(et.CONNECTION_OPENED, {"connection_id": "c"}),
        ev(et.CONNECTION_CLOSED, {"connection_id": "c"}),
        ev(et.PRESENCE_ENTER, {}),
        system=True,
    )
    vis = [Event.objects.get(pk=r.id).visibility for r in results]
    assert vis == [et.VISIBILITY_DIAGNOSTICS, et.VISIBILITY_DIAGNOSTICS, et.VISIBILITY_ALL]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("author", "role", "allowed"),
    [
        (USER, "user", True),
        (USER, "assistant", False),
        (USER, "operator", False),
        (USER, "system", False),
        (AGENT, "assistant", True),
        (AGENT, "system", True),
        (AGENT, "user", False),
        (AGENT, "operator", False),
        (OPERATOR, "operator", True),
        (OPERATOR, "assistant", False),
        (OPERATOR, "user", False),
    ],
    ids=lambda v: v.kind if isinstance(v, Author) else str(v),
)
def test_message_roles_by_author_kind(session, author, role, allowed):
    item = ev(et.MESSAGE_CREATE, {"role": role, "content": "x"}, message_id="m")
    if allowed:
        append(session.id, author, item)
        assert message(session.id, "m").role == role
    else:
        with raises("forbidden", 403):
            append(session.id, author, item)
        assert snapshot(session.id) == (0, 0, 0, [])


# --------------------------------------------------------------------------- handover and status


@pytest.mark.django_db
def test_handover_lifecycle_through_events(session):
    append(session.id, USER, ev(et.HANDOVER_REQUESTED, {"reason": "angry"}))
    s = Session.objects.get(pk=session.id)
    assert (s.status, s.controller) == (et.STATUS_AWAITING_HUMAN, None)

    claim(session.id)
    s = Session.objects.get(pk=session.id)
    assert s.status == et.STATUS_WITH_HUMAN
    assert s.controller == {"kind": "operator", "id": "olivia", "name": "Olivia"}

    # The agent cannot talk while a human holds the session; nothing is stored.
    before = snapshot(session.id)
    with raises("controlled_by_human", 409):
        append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="a1"))
    with raises("controlled_by_human", 409):
        append(session.id, AGENT, ev("progress.x"), ev(et.MESSAGE_CREATE, {"role": "assistant"}))
    assert snapshot(session.id) == before

    # Users and the operator still talk; the agent may still publish non-message events.
    append(
        session.id, USER, ev(et.MESSAGE_CREATE, {"role": "user", "content": "hi"}, message_id="u1")
    )
    append(session.id, OPERATOR, ev(et.MESSAGE_CREATE, {"role": "operator"}, message_id="o1"))
    append(session.id, AGENT, ev("progress.thinking"))
    assert message(session.id, "u1").content == "hi"
    assert message(session.id, "o1").role == "operator"

    append(session.id, OPERATOR, ev(et.HANDOVER_RELEASED, {}), system=True)
    s = Session.objects.get(pk=session.id)
    assert (s.status, s.controller) == (et.STATUS_ACTIVE, None)
    append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="a1"))

    append(session.id, SYSTEM, ev(et.SESSION_CLOSED, {}), system=True)
    s = Session.objects.get(pk=session.id)
    assert (s.status, s.controller) == (et.STATUS_CLOSED, None)
    assert types(session.id) == [
        et.HANDOVER_REQUESTED,
        et.HANDOVER_CLAIMED,
        et.MESSAGE_CREATE,
        et.MESSAGE_CREATE,
        "progress.thinking",
        et.HANDOVER_RELEASED,
        et.MESSAGE_CREATE,
        et.SESSION_CLOSED,
    ]


@pytest.mark.django_db
def test_closed_session_refuses_every_non_system_publish(session):
    append(session.id, AGENT, ev(et.MESSAGE_CREATE, {"role": "assistant"}, message_id="m1"))
    append(session.id, SYSTEM, ev(et.SESSION_CLOSED, {}), system=True)
    before = snapshot(session.id)
    for who, item in (
        (AGENT, ev("progress.x")),
        (AGENT, ev(et.MESSAGE_APPEND, {"delta": "x"}, message_id="m1")),
        (USER, ev(et.MESSAGE_CREATE, {"role": "user"})),
        (USER, ev("signal.cancel", {})),
        (USER, ev(et.HANDOVER_REQUESTED, {})),
        (OPERATOR, ev(et.NOTE_INTERNAL, {"text": "x"})),
    ):
        with raises("session_closed", 409):
            append(session.id, who, item)
    assert snapshot(session.id) == before
    # The server itself still records (e.g. a late presence.leave) on a closed session.
    (r,) = append(session.id, SYSTEM, ev(et.PRESENCE_LEAVE, {"reason": "closed"}), system=True)
    assert r.seq == before[0] + 1


@pytest.mark.django_db
def test_claim_from_active_and_release_from_awaiting(session):
    claim(session.id)
    assert Session.objects.get(pk=session.id).status == et.STATUS_WITH_HUMAN
    append(session.id, OPERATOR, ev(et.HANDOVER_RELEASED, {}), system=True)
    append(session.id, USER, ev(et.HANDOVER_REQUESTED, {}))
    append(session.id, SYSTEM, ev(et.HANDOVER_RELEASED, {}), system=True)
    assert Session.objects.get(pk=session.id).status == et.STATUS_ACTIVE


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("setup", "author", "item", "system", "code"),
    [
        # A second request while one is pending or a human holds it.
        ([et.HANDOVER_REQUESTED], USER, et.HANDOVER_REQUESTED, False, "handover_pending"),
        ([et.HANDOVER_CLAIMED], AGENT, et.HANDOVER_REQUESTED, False, "handover_pending"),
        ([et.HANDOVER_CLAIMED], OPERATOR, et.HANDOVER_CLAIMED, True, "already_claimed"),
        ([], OPERATOR, et.HANDOVER_RELEASED, True, "not_claimed"),
        ([et.SESSION_CLOSED], SYSTEM, et.SESSION_CLOSED, True, "session_closed"),
        ([et.SESSION_CLOSED], OPERATOR, et.HANDOVER_CLAIMED, True, "already_claimed"),
    ],
)
def test_invalid_transitions_are_conflicts_and_store_nothing(
    session, setup, author, item, system, code
):
    for t in setup:
        who = USER if t == et.HANDOVER_REQUESTED else OPERATOR
        append(session.id, who, ev(t, {}), system=t in et.SERVER_ONLY_TYPES)
    s_before = Session.objects.get(pk=session.id)
    before = snapshot(session.id)
    with raises(code, 409):
        append(session.id, author, ev(item, {}), system=system)
    s_after = Session.objects.get(pk=session.id)
    assert snapshot(session.id) == before
    assert (s_after.status, s_after.controller) == (s_before.status, s_before.controller)


# --------------------------------------------------------------------------- presence


def open_conn(session_id: str, author: Author, **kw: Any) -> Connection:
    options: dict[str, Any] = {
        "worker_id": "wrk_test",
        "after": 0,
        "replayed": 0,
        "counts_for_presence": True,
    }
    options.update(kw)
    return open_connection(session_id=session_id, author=author, **options)


def events_of(session_id: str, after: int = 0) -> list[Event]:
    return list(Event.objects.filter(session_id=session_id, seq__gt=after).order_by("seq"))


@pytest.mark.django_db
def test_first_connection_enters_presence_and_second_does_not(session):
    first = open_conn(session.id, USER, user_agent="phone")
    got = events_of(session.id)
    assert [e.type for e in got] == [et.PRESENCE_ENTER, et.CONNECTION_OPENED]
    assert got[0].data == {"client_id": "user-1", "kind": "user", "name": "User One"}
    assert got[0].visibility == et.VISIBILITY_ALL
    assert got[1].data["connection_id"] == first.id
    assert got[1].visibility == et.VISIBILITY_DIAGNOSTICS
    assert (got[0].author_kind, got[0].author_id) == ("user", "user-1")
    assert first.closed_at is None and first.user_agent == "phone"

    mark = head(session.id)
    second = open_conn(session.id, USER, after=2, replayed=2)
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.CONNECTION_RESUMED]
    assert got[0].data["connection_id"] == second.id
    assert (got[0].data["after"], got[0].data["replayed"]) == (2, 2)
    assert Connection.objects.filter(session_id=session.id, closed_at__isnull=True).count() == 2


@pytest.mark.django_db
def test_non_counting_connection_never_enters_or_leaves(session):
    conn = open_conn(session.id, AGENT, counts_for_presence=False)
    assert types(session.id) == [et.CONNECTION_OPENED]
    close_connection(connection_id=conn.id, code=1000, reason="closed")
    assert types(session.id) == [et.CONNECTION_OPENED, et.CONNECTION_CLOSED]


@pytest.mark.django_db
def test_closing_the_last_connection_leaves_with_the_reason(session):
    a = open_conn(session.id, USER)
    b = open_conn(session.id, USER)
    mark = head(session.id)

    close_connection(connection_id=a.id, code=1000, reason="closed")
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.CONNECTION_CLOSED]
    assert got[0].data["connection_id"] == a.id
    assert got[0].data["code"] == 1000

    mark = head(session.id)
    close_connection(connection_id=b.id, code=1006, reason="lost")
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.PRESENCE_LEAVE, et.CONNECTION_CLOSED]
    assert got[0].data == {
        "client_id": "user-1",
        "kind": "user",
        "name": "User One",
        "reason": "lost",
    }
    row = Connection.objects.get(pk=b.id)
    assert (row.close_code, row.close_reason) == (1006, "lost")
    assert row.closed_at is not None


@pytest.mark.django_db
def test_closing_twice_or_an_unknown_connection_emits_nothing(session):
    conn = open_conn(session.id, USER)
    close_connection(connection_id=conn.id, code=1000, reason="closed")
    mark = head(session.id)
    close_connection(connection_id=conn.id, code=1000, reason="closed")
    close_connection(connection_id="conn_unknown", code=1000, reason="closed")
    assert head(session.id) == mark


@pytest.mark.django_db
def test_presence_members_are_per_client_id(session):
    open_conn(session.id, USER)
    a2 = open_conn(session.id, AGENT)
    assert types(session.id).count(et.PRESENCE_ENTER) == 2
    close_connection(connection_id=a2.id, code=1000, reason="closed")
    leaves = Event.objects.filter(session_id=session.id, type=et.PRESENCE_LEAVE)
    assert [e.data["client_id"] for e in leaves] == ["test-agent"]


@pytest.mark.django_db
def test_open_connection_on_unknown_session_is_not_found(db):
    with raises("not_found", 404):
        open_conn("ses_missing", USER)
    assert not Connection.objects.exists()


@pytest.mark.django_db
def test_lease_enter_renew_update_and_leave(session):
    lease = set_presence_lease(session_id=session.id, author=AGENT, ttl=30)
    assert lease is not None
    assert 25 < (lease.expires_at - timezone.now()).total_seconds() <= 30
    got = events_of(session.id)
    assert [e.type for e in got] == [et.PRESENCE_ENTER]
    assert got[0].data["client_id"] == "test-agent"

    # Renewing without state emits nothing and pushes the expiry.
    mark = head(session.id)
    renewed = set_presence_lease(session_id=session.id, author=AGENT, ttl=120)
    assert renewed is not None and renewed.pk == lease.pk
    assert renewed.expires_at > lease.expires_at
    assert head(session.id) == mark

    # Renewing with state is a presence.update.
    set_presence_lease(session_id=session.id, author=AGENT, ttl=120, state={"busy": True})
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.PRESENCE_UPDATE]
    assert got[0].data["state"] == {"busy": True}
    assert PresenceLease.objects.get(pk=lease.pk).state == {"busy": True}

    # ttl 0 leaves at once with reason closed.
    mark = head(session.id)
    assert set_presence_lease(session_id=session.id, author=AGENT, ttl=0) is None
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.PRESENCE_LEAVE]
    assert got[0].data["reason"] == "closed"
    assert not PresenceLease.objects.filter(session_id=session.id).exists()

    # ttl 0 again: not a member, nothing to say.
    mark = head(session.id)
    assert set_presence_lease(session_id=session.id, author=AGENT, ttl=0) is None
    assert head(session.id) == mark


@pytest.mark.django_db
def test_lease_of_a_connected_client_neither_enters_nor_leaves(session):
    open_conn(session.id, AGENT)
    mark = head(session.id)
    set_presence_lease(session_id=session.id, author=AGENT, ttl=30)
    set_presence_lease(session_id=session.id, author=AGENT, ttl=0)
    assert head(session.id) == mark


@pytest.mark.django_db
def test_reap_expires_leases_with_reason_timeout_exactly_once(session):
    set_presence_lease(session_id=session.id, author=AGENT, ttl=5)
    set_presence_lease(session_id=session.id, author=OTHER_AGENT, ttl=600)
    mark = head(session.id)
    later = timezone.now() + timedelta(seconds=10)

    assert reap_presence(now=later) == 1
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.PRESENCE_LEAVE]
    assert got[0].data["client_id"] == "test-agent"
    assert got[0].data["reason"] == "timeout"
    assert list(PresenceLease.objects.values_list("client_id", flat=True)) == ["other-agent"]

    mark = head(session.id)
    assert reap_presence(now=later) == 0
    assert head(session.id) == mark


@pytest.mark.django_db
def test_reap_leaves_live_leases_alone(session):
    set_presence_lease(session_id=session.id, author=AGENT, ttl=600)
    mark = head(session.id)
    assert reap_presence() == 0
    assert head(session.id) == mark
    assert PresenceLease.objects.count() == 1


@pytest.mark.django_db
def test_reap_closes_connections_of_a_dead_worker_exactly_once(session):
    heartbeat_worker(worker_id="wrk_dead")
    heartbeat_worker(worker_id="wrk_alive")
    Worker.objects.filter(pk="wrk_dead").update(heartbeat_at=timezone.now() - timedelta(hours=1))
    d1 = open_conn(session.id, USER, worker_id="wrk_dead")
    d2 = open_conn(session.id, USER, worker_id="wrk_dead")
    alive = open_conn(session.id, AGENT, worker_id="wrk_alive")
    mark = head(session.id)

    assert reap_presence(worker_timeout=60) == 2
    got = events_of(session.id, mark)
    assert [e.type for e in got] == [et.CONNECTION_CLOSED, et.PRESENCE_LEAVE, et.CONNECTION_CLOSED]
    assert got[1].data["client_id"] == "user-1"
    assert got[1].data["reason"] == "timeout"
    for conn in (d1, d2):
        row = Connection.objects.get(pk=conn.id)
        assert row.closed_at is not None and row.close_reason == "timeout"
    assert Connection.objects.get(pk=alive.id).closed_at is None
    # A dead worker with no open connection left is forgotten; the live one stays.
    assert list(Worker.objects.values_list("id", flat=True)) == ["wrk_alive"]

    mark = head(session.id)
    assert reap_presence(worker_timeout=60) == 0
    assert head(session.id) == mark


@pytest.mark.django_db
def test_heartbeat_keeps_a_worker_alive(session):
    heartbeat_worker(worker_id="wrk_a")
    open_conn(session.id, USER, worker_id="wrk_a")
    mark = head(session.id)
    assert reap_presence(worker_timeout=60) == 0
    assert head(session.id) == mark
    assert Worker.objects.filter(pk="wrk_a").exists()


# --------------------------------------------------------------------------- agent keys


@pytest.mark.django_db
def test_create_agent_key_stores_only_the_hash(db):
    key, raw = create_agent_key(name="  bot  ")
    assert raw.startswith("bk_") and len(raw) > 40
    row = AgentKey.objects.get(pk=key.pk)
    assert row.name == "bot"
    assert row.key_hash == hash_agent_key(raw)
    assert row.key_hash != raw and raw not in row.key_hash
    assert raw == row.prefix + raw[len(row.prefix) :] and len(row.prefix) < len(raw) - 20
    stored_text = " ".join(str(v) for v in AgentKey.objects.values_list().get(pk=key.pk))
    assert raw not in stored_text
    _other, raw2 = create_agent_key(name="bot2")
    assert raw2 != raw


@pytest.mark.django_db
def test_create_agent_key_with_a_taken_name_is_a_conflict(db):
    create_agent_key(name="bot")
    with raises("conflict", 409):
        create_agent_key(name="bot")
    assert AgentKey.objects.filter(name="bot").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_create_agent_key_needs_a_sane_name(db, name):
    with raises("invalid_event", 400):
        create_agent_key(name=name)
    assert not AgentKey.objects.exists()


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "raw",
    [
        [],
        "x",
        {"type": "nope"},
        {"type": "progress."},
        {"type": "signal."},
        {"type": "progress.x", "data": [1]},
        {"type": "progress.x", "data": "s"},
        {"type": "progress.x", "extra": 1},
        {"type": et.MESSAGE_APPEND, "data": {"delta": "x"}},
        {"type": et.MESSAGE_APPEND, "message_id": "m", "data": {"delta": 3}},
        {"type": et.MESSAGE_CREATE, "data": {}},
        {"type": et.MESSAGE_CREATE, "data": {"role": "user", "status": "failed"}},
        {"type": et.MESSAGE_CREATE, "data": {"role": "user", "parts": "no"}},
        {"type": et.MESSAGE_COMPLETE, "message_id": "m", "data": {"status": "done"}},
        {"type": et.MESSAGE_UPDATE, "message_id": "m", "data": {}},
        {"type": et.SIGNAL_REDIRECT, "data": {}},
        {"type": et.NOTE_INTERNAL, "data": {}},
        {"type": "progress.x", "message_id": ""},
        {"type": "progress.x", "message_id": "m" * 65},
        {"type": "progress.x", "client_ref": ""},
        {"type": "progress.x", "client_ref": "r" * 101},
        {"type": "progress.x", "client_ref": 5},
        {"events": []},
        {"events": {"type": "progress.x"}},
        {"events": [{"type": "progress.x"}], "type": "progress.x"},
    ],
)
def test_parse_rejects_ill_shaped_events(raw):
    with raises("invalid_event", 400):
        parse_event_batch(raw)


def test_parse_enforces_size_and_batch_limits(settings):
    settings.BATON_MAX_EVENT_BYTES = 50
    settings.BATON_MAX_BATCH_EVENTS = 2
    parse_event_batch({"type": "progress.x", "data": {"t": "a" * 30}})
    with raises("payload_too_large", 413):
        parse_event_batch({"type": "progress.x", "data": {"t": "a" * 60}})
    parse_event_batch({"events": [{"type": "progress.x"}] * 2})
    with raises("payload_too_large", 413):
        parse_event_batch({"events": [{"type": "progress.x"}] * 3})


def test_parse_accepts_one_event_or_a_batch():
    (one,) = parse_event_batch({"type": "progress.x", "data": None})
    assert (one.type, one.data, one.message_id, one.client_ref) == ("progress.x", {}, None, None)
    many = parse_event_batch(
        {
            "events": [
                {"type": "signal.cancel"},
                {"type": "message.create", "data": {"role": "user"}},
            ]
        }
    )
    assert [m.type for m in many] == ["signal.cancel", "message.create"]
