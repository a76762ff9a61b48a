"""Sockets: the console's `/ws/console/` and the operator's cookie socket on a session."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from handover import services
from project.asgi import application
from sessions_app.services import EventInput, append_events
from tests.handover.conftest import AGENT, OLIVIA, USER, cookie_headers
from tests.sessions_app.conftest import WsClient

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub_cleanup")]


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


async def console_socket(headers: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/ws/console/", headers=headers or [])
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def close_code(communicator: WebsocketCommunicator) -> int | None:
    while True:
        output = await communicator.receive_output(3)
        if output["type"] == "websocket.close":
            return output.get("code")


async def next_state(communicator: WebsocketCommunicator, timeout: float = 3) -> dict[str, Any]:
    while True:
        frame = json.loads(await communicator.receive_from(timeout))
        if frame["op"] == "state":
            return frame


async def test_console_socket_refuses_anonymous_non_operators_and_foreign_origins(
    operator_user, plain_user
):
    assert await close_code(await console_socket()) == 4401
    mallory = await database_sync_to_async(logged_in)(plain_user)
    assert await close_code(await console_socket(cookie_headers(mallory))) == 4403
    olivia = await database_sync_to_async(logged_in)(operator_user)
    evil = cookie_headers(olivia, origin="http://evil.example")
    assert await close_code(await console_socket(evil)) == 4403


async def test_console_socket_pushes_the_queue_when_a_human_is_requested(
    operator_user, make_session
):
    session = await database_sync_to_async(make_session)()
    olivia = await database_sync_to_async(logged_in)(operator_user)
    console = await console_socket(cookie_headers(olivia))
    first = await next_state(console)
    assert first["queue"] == []
    assert [s["id"] for s in first["sessions"]] == [session.id]

    await database_sync_to_async(services.request_handover)(
        session_id=session.id, author=USER, reason="help", summary="now"
    )
    # The poke arrives long before the periodic re-read (2 s).
    pushed = await next_state(console, timeout=1.5)
    assert [q["id"] for q in pushed["queue"]] == [session.id]
    assert pushed["queue"][0]["handover"]["reason"] == "help"

    await database_sync_to_async(services.claim)(session_id=session.id, operator=OLIVIA)
    assert (await next_state(console, timeout=1.5))["queue"] == []
    await console.disconnect()


async def test_console_socket_sees_sdk_requests_through_the_periodic_read(
    operator_user, make_session
):
    session = await database_sync_to_async(make_session)()
    olivia = await database_sync_to_async(logged_in)(operator_user)
    console = await console_socket(cookie_headers(olivia))
    await next_state(console)
    # A plain event (what the SDKs publish): no poke, the re-read finds it.
    await database_sync_to_async(append_events)(
        session_id=session.id,
        author=USER,
        events=[EventInput("handover.requested", {"reason": "sdk"})],
    )
    state = await next_state(console, timeout=4)
    assert [q["handover"]["reason"] for q in state["queue"]] == ["sdk"]
    await console.disconnect()


async def test_internal_notes_reach_the_operator_socket_only(
    operator_user, make_session, agent_key, make_token
):
    session = await database_sync_to_async(make_session)()
    olivia = await database_sync_to_async(logged_in)(operator_user)
    operator = await WsClient(session.id, query="after=0", headers=cookie_headers(olivia)).connect()
    await operator.until("attached")
    user = await WsClient(session.id, make_token(session.id), "after=0").connect()
    await user.until("attached")
    agent = await WsClient(session.id, agent_key, "after=0").connect()
    await agent.until("attached")

    ack = await operator.publish("n", type="note.internal", data={"text": "VIP, be nice"})
    assert ack["op"] == "ack"
    await agent.publish("p", type="progress.tool", data={"name": "after-note"})
    for client in (user, agent, operator):
        await client.until_event("progress.tool")
    assert (await operator.until_event("note.internal"))["data"] == {"text": "VIP, be nice"}
    for client in (user, agent):
        seen = {e["type"] for e in client.events}
        assert "note.internal" not in seen
        assert not any(t.startswith("connection.") for t in seen)
    assert any(e["type"].startswith("connection.") for e in operator.events)

    # A user or an agent cannot write one either.
    refused = await user.publish("u", type="note.internal", data={"text": "x"})
    assert (refused["op"], refused["code"]) == ("error", "forbidden")
    for client in (operator, user, agent):
        await client.close()


async def test_agent_publish_refused_while_claimed_over_ws_and_allowed_after_release(
    operator_user, make_session, agent_key, make_token
):
    session = await database_sync_to_async(make_session)()
    agent = await WsClient(session.id, agent_key, "after=0").connect()
    await agent.until("attached")
    user = await WsClient(session.id, make_token(session.id), "after=0").connect()
    await user.until("attached")
    olivia = await database_sync_to_async(logged_in)(operator_user)
    operator = await WsClient(session.id, query="after=0", headers=cookie_headers(olivia)).connect()
    await operator.until("attached")

    await database_sync_to_async(services.request_handover)(
        session_id=session.id, author=AGENT, reason="out of my depth"
    )
    await database_sync_to_async(services.claim)(session_id=session.id, operator=OLIVIA)
    await agent.until_event("handover.claimed")

    refused = await agent.publish(
        "a1", type="message.create", data={"role": "assistant", "content": "Actually…"}
    )
    assert (refused["op"], refused["code"]) == ("error", "controlled_by_human")

    # The operator replies and types; the user gets both.
    await operator.send({"op": "typing", "state": True})
    typing = await user.until("ephemeral")
    assert (typing["type"], typing["author"]["kind"], typing["state"]) == (
        "typing",
        "operator",
        True,
    )
    reply = await operator.publish(
        "o1",
        type="message.create",
        data={"role": "operator", "content": "Hi, Olivia here", "status": "complete"},
    )
    assert reply["op"] == "ack"
    got = await user.until_event("message.create")
    assert (got["author"]["kind"], got["data"]["content"]) == ("operator", "Hi, Olivia here")
    await user.send({"op": "typing", "state": True})
    assert (await operator.until("ephemeral"))["author"]["kind"] == "user"

    await database_sync_to_async(services.release)(session_id=session.id, operator=OLIVIA)
    await agent.until_event("handover.released")
    again = await agent.publish(
        "a2",
        type="message.create",
        data={"role": "assistant", "content": "Back", "status": "complete"},
    )
    assert again["op"] == "ack"
    for client in (operator, user, agent):
        await client.close()
    await asyncio.sleep(0)
