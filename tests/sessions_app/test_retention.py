"""Retention: compaction keeps replays and resumes exact; purge removes old closed sessions."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from sessions_app.identity import Author
from sessions_app.models import Event, Message, Session
from sessions_app.retention import compact_session, parse_cutoff
from sessions_app.services import EventInput, append_events
from tests.sessions_app.conftest import WsClient

AGENT = Author(kind="agent", id="test-agent", name="test-agent")


def stream(session_id: str, message_id: str, deltas: list[str], complete: bool = True) -> None:
    events = [EventInput("message.create", {"role": "assistant"}, message_id=message_id)]
    events += [EventInput("message.append", {"delta": d}, message_id=message_id) for d in deltas]
    if complete:
        events.append(EventInput("message.complete", {}, message_id=message_id))
    append_events(session_id=session_id, author=AGENT, events=events)


def progress(session_id: str, n: int) -> None:
    append_events(
        session_id=session_id, author=AGENT, events=[EventInput("progress.step", {"n": n})]
    )


def build_old_session(session: Session) -> dict[str, int]:
    """m1 (1-5) and m2 (7-11) complete, m3 still streaming (12-14), all 40 days old; then a
    fresh event (15). Returns the interesting seqs."""
    stream(session.id, "m1", ["Hel", "lo", " world"])  # 1 create, 2-4 appends, 5 complete
    progress(session.id, 1)  # 6
    stream(session.id, "m2", ["a", "b", "c"])  # 7 create, 8-10, 11 complete
    stream(session.id, "m3", ["x", "y"], complete=False)  # 12 create, 13-14
    Event.objects.filter(session=session).update(created_at=timezone.now() - timedelta(days=40))
    progress(session.id, 2)  # 15, fresh
    return {"m3_created": 12, "head": 15}


def replay(events: list[dict[str, Any]], messages: dict[str, str] | None = None) -> dict[str, str]:
    """Rebuild message contents the way a client does."""
    messages = dict(messages or {})
    for e in events:
        if e["type"] == "message.create":
            messages[e["message_id"]] = e["data"].get("content") or ""
        elif e["type"] == "message.append":
            messages[e["message_id"]] += e["data"]["delta"]
        elif e["type"] == "message.update":
            messages[e["message_id"]] = e["data"]["content"]
    return messages


@pytest.mark.django_db
def test_compaction_folds_the_tokens_of_old_complete_messages_only(session):
    build_old_session(session)
    out = io.StringIO()
    call_command("compact_sessions", "--older-than", "30d", stdout=out)
    assert "compacted 1 sessions, 6 events folded" in out.getvalue()
    session.refresh_from_db()
    assert session.compacted_through == 11  # m3 is still streaming: it and what follows stay
    left = list(Event.objects.filter(session=session).order_by("seq"))
    assert [e.seq for e in left] == [1, 5, 6, 7, 11, 12, 13, 14, 15]
    assert left[0].data == {"role": "assistant", "content": "Hello world", "compacted": True}
    assert Message.objects.get(session=session, message_id="m1").content == "Hello world"
    wire = [{"type": e.type, "message_id": e.message_id, "data": e.data} for e in left]
    assert replay(wire) == {"m1": "Hello world", "m2": "abc", "m3": "xy"}
    # Idempotent; and m3 is folded once it is complete and old.
    assert compact_session(session_id=session.id, cutoff=parse_cutoff("30d")).events_deleted == 0
    append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput("message.complete", {}, message_id="m3")],
    )  # 16
    later = timezone.now() + timedelta(days=1)
    result = compact_session(session_id=session.id, cutoff=later)
    assert (result.through, result.events_deleted) == (16, 2)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("hub_cleanup")
async def test_a_resume_inside_a_compacted_range_gets_a_snapshot_then_the_rest(session, agent_key):
    await database_sync_to_async(build_old_session)(session)
    await database_sync_to_async(call_command)(
        "compact_sessions", "--older-than", "30d", stdout=io.StringIO()
    )
    # A client that had seen m1 up to "Hel" (seq 2) resumes.
    client = await WsClient(session.id, agent_key, query="after=2").connect()
    snapshot = await client.until("snapshot")
    attached = await client.until("attached")
    assert snapshot["seq"] == 11 and snapshot["compacted"] is True
    assert [(m["message_id"], m["content"], m["status"]) for m in snapshot["messages"]] == [
        ("m1", "Hello world", "complete"),
        ("m2", "abc", "complete"),
    ]
    visible = [e for e in client.events if e["type"].startswith(("message.", "progress."))]
    assert [e["seq"] for e in visible] == [12, 13, 14, 15]
    assert client.events[0]["seq"] > 11
    assert attached["head"] >= 15
    state = {m["message_id"]: m["content"] for m in snapshot["messages"]}
    assert replay(client.events, state) == {"m1": "Hello world", "m2": "abc", "m3": "xy"}
    await client.close()

    # From the start: no snapshot needed, the rewritten creates carry the content.
    client = await WsClient(session.id, agent_key, query="after=0").connect()
    await client.until("attached")
    assert not [f for f in client.frames if f["op"] == "snapshot"]
    assert replay(client.events) == {"m1": "Hello world", "m2": "abc", "m3": "xy"}
    await client.close()

    # After the compacted range: plain resume.
    client = await WsClient(session.id, agent_key, query="after=12").connect()
    await client.until("attached")
    assert not [f for f in client.frames if f["op"] == "snapshot"]
    assert client.events[0]["seq"] == 13
    await client.close()


@pytest.mark.django_db
def test_rest_history_inside_a_compacted_range_starts_with_the_snapshot(session, api: APIClient):
    build_old_session(session)
    call_command("compact_sessions", "--older-than", "30d", stdout=io.StringIO())
    body = api.get(f"/api/v1/sessions/{session.id}/events?after=3").json()
    assert body["snapshot"]["seq"] == 11
    assert [m["content"] for m in body["snapshot"]["messages"]] == ["Hello world", "abc"]
    assert body["events"][0]["seq"] == 12
    plain = api.get(f"/api/v1/sessions/{session.id}/events?after=0").json()
    assert "snapshot" not in plain and plain["events"][0]["data"]["content"] == "Hello world"


@pytest.mark.django_db
def test_purge_deletes_closed_sessions_past_retention_only(make_session):
    old = timezone.now() - timedelta(days=60)
    closed_old, closed_new, open_old = make_session("a"), make_session("b"), make_session("c")
    for s in (closed_old, closed_new, open_old):
        stream(s.id, "m", ["t"])
    Session.objects.filter(pk=closed_old.pk).update(status="closed", updated_at=old)
    Session.objects.filter(pk=closed_new.pk).update(status="closed")
    Session.objects.filter(pk=open_old.pk).update(updated_at=old)
    out = io.StringIO()
    call_command("purge_sessions", "--closed-before", "30d", stdout=out)
    assert "purged 1 closed sessions" in out.getvalue()
    assert set(Session.objects.values_list("pk", flat=True)) == {closed_new.pk, open_old.pk}
    assert not Event.objects.filter(session_id=closed_old.pk).exists()
    call_command("purge_sessions", "--closed-before", "2000-01-01", stdout=out)
    assert Session.objects.count() == 2


def test_cutoffs_parse():
    now = timezone.now()
    assert parse_cutoff("30d", now=now) == now - timedelta(days=30)
    assert parse_cutoff("12h", now=now) == now - timedelta(hours=12)
    assert parse_cutoff("2026-01-01").isoformat() == "2026-01-01T00:00:00+00:00"
    with pytest.raises(ValueError):
        parse_cutoff("soon")


async def test_an_sse_resume_inside_a_compacted_range_starts_with_the_snapshot(
    server, session, agent_key
):
    await database_sync_to_async(build_old_session)(session)
    await database_sync_to_async(call_command)(
        "compact_sessions", "--older-than", "30d", stdout=io.StringIO()
    )
    headers = {"Authorization": f"Bearer {agent_key}"}
    blocks: list[str] = []
    async with (
        httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as http,
        http.stream("GET", f"/api/v1/sessions/{session.id}/events/stream?after=2") as response,
    ):
        buffer = ""
        async for chunk in response.aiter_text():
            buffer += chunk
            *done, buffer = buffer.split("\n\n")
            blocks += done
            if any(b.startswith("event: attached") for b in blocks):
                break
    named = [b for b in blocks if b.startswith("event: snapshot")]
    assert len(named) == 1
    snapshot = json.loads(named[0].split("data: ", 1)[1])
    assert snapshot["seq"] == 11
    assert [m["content"] for m in snapshot["messages"]] == ["Hello world", "abc"]
    ids = [int(line[4:]) for b in blocks for line in b.splitlines() if line.startswith("id: ")]
    assert ids and min(ids) > 11
