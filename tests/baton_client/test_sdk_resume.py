"""Connection loss mid-stream: the message still completes intact, nothing is duplicated."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from baton_client import BatonClient, BatonREST

TOKENS = [f"t{i:03d} " for i in range(150)]
EXPECTED = "".join(TOKENS)


def rebuild(events: list[dict[str, Any]], message_id: str) -> str:
    """The text a reader reconstructs from the events of one message."""
    text = ""
    for event in events:
        if event.get("message_id") != message_id:
            continue
        if event["type"] == "message.create":
            text = event["data"].get("content") or ""
        elif event["type"] == "message.append":
            text += event["data"]["delta"]
        elif event["type"] == "message.update":
            text = event["data"]["content"]
    return text


async def collect(session, sink: list[dict[str, Any]]) -> None:
    async for event in session.events():
        sink.append(event)


def assert_strictly_increasing(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), f"duplicate or out-of-order seqs: {seqs}"


async def stream_tokens(session, on_token=None) -> str:
    async with session.stream_message(role="assistant") as msg:
        for index, token in enumerate(TOKENS):
            await msg.append(token)
            if on_token is not None:
                await on_token(index)
            await asyncio.sleep(0.004)
    assert msg.status == "complete"
    return msg.message_id


async def test_transport_drop_mid_stream(baton_server, proxy, rest: BatonREST, eventually):
    """Cut every TCP connection of the agent twice while it streams, and of a reader too."""
    async with BatonClient(proxy.url, baton_server.agent_key, client_id="agent") as agent:
        info = await agent.create_session(title="drop")
        session = await agent.connect(info["id"], backoff_base=0.05, backoff_max=0.2)
        reader = await agent.connect(info["id"], client_id="reader", backoff_base=0.05)
        seen: list[dict[str, Any]] = []
        reading = asyncio.create_task(collect(reader, seen))

        async def cut(index: int) -> None:
            if index in (40, 90):
                proxy.drop()

        message_id = await stream_tokens(session, cut)
        assert session.reconnects >= 2
        assert reader.reconnects >= 2

        snapshot = rest.messages(info["id"])
        (message,) = [m for m in snapshot["messages"] if m["message_id"] == message_id]
        assert message["status"] == "complete"
        assert message["content"] == EXPECTED

        await eventually(lambda: any(e["type"] == "message.complete" for e in seen))
        assert_strictly_increasing(seen)
        assert rebuild(seen, message_id) == EXPECTED
        stored = list(rest.iter_history(info["id"], types=["message.*"]))
        assert rebuild(stored, message_id) == EXPECTED
        assert [e["type"] for e in stored].count("message.create") == 1
        assert [e["type"] for e in stored].count("message.complete") == 1

        reading.cancel()
        await reader.close()
        await session.close()


async def test_server_restart_mid_stream(own_server, eventually):
    """SIGKILL the server process mid-stream and start it again on the same port."""
    async with BatonClient(own_server.url, own_server.agent_key, client_id="agent") as agent:
        info = await agent.create_session(title="restart")
        session = await agent.connect(info["id"], backoff_base=0.05, backoff_max=0.3)
        seen: list[dict[str, Any]] = []
        reading = asyncio.create_task(collect(session, seen))

        async def crash(index: int) -> None:
            if index == 60:
                await asyncio.to_thread(own_server.kill)
                await asyncio.sleep(0.3)  # keep producing tokens while the server is gone
                await asyncio.to_thread(own_server.start)

        message_id = await stream_tokens(session, crash)
        assert session.reconnects >= 1

        with BatonREST(own_server.url, own_server.agent_key) as rest:
            snapshot = rest.messages(info["id"])
            (message,) = [m for m in snapshot["messages"] if m["message_id"] == message_id]
            assert message["status"] == "complete"
            assert message["content"] == EXPECTED
            stored = list(rest.iter_history(info["id"], types=["message.*"]))
            assert rebuild(stored, message_id) == EXPECTED

        await eventually(lambda: any(e["type"] == "message.complete" for e in seen))
        assert_strictly_increasing(seen)
        assert rebuild(seen, message_id) == EXPECTED
        reading.cancel()
        await session.close()


async def test_resume_from_position_after_reconnect(
    baton_server, proxy, rest: BatonREST, eventually
):
    """Events published while the reader is cut off arrive once, in order, after it resumes."""
    async with BatonClient(proxy.url, baton_server.agent_key, client_id="reader") as client:
        info = await client.create_session(title="resume")
        reader = await client.connect(info["id"], backoff_base=0.3, backoff_max=0.3)
        seen: list[dict[str, Any]] = []
        reading = asyncio.create_task(collect(reader, seen))
        for i in range(5):
            rest.publish(info["id"], {"type": "progress.step", "data": {"i": i}})
        proxy.drop()
        for i in range(5, 20):  # published while the reader is away
            rest.publish(info["id"], {"type": "progress.step", "data": {"i": i}})
        await eventually(lambda: len([e for e in seen if e["type"] == "progress.step"]) >= 20)
        steps = [e["data"]["i"] for e in seen if e["type"] == "progress.step"]
        assert steps == list(range(20))
        assert_strictly_increasing(seen)
        assert reader.reconnects >= 1
        reading.cancel()
        await reader.close()


async def test_concurrent_streams_under_repeated_drops(baton_server, proxy, rest, eventually):
    """Four interleaved streams and 50 progress publishes while every connection is cut every
    50 to 300 ms: every message is intact, every publish stored once, the reader sees no dup."""
    rng = random.Random(1234)
    async with BatonClient(proxy.url, baton_server.agent_key, client_id="agent") as agent:
        info = await agent.create_session(title="chaos")
        session = await agent.connect(info["id"], backoff_base=0.02, backoff_max=0.1)
        reader = await agent.connect(
            info["id"], client_id="reader", backoff_base=0.02, backoff_max=0.1
        )
        seen: list[dict[str, Any]] = []
        reading = asyncio.create_task(collect(reader, seen))

        async def chaos() -> None:
            while True:
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                proxy.drop()

        cutting = asyncio.create_task(chaos())

        async def one(n: int) -> tuple[str, str]:
            tokens = [f"{n}:{i} " for i in range(400)]
            async with session.stream_message(window=(0, 0.005, 0.025)[n % 3]) as msg:
                for token in tokens:
                    await msg.append(token)
                    if rng.random() < 0.3:
                        await asyncio.sleep(0.002)
            return msg.message_id, "".join(tokens)

        results = await asyncio.gather(*(one(n) for n in range(4)))
        await asyncio.gather(*(session.progress("p", {"i": i}) for i in range(50)))
        cutting.cancel()

        messages = {m["message_id"]: m for m in rest.messages(info["id"])["messages"]}
        for message_id, text in results:
            assert messages[message_id]["content"] == text
            assert messages[message_id]["status"] == "complete"
        stored = list(rest.iter_history(info["id"]))
        assert sorted(e["data"]["i"] for e in stored if e["type"] == "progress.p") == list(
            range(50)
        )
        await eventually(lambda: sum(e["type"] == "progress.p" for e in seen) == 50, 20)
        assert_strictly_increasing(seen)
        for message_id, text in results:
            assert rebuild(seen, message_id) == text
        reading.cancel()
        await reader.close()
        await session.close()
