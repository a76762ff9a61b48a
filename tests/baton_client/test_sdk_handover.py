"""While an operator holds the session, an agent's message publishes raise ControlledByHuman."""

from __future__ import annotations

import asyncio

import pytest

from baton_client import BatonClient, ControlledByHuman, Session

from .conftest import LiveServer


def set_status(server: LiveServer, session_id: str, status: str) -> None:
    """Flip the stored status the way a claim does, without an operator login.

    The publish path reads the status from the database in the same transaction that
    allocates the seq, so this is exactly what the server checks.
    """
    server.db.execute(
        "UPDATE sessions_app_session SET status = %s WHERE id = %s", (status, session_id)
    )


async def test_server_refusal_maps_to_controlled_by_human(baton_server, agent: BatonClient):
    info = await agent.create_session(title="claimed")
    session = await agent.connect(info["id"])
    set_status(baton_server, info["id"], "with_human")
    with pytest.raises(ControlledByHuman) as caught:
        async with session.stream_message() as msg:
            await msg.append("never sent")
    assert caught.value.code == "controlled_by_human"
    with pytest.raises(ControlledByHuman):
        await session.send_message("nor this")
    # Non-message publishes are still allowed: the agent may report progress or ask for help.
    assert (await session.progress("waiting", {"why": "operator"})).seq > 0

    set_status(baton_server, info["id"], "active")  # released
    async with session.stream_message() as msg:
        await msg.append("back")
    assert msg.status == "complete"
    await session.close()


def event(seq: int, type_: str, **data: object) -> dict:
    return {
        "seq": seq,
        "id": f"evt_{seq}",
        "type": type_,
        "message_id": None,
        "author": {"kind": "system", "id": "baton", "name": "Baton"},
        "data": data,
    }


async def test_claim_seen_blocks_locally_until_release():
    """Once `handover.claimed` is seen the SDK refuses before sending anything."""
    client = BatonClient("http://127.0.0.1:9", "bk_unused")
    session = Session(client, "ses_local", kind="agent")
    session.status = "active"
    session._status_seq = 0

    session._handle_event(event(1, "handover.requested", reason="refund"))
    assert session.status == "awaiting_human"
    session._handle_event(event(2, "handover.claimed", operator="op-1"))
    assert session.status == "with_human"
    assert session.controlled_by_human
    assert session.controller == "op-1"
    with pytest.raises(ControlledByHuman):
        async with session.stream_message():
            pass
    with pytest.raises(ControlledByHuman):
        await session.publish("message.create", {"role": "assistant", "content": "x"})
    assert session._pending == {}  # nothing was queued for sending

    released = asyncio.create_task(session.wait_until_released(timeout=5))
    await asyncio.sleep(0)
    assert not released.done()
    session._handle_event(event(3, "handover.released"))
    await released
    assert session.status == "active"
    session._check_may_message()  # no longer raises
    session._handle_event(event(4, "session.closed"))
    assert session.status == "closed"
    await client.aclose()


async def test_status_events_before_the_loaded_status_are_ignored():
    """A replay of old handover events must not roll back the status read over REST."""
    client = BatonClient("http://127.0.0.1:9", "bk_unused")
    session = Session(client, "ses_local", kind="agent")
    session.status = "active"
    session._status_seq = 10  # status as of seq 10
    session._handle_event(event(5, "handover.claimed", operator="op"))
    assert session.status == "active"
    session._handle_event(event(11, "handover.requested", reason="x"))
    assert session.status == "awaiting_human"
    await client.aclose()


async def test_claim_mid_stream_stops_the_stream(baton_server, agent: BatonClient):
    """The server refuses the next append; the block raises ControlledByHuman, sends no more."""
    info = await agent.create_session(title="claimed-mid-stream")
    session = await agent.connect(info["id"])
    with pytest.raises(ControlledByHuman):
        async with session.stream_message(window=0.01) as msg:
            await msg.append("first ")
            await msg.flush()
            set_status(baton_server, info["id"], "with_human")
            for _ in range(200):
                await msg.append("more ")
                await asyncio.sleep(0.01)
    assert msg.status == "streaming"  # no complete was attempted: it would be refused too
    await session.close()
