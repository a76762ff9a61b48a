"""The WebSocket protocol through Channels' WebsocketCommunicator."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from project.asgi import application
from sessions_app import hub as hub_module
from sessions_app.hub import WireEvent
from sessions_app.identity import Author
from sessions_app.models import Connection, Event
from sessions_app.services import EventInput, append_events
from sessions_app.streams import SlowConsumer, Subscription
from tests.sessions_app.conftest import Closed, WsClient

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub_cleanup")]

AGENT = Author(kind="agent", id="test-agent", name="test-agent")
USER = Author(kind="user", id="user-1", name="User-1")
OPERATOR = Author(kind="operator", id="olivia", name="Olivia")


def _append(session_id: str, author: Author, *events: tuple[str, dict[str, Any]], **kw: Any):
    return append_events(
        session_id=session_id,
        author=author,
        events=[EventInput(type=t, data=d, **kw) for t, d in events],
    )


append = database_sync_to_async(_append)


async def progress(session_id: str, n: int, author: Author = AGENT) -> None:
    for i in range(n):
        await append(session_id, author, ("progress.step", {"i": i}))


async def test_attach_replays_history_then_goes_live(session, agent_key):
    await progress(session.id, 3)
    client = await WsClient(session.id, agent_key).connect()
    attached = await client.attach()
    assert attached["head"] == 3
    assert attached["replayed"] == 3
    assert client.seqs() == [1, 2, 3]
    assert [m["client_id"] for m in attached["presence"]] == ["test-agent"]
    await progress(session.id, 2)
    await client.until_seq(7)  # presence.enter (4), diagnostics (5, hidden), the two steps
    assert client.seqs() == [1, 2, 3, 4, 6, 7]
    await client.close()


async def test_resume_after_delivers_only_the_rest(session, agent_key):
    await progress(session.id, 5)
    client = await WsClient(session.id, agent_key, "after=3").connect()
    attached = await client.until("attached")
    assert client.seqs() == [4, 5]
    assert attached["replayed"] == 2
    await client.close()


async def test_type_filter_applies_to_history_and_live(session, agent_key, make_token):
    await append(session.id, AGENT, ("message.create", {"role": "assistant"}))
    await append(session.id, AGENT, ("progress.tool", {"name": "search"}))
    client = await WsClient(session.id, make_token(session.id)).connect()
    await client.attach(types=["progress.*"])
    assert [e["type"] for e in client.events] == ["progress.tool"]
    await append(session.id, AGENT, ("signal.custom", {}), ("progress.step", {"n": 1}))
    event = await client.until_event("progress.step")
    assert event["seq"] == 6  # 3: presence.enter, 4: connection.opened, 5: signal.custom
    assert {e["type"] for e in client.events} == {"progress.tool", "progress.step"}
    await client.close()


async def test_snapshot_attach_sends_messages_then_only_later_events(session, agent_key):
    mid = (await append(session.id, AGENT, ("message.create", {"role": "assistant"})))[0]
    await append(session.id, AGENT, ("message.append", {"delta": "Hel"}), message_id=mid.message_id)
    await append(session.id, AGENT, ("message.append", {"delta": "lo"}), message_id=mid.message_id)
    client = await WsClient(session.id, agent_key).connect()
    await client.send({"op": "attach", "snapshot": True})
    snapshot = await client.until("snapshot")
    assert snapshot["seq"] == 3
    assert snapshot["messages"][0]["content"] == "Hello"
    attached = await client.until("attached")
    assert attached["replayed"] == 0
    assert client.events == []
    await client.close()


async def test_publish_ack_and_idempotent_retry(session, agent_key):
    client = await WsClient(session.id, agent_key).connect()
    first = await client.publish("a", type="progress.step", data={"x": 1}, client_ref="ref-1")
    again = await client.publish("b", type="progress.step", data={"x": 1}, client_ref="ref-1")
    assert first["op"] == again["op"] == "ack"
    assert first["seq"] == again["seq"] == 1
    assert again["duplicate"] is True
    assert await database_sync_to_async(Event.objects.filter(session=session).count)() == 1
    await client.close()


async def test_batch_publish_is_atomic(session, agent_key):
    client = await WsClient(session.id, agent_key).connect()
    await client.send(
        {
            "op": "publish",
            "ref": "batch",
            "events": [
                {"type": "message.create", "message_id": "m1", "data": {"role": "assistant"}},
                {"type": "message.append", "message_id": "m1", "data": {"delta": "hi"}},
            ],
        }
    )
    ack = await client.until("ack")
    assert ack["seqs"] == [1, 2]
    await client.send(
        {
            "op": "publish",
            "ref": "bad",
            "events": [
                {"type": "progress.ok", "data": {}},
                {"type": "message.append", "message_id": "nope", "data": {"delta": "x"}},
            ],
        }
    )
    error = await client.until("error")
    assert error["code"] == "message_not_found"
    assert error["ref"] == "bad"
    assert await database_sync_to_async(Event.objects.filter(session=session).count)() == 2
    await client.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ("[1,2]", "bad_frame"),
        ('{"op":"fly"}', "unknown_op"),
        ('{"op":"publish","ref":"x","event":{"type":"nope.nope"}}', "invalid_event"),
        ('{"op":"publish","ref":"x","event":{"type":"progress.a","data":[1]}}', "invalid_event"),
        ('{"op":"publish","ref":"x","event":{"type":"message.append","data":{}}}', "invalid_event"),
        ('{"op":"publish","ref":"x","event":{"type":"presence.enter"}}', "forbidden"),
        ('{"op":"publish","ref":"x"}', "bad_frame"),
        ('{"op":"received","seq":-1}', "bad_frame"),
        ('{"op":"typing","state":true}', "not_attached"),
    ],
)
async def test_bad_frames_get_error_frames_and_change_nothing(session, agent_key, frame, code):
    client = await WsClient(session.id, agent_key).connect()
    other = await WsClient(session.id, agent_key).connect()
    await other.attach()
    await client.send(frame)
    error = await client.until("error")
    assert error["code"] == code
    # The connection survives, and another connection is unaffected.
    await client.send({"op": "ping"})
    assert (await client.until("pong"))["op"] == "pong"
    await other.send({"op": "ping"})
    await other.until("pong")
    assert (
        await database_sync_to_async(
            Event.objects.filter(session=session)
            .exclude(type__startswith="presence")
            .exclude(type__startswith="connection")
            .count
        )()
        == 0
    )
    await client.close()
    await other.close()


async def test_oversized_frame_and_event(session, agent_key, settings):
    settings.BATON_MAX_EVENT_BYTES = 100
    client = await WsClient(session.id, agent_key).connect()
    big = await client.publish("big", type="progress.blob", data={"x": "y" * 200})
    assert big["code"] == "payload_too_large"
    settings.BATON_MAX_FRAME_BYTES = 300
    await client.send({"op": "publish", "ref": "huge", "event": {"data": "z" * 400}})
    assert (await client.until("error"))["code"] == "payload_too_large"
    assert await database_sync_to_async(Event.objects.filter(session=session).count)() == 0
    await client.close()


async def test_binary_frame_closes_with_4400(session, agent_key):
    client = await WsClient(session.id, agent_key).connect()
    await client.communicator.send_to(bytes_data=b"\x00\x01")
    assert await client.expect_close() == 4400


@pytest.mark.parametrize("after", ["-1", "abc", "99"])
async def test_bad_after_closes_with_4400(session, agent_key, after):
    client = await WsClient(session.id, agent_key, f"after={after}").connect()
    error = await client.until("error")
    assert error["code"] == "bad_after"
    assert await client.expect_close() == 4400


async def test_attach_twice_is_a_protocol_violation(session, agent_key):
    client = await WsClient(session.id, agent_key).connect()
    await client.attach()
    await client.send({"op": "attach"})
    assert await client.expect_close() == 4400


async def test_auth_close_codes(session, make_session, make_token, agent_key):
    other = await database_sync_to_async(make_session)()
    cases = [
        (WsClient(session.id, "garbage"), 4401),
        (WsClient(session.id, "ct_forged.value"), 4401),
        (WsClient(session.id), 4401),
        (WsClient(session.id, make_token(other.id)), 4403),
        (WsClient("ses_missing", agent_key), 4404),
    ]
    for client, code in cases:
        await client.connect()
        assert await client.expect_close() == code


async def test_expired_token_is_refused(session, make_token):
    token = make_token(session.id, ttl=1)
    await asyncio.sleep(1.2)
    client = await WsClient(session.id, token).connect()
    assert (await client.until("error"))["code"] == "unauthenticated"
    assert client.closed_code is None
    assert await client.expect_close() == 4401


async def test_capabilities_are_enforced(session, make_token):
    reader = await WsClient(
        session.id, make_token(session.id, capabilities=["subscribe"])
    ).connect()
    await reader.attach()
    refused = await reader.publish("p", type="message.create", data={"role": "user"})
    assert refused["code"] == "forbidden"
    writer = await WsClient(session.id, make_token(session.id, capabilities=["publish"])).connect()
    ok = await writer.publish("p", type="message.create", data={"role": "user", "content": "hi"})
    assert ok["op"] == "ack"
    await writer.send({"op": "attach"})
    assert (await writer.until("error"))["code"] == "forbidden"
    # A user may not impersonate the assistant.
    impostor = await writer.publish("q", type="message.create", data={"role": "assistant"})
    assert impostor["code"] == "forbidden"
    await reader.close()
    await writer.close()


async def test_presence_enter_once_per_client_and_leave_reasons(session, agent_key, make_token):
    agent = await WsClient(session.id, agent_key).connect()
    await agent.attach()
    token = make_token(session.id, "user-1")
    phone = await WsClient(session.id, token).connect()
    attached = await phone.attach()
    assert {m["client_id"] for m in attached["presence"]} == {"test-agent", "user-1"}
    enter = await agent.until_event("presence.enter")
    enter = await agent.until_event("presence.enter")
    assert enter["data"]["client_id"] == "user-1"
    laptop = await WsClient(session.id, token).connect()
    await laptop.attach()
    await phone.close(code=1000)  # one device goes: still present
    await laptop.close(code=1006)  # the last goes abnormally: leave at once, reason lost
    leave = await agent.until_event("presence.leave")
    assert leave["data"] == {
        "client_id": "user-1",
        "kind": "user",
        "name": "User-1",
        "reason": "lost",
    }
    enters = [e for e in agent.events if e["type"] == "presence.enter"]
    assert len(enters) == 2  # agent itself, user-1 once despite two devices
    user_again = await WsClient(session.id, token).connect()
    await user_again.attach()
    await user_again.close(code=1000)
    await agent.until_event("presence.enter")
    leave = await agent.until_event("presence.leave")
    assert leave["data"]["reason"] == "closed"
    # A dropped user connection is never a cancel.
    assert not [e for e in agent.events if e["type"].startswith("signal.")]
    await agent.close()


async def test_user_signals_reach_a_streaming_agent(session, agent_key, make_token):
    agent = await WsClient(session.id, agent_key).connect()
    await agent.attach()
    created = await agent.publish("c", type="message.create", data={"role": "assistant"})
    mid = created["message_id"]
    user = await WsClient(session.id, make_token(session.id)).connect()
    await user.attach()
    for i in range(5):
        await agent.publish(f"a{i}", type="message.append", message_id=mid, data={"delta": "x"})
    ack = await user.publish("cancel", type="signal.cancel", data={"message_id": mid})
    assert ack["op"] == "ack"
    signal = await agent.until_event("signal.cancel")
    assert signal["author"]["kind"] == "user"
    assert signal["data"]["message_id"] == mid
    done = await agent.publish(
        "done", type="message.complete", message_id=mid, data={"status": "cancelled"}
    )
    assert done["op"] == "ack"
    redirect = await user.publish("r", type="signal.redirect", data={"text": "shorter please"})
    assert redirect["op"] == "ack"
    assert (await agent.until_event("signal.redirect"))["data"]["text"] == "shorter please"
    await agent.close()
    await user.close()


async def test_internal_notes_and_diagnostics_reach_operators_only(
    session, agent_key, make_token, operator_user
):
    from channels.auth import login  # noqa: F401 - the cookie path is covered in handover tests

    user = await WsClient(session.id, make_token(session.id)).connect()
    await user.attach()
    agent = await WsClient(session.id, agent_key).connect()
    await agent.attach()
    note = await database_sync_to_async(_append)(
        session.id, OPERATOR, ("note.internal", {"text": "vip"})
    )
    await append(session.id, AGENT, ("progress.after_note", {}))
    await user.until_event("progress.after_note")
    await agent.until_event("progress.after_note")
    for client in (user, agent):
        types = {e["type"] for e in client.events}
        assert "note.internal" not in types
        assert not any(t.startswith("connection.") for t in types)
    stored = await database_sync_to_async(Event.objects.get)(seq=note[0].seq, session=session)
    assert stored.visibility == "operators"
    await user.close()
    await agent.close()


async def test_connection_lifecycle_is_recorded(session, agent_key):
    await progress(session.id, 2)
    client = await WsClient(session.id, agent_key, "after=1").connect()
    attached = await client.until("attached")
    await client.send({"op": "received", "seq": 2})
    await client.send({"op": "ping"})
    await client.until("pong")
    await client.close(code=1000)
    await asyncio.sleep(0.2)
    events = await database_sync_to_async(
        lambda: list(Event.objects.filter(session=session, type__startswith="connection."))
    )()
    assert [e.type for e in events] == ["connection.resumed", "connection.closed"]
    assert events[0].visibility == "diagnostics"
    assert events[0].data["after"] == 1
    assert events[0].data["replayed"] == 1
    assert events[0].data["connection_id"] == attached["connection_id"]
    assert events[1].data["code"] == 1000
    conn = await database_sync_to_async(Connection.objects.get)(pk=attached["connection_id"])
    assert conn.last_received_seq == 2
    assert conn.closed_at is not None


async def test_typing_is_ephemeral(session, make_token):
    a = await WsClient(session.id, make_token(session.id, "user-a")).connect()
    b = await WsClient(session.id, make_token(session.id, "user-b")).connect()
    await a.attach()
    await b.attach()
    await a.send({"op": "typing", "state": True})
    frame = await b.until("ephemeral")
    assert frame["type"] == "typing"
    assert frame["author"]["id"] == "user-a"
    assert frame["state"] is True
    assert (
        await database_sync_to_async(
            Event.objects.filter(session=session, type__contains="typing").count
        )()
        == 0
    )
    await a.close()
    await b.close()


async def test_catch_up_while_events_are_published_loses_nothing(session, agent_key):
    await progress(session.id, 200)
    stop = threading.Event()

    def writer() -> None:
        for i in range(150):
            _append(session.id, AGENT, ("progress.live", {"i": i}))
        connection.close()
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    client = await WsClient(session.id, agent_key).connect()
    await client.attach()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    from sessions_app.selectors import get_head

    assert await database_sync_to_async(get_head)(session.id) == 352  # 350 + enter + opened
    visible = await database_sync_to_async(
        lambda: list(
            Event.objects.filter(session=session, visibility="all").values_list("seq", flat=True)
        )
    )()
    head = max(visible)  # connection.opened is diagnostics: never sent to an agent
    await client.until_seq(head, timeout=20)
    assert [s for s in client.seqs() if s <= head] == sorted(visible)
    live = [e["data"]["i"] for e in client.events if e["type"] == "progress.live"]
    assert live == list(range(150))


async def test_a_lost_broadcast_is_repaired_from_the_database(
    session, agent_key, monkeypatch, settings
):
    settings.BATON_HEAD_CHECK_SECONDS = 0.2
    client = await WsClient(session.id, agent_key).connect()
    await client.attach()
    await client.until_event("presence.enter")
    real = hub_module._publish_now
    dropped: list[int] = []

    def lossy(session_id: str, events: list[dict[str, Any]]) -> None:
        if any(e["type"] == "progress.lost" for e in events):
            dropped.extend(e["seq"] for e in events)
            return  # the channel layer "lost" it
        real(session_id, events)

    monkeypatch.setattr(hub_module, "_publish_now", lossy)
    await append(session.id, AGENT, ("progress.lost", {"n": 1}))
    await append(session.id, AGENT, ("progress.next", {"n": 2}))
    await client.until_event("progress.next")
    assert [e["type"] for e in client.events[-2:]] == ["progress.lost", "progress.next"]
    # A lost *last* event in a quiet session is found by the periodic head check.
    await append(session.id, AGENT, ("progress.lost", {"n": 3}))
    event = await client.until_event("progress.lost", timeout=5)
    event = await client.until_event("progress.lost", timeout=5)
    assert event["data"] == {"n": 3}
    assert len(dropped) == 2
    assert client.seqs() == sorted(set(client.seqs()))


async def test_slow_consumer_is_closed_with_4408(session, agent_key, settings):
    settings.BATON_MAX_BUFFERED_EVENTS = 5
    client = await WsClient(session.id, agent_key).connect()
    await client.attach()
    await database_sync_to_async(append_events)(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(type="progress.flood", data={"i": i}) for i in range(20)],
    )
    assert await client.expect_close() == 4408
    assert client.frames[-1]["code"] == "too_slow"


async def test_subscription_overflow_raises_slow_consumer(session):
    sub = Subscription(
        session_id=session.id, after=0, types=None, include_private=False, max_buffer=3
    )
    sub.push([WireEvent(i, "progress.x", "all", "{}") for i in range(1, 5)])
    with pytest.raises(SlowConsumer):
        await sub.next_live()


async def test_frames_before_auth_failure_do_not_leak(session):
    client = await WsClient(session.id, "garbage").connect()
    with pytest.raises(Closed):
        while True:
            frame = await client.frame()
            assert frame["op"] == "error"


def _app_whose_send(before_events: Any, op: str = "events") -> Any:
    """The application behind a server whose send runs `before_events(message)` first for
    every frame of this `op`: waiting (back-pressure) or failing."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def server_send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.send" and f'"op":"{op}"' in message["text"]:
                await before_events(message)
            await send(message)

        await application(scope, receive, server_send)

    return app


async def test_a_server_send_that_waits_still_delivers_every_event_once_in_order(
    session, agent_key
):
    """Live frames are sent inside the fan-out when the server's send completes at once; one
    that has to wait is finished by a sender task, and nothing overtakes it."""
    waits = []

    async def wait_first(message: dict[str, Any]) -> None:
        waits.append(message)
        await asyncio.sleep(0.01)

    waiting = await WsClient(session.id, agent_key, app=_app_whose_send(wait_first)).connect()
    await waiting.attach()
    prompt = await WsClient(session.id, agent_key).connect()
    await prompt.attach()
    for start in range(0, 30, 3):
        steps = [("progress.step", {"i": i}) for i in range(start, start + 3)]
        await append(session.id, AGENT, *steps)
    for client in (waiting, prompt):
        while sum(e["type"] == "progress.step" for e in client.events) < 30:
            await client.frame()
    steps = [e["data"]["i"] for e in waiting.events if e["type"] == "progress.step"]
    assert steps == list(range(30))
    assert waiting.seqs() == sorted(set(waiting.seqs()))
    assert [e["seq"] for e in prompt.events if e["type"] == "progress.step"] == [
        e["seq"] for e in waiting.events if e["type"] == "progress.step"
    ]
    assert len(waits) > 1  # live frames went through the waiting send
    await waiting.close()
    await prompt.close()


async def test_a_server_send_that_fails_at_once_leaves_the_other_subscribers_alone(
    session, agent_key, caplog
):
    async def fail(message: dict[str, Any]) -> None:
        raise OSError("the client went away")

    failing = await WsClient(session.id, agent_key, app=_app_whose_send(fail)).connect()
    await failing.attach()
    healthy = await WsClient(session.id, agent_key).connect()
    await healthy.attach()
    await progress(session.id, 3)
    event = await healthy.until_event("progress.step")
    assert event["data"] == {"i": 0}
    await progress(session.id, 2)
    steps = [e for e in healthy.events if e["type"] == "progress.step"]
    while len(steps) < 5:
        await healthy.frame()
        steps = [e for e in healthy.events if e["type"] == "progress.step"]
    assert [e["data"]["i"] for e in steps] == [0, 1, 2, 0, 1]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    await healthy.close()
    await failing.communicator.disconnect()


async def test_acks_keep_publish_order_when_the_server_send_waits(session, agent_key):
    """Acks are sent as commits land, inside the writer's callback when the send completes at
    once; one that has to wait is finished by a task and nothing overtakes it."""
    waits = []

    async def wait(message: dict[str, Any]) -> None:
        waits.append(message)
        await asyncio.sleep(0.03 if len(waits) == 1 else 0.001)  # a later ack must not pass

    agent = await WsClient(session.id, agent_key, app=_app_whose_send(wait, op="ack")).connect()
    for i in range(20):  # pipelined: no publish waits for the previous one's ack
        await agent.send(
            {"op": "publish", "ref": f"r{i}", "event": {"type": "progress.step", "data": {"i": i}}}
        )
    acks = []
    while len(acks) < 20:
        frame = await agent.frame()
        if frame["op"] == "ack":
            acks.append(frame)
    assert [a["ref"] for a in acks] == [f"r{i}" for i in range(20)]
    assert [a["seq"] for a in acks] == list(range(1, 21))
    assert len(waits) == 20
    await agent.close()


async def test_a_publish_the_database_does_not_take_is_answered_with_an_error(
    session, agent_key, monkeypatch, settings
):
    """A batch whose transaction fails as a whole stores nothing; each of its publishers hears
    so (with its ref), and the connection carries on."""
    from django.db import OperationalError

    from sessions_app import writer as writer_module

    settings.BATON_SQLITE_LOOP_WRITES = False  # through `append_many`, on every database
    real = writer_module.append_many

    def database_down(requests: Any) -> Any:
        raise OperationalError("the database is gone")

    agent = await WsClient(session.id, agent_key).connect()
    monkeypatch.setattr(writer_module, "append_many", database_down)
    failed = await agent.publish("lost", type="progress.step", data={"i": 1})
    assert failed == {
        "op": "error",
        "code": "unavailable",
        "message": "The database did not take the publish.",
        "ref": "lost",
    }
    monkeypatch.setattr(writer_module, "append_many", real)
    ok = await agent.publish("kept", type="progress.step", data={"i": 2})
    assert ok["op"] == "ack" and ok["seq"] == 1
    await agent.close()
