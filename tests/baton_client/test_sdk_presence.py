"""Presence tracking, wait_for_user, and the close codes that must not be retried."""

from __future__ import annotations

import asyncio

import pytest

from baton_client import (
    BatonClient,
    Forbidden,
    ProtocolViolation,
    SessionNotFound,
    Unauthenticated,
)


async def test_wait_for_user_returns_when_a_user_attaches(baton_server, agent: BatonClient):
    info = await agent.create_session(title="presence")
    session = await agent.connect(info["id"])
    changes: list[tuple[str, str]] = []
    session.on_presence(lambda change, member: changes.append((change, member["client_id"])))
    assert "agent" in session.members
    assert session.users == []

    async def first_enter() -> tuple[str, dict]:
        async for change, member in session.presence_changes():
            if change == "enter":
                return change, member
        raise AssertionError("presence iterator ended")

    entering = asyncio.create_task(first_enter())
    waiting = asyncio.create_task(session.wait_for_user(timeout=15))
    await asyncio.sleep(0.3)
    assert not waiting.done()

    token = await agent.mint_token(info["id"], "alice", kind="user", name="Alice")
    async with BatonClient(baton_server.url, token["token"]) as alice_client:
        alice = await alice_client.connect(info["id"])
        member = await waiting
        assert member["client_id"] == "alice"
        assert member["kind"] == "user"
        assert (await entering)[1]["client_id"] == "alice"
        assert "alice" in session.members
        # The user sees the agent in the `attached` presence.
        assert alice.members["agent"]["kind"] == "agent"
        await alice.close()

    await session.wait_for(lambda s: not s.users, timeout=10)
    assert "alice" not in session.members
    await asyncio.sleep(0.05)  # handlers run on their own task
    assert ("enter", "alice") in changes
    assert ("leave", "alice") in changes
    await session.close()


async def test_wait_for_user_times_out(agent: BatonClient):
    info = await agent.create_session(title="alone")
    session = await agent.connect(info["id"])
    with pytest.raises(TimeoutError):
        await session.wait_for_user(timeout=0.2)
    await session.close()


async def test_bad_credential_is_fatal(baton_server, agent: BatonClient):
    info = await agent.create_session(title="fatal")
    async with BatonClient(baton_server.url, "bk_not_a_real_key") as bad:
        with pytest.raises(Unauthenticated):
            await bad.connect(info["id"], timeout=10)


async def test_unknown_session_is_fatal(agent: BatonClient):
    with pytest.raises(SessionNotFound):
        await agent.connect("ses_does_not_exist", timeout=10)


async def test_token_of_another_session_is_fatal(baton_server, agent: BatonClient):
    mine = await agent.create_session(title="mine")
    other = await agent.create_session(title="other")
    token = await agent.mint_token(mine["id"], "bob", kind="user")
    async with BatonClient(baton_server.url, token["token"]) as bob:
        with pytest.raises(Forbidden):
            await bob.connect(other["id"], timeout=10)


async def test_fatal_close_code_from_the_socket(baton_server, agent: BatonClient):
    """Skip the REST status read so the refusal can only come from the WebSocket close code."""
    from baton_client import Session

    info = await agent.create_session(title="fatal-socket")
    async with BatonClient(baton_server.url, "bk_not_a_real_key") as bad:
        session = Session(bad, info["id"], backoff_base=0.05)

        async def no_status() -> None:
            return None

        session._load_status = no_status  # type: ignore[method-assign]
        with pytest.raises(Unauthenticated) as caught:
            await session.start(timeout=10)
        assert caught.value.close_code == 4401
        assert session.reconnects == 0


async def test_resume_position_beyond_head_is_fatal(agent: BatonClient):
    """`after` past the head (e.g. a reset database) cannot be resumed: fail loudly."""
    info = await agent.create_session(title="bad-after")
    with pytest.raises(ProtocolViolation) as caught:
        await agent.connect(info["id"], after=10_000, timeout=10)
    assert caught.value.reason == "bad_after"


async def test_type_filter_still_tracks_presence(
    baton_server, agent: BatonClient, rest, eventually
):
    """`types` limits what events() yields; presence and status are still followed."""
    info = await agent.create_session(title="filtered")
    session = await agent.connect(info["id"], types=["progress.*"])
    seen: list[str] = []

    async def read() -> None:
        async for event in session.events():
            seen.append(event["type"])

    reading = asyncio.create_task(read())
    token = await agent.mint_token(info["id"], "carol", kind="user")
    async with BatonClient(baton_server.url, token["token"]) as carol_client:
        carol = await carol_client.connect(info["id"])
        await session.wait_for_user(timeout=10)
        await carol.publish("signal.custom", {})
        rest.publish(info["id"], {"type": "progress.step", "data": {}})
        await eventually(lambda: "progress.step" in seen)
        await carol.close()
    assert set(seen) == {"progress.step"}
    reading.cancel()
    await session.close()


async def test_connect_waits_for_a_server_that_is_starting(own_server):
    """A server that is down at connect time is retried until it answers (within timeout)."""
    async with BatonClient(own_server.url, own_server.agent_key) as client:
        info = await client.create_session(title="early")
        own_server.stop()

        async def start_later() -> None:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_server.start)

        starting = asyncio.create_task(start_later())
        session = await client.connect(info["id"], timeout=30, backoff_base=0.1, backoff_max=0.5)
        await starting
        assert session.connected
        assert session.status == "active"
        await session.close()
