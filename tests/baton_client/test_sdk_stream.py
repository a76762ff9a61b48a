"""Streaming messages: coalescing, update, failure, cancellation by a user."""

from __future__ import annotations

import asyncio

import pytest

from baton_client import BatonClient, BatonREST, MessageCancelled


def message(rest: BatonREST, session_id: str, message_id: str) -> dict:
    snapshot = rest.messages(session_id)
    (found,) = [m for m in snapshot["messages"] if m["message_id"] == message_id]
    return found


def types_of(rest: BatonREST, session_id: str, message_id: str) -> list[str]:
    return [e["type"] for e in rest.iter_history(session_id) if e["message_id"] == message_id]


async def test_appends_within_the_window_become_one_publish(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="coalesce")
    session = await agent.connect(info["id"])
    async with session.stream_message(window=0.2) as msg:
        for token in ["Hel", "lo", ", ", "wor", "ld"]:
            await msg.append(token)
    history = [e for e in rest.iter_history(info["id"]) if e["message_id"] == msg.message_id]
    appends = [e for e in history if e["type"] == "message.append"]
    assert [e["data"]["delta"] for e in appends] == ["Hello, world"]
    assert [e["type"] for e in history] == ["message.create", "message.append", "message.complete"]
    assert history[0]["data"]["status"] == "streaming"
    assert message(rest, info["id"], msg.message_id)["content"] == "Hello, world"
    await session.close()


async def test_update_republishes_the_same_message(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="update")
    session = await agent.connect(info["id"])
    async with session.stream_message() as msg:
        await msg.append("draft answer")
        await msg.update("Final answer")
        await msg.append("!")
    assert types_of(rest, info["id"], msg.message_id) == [
        "message.create",
        "message.append",
        "message.update",
        "message.append",
        "message.complete",
    ]
    stored = message(rest, info["id"], msg.message_id)
    assert stored["content"] == "Final answer!"
    assert stored["status"] == "complete"
    await session.close()


async def test_exception_in_block_completes_failed(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="failed")
    session = await agent.connect(info["id"])
    with pytest.raises(ZeroDivisionError):
        async with session.stream_message() as msg:
            await msg.append("partial")
            1 / 0  # noqa: B018
    stored = message(rest, info["id"], msg.message_id)
    assert stored["status"] == "failed"
    assert stored["content"] == "partial"
    assert "ZeroDivisionError" in (stored["reason"] or "")
    await session.close()


async def test_progress_and_handover_request(agent: BatonClient, rest: BatonREST, eventually):
    info = await agent.create_session(title="progress")
    session = await agent.connect(info["id"])
    await session.progress("tool_call", {"name": "search", "args": {"q": "x"}})
    assert session.status == "active"
    await session.request_handover(reason="needs a refund", summary="customer wants money back")
    await eventually(lambda: session.status == "awaiting_human")
    history = list(rest.iter_history(info["id"]))
    (tool,) = [e for e in history if e["type"] == "progress.tool_call"]
    assert tool["data"]["name"] == "search"
    (handover,) = [e for e in history if e["type"] == "handover.requested"]
    assert handover["data"] == {"reason": "needs a refund", "summary": "customer wants money back"}
    assert rest.get_session(info["id"])["status"] == "awaiting_human"
    await session.close()


async def user_session(baton_server, agent: BatonClient, session_id: str, client_id: str):
    token = await agent.mint_token(session_id, client_id, kind="user", name=client_id)
    user = BatonClient(baton_server.url, token["token"])
    return user, await user.connect(session_id)


@pytest.mark.parametrize("targeted", [True, False])
async def test_user_cancel_stops_the_stream(
    baton_server, agent: BatonClient, rest: BatonREST, targeted: bool
):
    """A user's `signal.cancel` (naming the message, or naming none) ends it `cancelled`."""
    info = await agent.create_session(title="cancel")
    session = await agent.connect(info["id"])
    user_client, user = await user_session(baton_server, agent, info["id"], "user-1")
    produced = 0
    signals = []

    async def watch_signals() -> None:
        async for signal in session.signals():
            signals.append(signal)

    watching = asyncio.create_task(watch_signals())

    async def cancel_when_streaming() -> None:
        async for event in user.events(types=["message.append"]):
            data = {"reason": "stop please"}
            if targeted:
                data["message_id"] = event["message_id"]
            await user.publish("signal.cancel", data)
            return

    cancelling = asyncio.create_task(cancel_when_streaming())
    async with session.stream_message() as msg:
        for i in range(2000):  # would take ~20 s: the cancel must cut it short
            await msg.append(f"w{i} ")
            produced += 1
            await asyncio.sleep(0.01)
    await cancelling
    assert msg.cancelled
    assert msg.cancel_reason == "stop please"
    assert msg.status == "cancelled"
    assert produced < 2000
    with pytest.raises(MessageCancelled):
        await msg.append("late")

    stored = message(rest, info["id"], msg.message_id)
    assert stored["status"] == "cancelled"
    assert "w0 " in stored["content"]
    assert stored["content"] == msg.content  # what was produced before the cancel, once
    assert signals and signals[0]["type"] == "signal.cancel"
    assert signals[0]["author"]["kind"] == "user"

    watching.cancel()
    await user.close()
    await user_client.aclose()
    await session.close()


async def test_cancel_of_another_message_is_ignored(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="cancel-other")
    session = await agent.connect(info["id"])
    async with session.stream_message() as msg:
        await msg.append("keep ")
        await session.publish("signal.cancel", {"message_id": "msg_someone_else"})
        await msg.append("going")
    assert not msg.cancelled
    assert message(rest, info["id"], msg.message_id)["content"] == "keep going"
    await session.close()


async def test_burst_larger_than_one_event_is_split(agent: BatonClient, rest: BatonREST):
    """100k characters buffered in one window still fit the per-event size limit."""
    info = await agent.create_session(title="burst")
    session = await agent.connect(info["id"])
    text = "".join(f"{i:05d}\n" for i in range(100_000 // 6))
    async with session.stream_message(window=0.05) as msg:
        for start in range(0, len(text), 1000):
            await msg.append(text[start : start + 1000])
    assert msg.appends_published > 1
    stored = message(rest, info["id"], msg.message_id)
    assert stored["content"] == text
    assert stored["status"] == "complete"
    await session.close()


async def test_untargeted_cancel_from_before_the_message_is_ignored(
    agent: BatonClient, rest: BatonREST
):
    """A cancel naming no message stops what is streaming, not a message started after it."""
    info = await agent.create_session(title="cancel-before")
    session = await agent.connect(info["id"])
    await session.publish("signal.cancel", {"reason": "old"})
    async with session.stream_message() as msg:
        await msg.append("fresh")
    assert not msg.cancelled
    assert message(rest, info["id"], msg.message_id)["status"] == "complete"
    await session.close()


async def test_cancelling_the_agent_task_closes_the_message(agent: BatonClient, rest: BatonREST):
    """Tearing down the agent's task must not leave a message `streaming` forever."""
    info = await agent.create_session(title="task-cancel")
    session = await agent.connect(info["id"])
    started = asyncio.Event()
    holder: dict[str, str] = {}

    async def generate() -> None:
        async with session.stream_message() as msg:
            holder["id"] = msg.message_id
            await msg.append("thinking")
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(generate())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = message(rest, info["id"], holder["id"])
    assert stored["status"] == "cancelled"
    assert stored["reason"] == "agent task cancelled"
    assert stored["content"] == "thinking"
    await session.close()
