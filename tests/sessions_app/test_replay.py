"""Replay: the database-built event JSON, and paged resumes that stay exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from channels.db import database_sync_to_async

from sessions_app import selectors, services
from sessions_app.identity import Author
from sessions_app.models import Event
from sessions_app.services import AppendRequest, EventInput, append_events, append_many
from sessions_app.streams import Subscription
from tests.sessions_app.conftest import WsClient

AGENT = Author(kind="agent", id="test-agent", name='Agent "Q" \\ ünï 🚀')
OPERATOR = Author(kind="operator", id="olivia", name="Olivia")

# Data that exercises the JSON encoders: escapes, non-ASCII, control characters, numbers.
TRICKY_DATA: list[dict[str, Any]] = [
    {},
    {"text": 'quote " backslash \\ slash / tab \t newline \n nul-ish \u0001 é 漢字 🚀'},
    {"n": 0, "neg": -17, "big": 2**53 + 1, "f": 1.5, "tiny": 1e-7, "exp": 1.25e300},
    {"nested": {"list": [1, "two", None, True, False, {"k": []}]}, "empty": "", "null": None},
    {"</script>": "<b>&amp;</b>", "'single'": "'"},
]


def _fill(session_id: str) -> None:
    events = [EventInput(type="progress.tricky", data=d) for d in TRICKY_DATA]
    events += [
        EventInput(type="message.create", data={"role": "assistant", "status": "streaming"}),
    ]
    append_events(session_id=session_id, author=AGENT, events=events)
    append_events(
        session_id=session_id,
        author=OPERATOR,
        events=[EventInput(type="note.internal", data={"text": "private ✓"})],
    )
    # Timestamps where truncating and rounding to milliseconds differ, and no fraction at all.
    stamps = [
        datetime(2026, 1, 2, 3, 4, 5, 0, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999600, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 123999, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 1000, tzinfo=UTC),
    ]
    for seq, stamp in enumerate(stamps, start=1):
        Event.objects.filter(session_id=session_id, seq=seq).update(created_at=stamp)


def _both(session_id: str, **kw: Any) -> tuple[list[dict[str, Any]], list[tuple]]:
    args = {"session_id": session_id, "after": 0, "upto": 1000, "limit": 1000, **kw}
    return selectors.list_wire_events(**args), selectors.list_event_json(**args)


@pytest.mark.django_db
@pytest.mark.parametrize("database_built", [True, False])
def test_event_json_equals_event_wire(session, monkeypatch, database_built):
    if not database_built:  # the fallback for other database vendors
        monkeypatch.setattr(selectors.EventWireJSON, "vendors", frozenset())
    _fill(session.id)
    wire, rows = _both(session.id, include_private=True)
    assert len(wire) == len(rows) == len(TRICKY_DATA) + 2
    for expected, (seq, event_type, visibility, text) in zip(wire, rows, strict=True):
        assert json.loads(text) == expected
        assert (seq, event_type, visibility) == (
            expected["seq"],
            expected["type"],
            expected["visibility"],
        )
    assert [json.loads(r[3])["ts"] for r in rows[:5]] == [
        "2026-01-02T03:04:05.000Z",
        "2026-01-02T03:04:05.999Z",
        "2026-12-31T23:59:59.999Z",
        "2026-01-02T03:04:05.123Z",
        "2026-01-02T03:04:05.001Z",
    ]
    assert json.loads(rows[0][3])["message_id"] is None
    assert json.loads(rows[-1][3])["visibility"] == "operators"


@pytest.mark.django_db(transaction=True)
def test_event_json_of_fast_lane_writes_equals_event_wire(session, monkeypatch):
    """Events stored by append_many's raw-SQL fast lane read back the same way."""
    fast_writes: list[int] = []
    write_fast = services._write_fast

    def spy(**kw: Any) -> Any:
        out = write_fast(**kw)
        fast_writes.append(len(out[0]))
        return out

    monkeypatch.setattr(services, "_write_fast", spy)
    append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput("message.create", {"role": "assistant"}, message_id="m-ü")],
    )
    append_many(
        [
            AppendRequest(
                session_id=session.id,
                author=AGENT,
                events=[EventInput("message.append", {"delta": f'tok"{i}\\ é'}, "m-ü")],
            )
            for i in range(5)
        ]
        + [AppendRequest(session.id, AGENT, [EventInput("progress.x", TRICKY_DATA[2])])]
    )
    assert fast_writes == [6]
    wire, rows = _both(session.id)
    assert len(rows) == 7
    assert [json.loads(r[3]) for r in rows] == wire


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("types", "include_private"),
    [(None, False), (("progress.*",), False), (("note.internal", "message.*"), True)],
)
def test_event_json_filters_like_list_wire_events(session, types, include_private):
    _fill(session.id)
    wire, rows = _both(session.id, types=types, include_private=include_private, after=2)
    assert [json.loads(r[3]) for r in rows] == wire
    assert wire  # each case selects something


async def _drain(sub: Subscription) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for page in sub.history():
        assert len(page) <= 4
        out += [json.loads(e.json) for e in page]
    return out


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("hub_cleanup")
@pytest.mark.parametrize("after", [0, 3, 7])
@pytest.mark.parametrize(
    ("types", "include_private"),
    [(None, False), (None, True), (["progress.*"], False), (["note.internal"], True)],
)
async def test_paged_replay_is_exact(session, settings, after, types, include_private):
    """Pages (with the next one read ahead) give each visible, matching event once, in order."""
    settings.BATON_REPLAY_PAGE = 4
    for i in range(14):
        author, event_type = (OPERATOR, "note.internal") if i % 3 == 0 else (AGENT, "progress.i")
        await database_sync_to_async(append_events)(
            session_id=session.id,
            author=author,
            events=[EventInput(type=event_type, data={"i": i})],
        )
    expected = await database_sync_to_async(selectors.list_wire_events)(
        session_id=session.id,
        after=after,
        upto=14,
        limit=100,
        types=types,
        include_private=include_private,
    )
    sub = Subscription(
        session_id=session.id, after=after, types=types, include_private=include_private
    )
    assert await sub.open() == 14
    try:
        assert await _drain(sub) == expected
    finally:
        sub.close()
    assert sub.replayed == len(expected)
    assert sub.position == 14


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("hub_cleanup")
@pytest.mark.parametrize("count", [8, 9])  # a multiple of the page size, and not
async def test_websocket_resume_over_pages_then_live(session, agent_key, settings, count):
    settings.BATON_REPLAY_PAGE = 4
    await database_sync_to_async(append_events)(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(type="progress.step", data={"i": i}) for i in range(count)],
    )
    client = await WsClient(session.id, agent_key, "after=1&types=progress.*").connect()
    attached = await client.until("attached")
    assert attached["replayed"] == count - 1
    assert client.seqs() == list(range(2, count + 1))
    assert [f["op"] for f in client.frames].count("events") == -(-(count - 1) // 4)
    await database_sync_to_async(append_events)(
        session_id=session.id, author=AGENT, events=[EventInput(type="progress.live", data={})]
    )
    live = await client.until_event("progress.live")
    assert client.seqs() == [*range(2, count + 1), live["seq"]]
    await client.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("hub_cleanup")
async def test_leaving_a_replay_early_drops_the_read_ahead(session, settings):
    settings.BATON_REPLAY_PAGE = 2
    await database_sync_to_async(append_events)(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(type="progress.step", data={"i": i}) for i in range(6)],
    )
    sub = Subscription(session_id=session.id, after=0, types=None, include_private=False)
    await sub.open()
    pages = sub.history()
    first = await anext(pages)
    assert [e.seq for e in first] == [1, 2]
    await pages.aclose()  # the read of the next page is in flight; it is cancelled, not leaked
    assert sub.replayed == 2
    sub.close()
