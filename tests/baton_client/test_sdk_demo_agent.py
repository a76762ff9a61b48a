"""The demo agent (`python -m baton_client.demo_agent`) as a user of the demo chat sees it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from baton_client import BatonClient

from .conftest import REPO, LiveServer


@contextlib.contextmanager
def running_demo_agent(server: LiveServer, token_delay: float) -> Iterator[subprocess.Popen[bytes]]:
    """On a server of its own: the demo agent joins every session it can list."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baton_client.demo_agent",
            *("--url", server.url, "--key", server.agent_key),
            *("--token-delay", str(token_delay), "--poll", "0.2"),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def demo_agent(own_server: LiveServer) -> Iterator[subprocess.Popen[bytes]]:
    with running_demo_agent(own_server, token_delay=0.01) as proc:
        yield proc


async def test_demo_agent_answers_cancels_and_hands_over(
    own_server: LiveServer, demo_agent, eventually
):
    async with BatonClient(own_server.url, own_server.agent_key) as admin:
        info = await admin.create_session(title="demo")
        token = await admin.mint_token(info["id"], "visitor", kind="user", name="Visitor")
    async with BatonClient(own_server.url, token["token"]) as user_client:
        user = await user_client.connect(info["id"])
        await user.wait_for(lambda s: "demo-agent" in s.members, timeout=20)
        seen: list[dict] = []

        async def read() -> None:
            async for event in user.events():
                seen.append(event)

        reading = asyncio.create_task(read())

        def completed() -> list[dict]:
            return [e for e in seen if e["type"] == "message.complete"]

        await user.send_message("hello there", role="user")
        await eventually(lambda: len(completed()) == 1, 30)
        assert completed()[0]["data"]["status"] == "complete"
        assert any(e["type"] == "progress.tool_call" for e in seen)

        # "stop": cancel the next answer as soon as it starts streaming.
        await user.send_message("tell me more", role="user")
        await eventually(
            lambda: any(
                e["type"] == "message.append" and e["seq"] > completed()[0]["seq"] for e in seen
            ),
            30,
        )
        await user.publish("signal.cancel", {"reason": "stop"})
        await eventually(lambda: len(completed()) == 2, 30)
        assert completed()[1]["data"]["status"] == "cancelled"

        await user.send_message("I want a human", role="user")
        await user.wait_for(lambda s: s.status == "awaiting_human", timeout=30)
        reading.cancel()
        await user.close()


@pytest.fixture
def slow_demo_agent(own_server: LiveServer) -> Iterator[subprocess.Popen[bytes]]:
    """The demo agent at a pace slow enough to leave in the middle of a reply."""
    with running_demo_agent(own_server, token_delay=0.25) as proc:
        yield proc


async def test_demo_agent_pauses_while_no_user_is_present(
    own_server: LiveServer, slow_demo_agent, eventually
):
    async with BatonClient(own_server.url, own_server.agent_key) as admin:
        info = await admin.create_session(title="pause")
        token = await admin.mint_token(info["id"], "visitor", kind="user", name="Visitor")
        watcher = await admin.connect(info["id"], client_id="watcher")
        seen: list[dict] = []

        async def read() -> None:
            async for event in watcher.events():
                seen.append(event)

        reading = asyncio.create_task(read())
        async with BatonClient(own_server.url, token["token"]) as user_client:
            user = await user_client.connect(info["id"])
            await user.wait_for(lambda s: "demo-agent" in s.members, timeout=20)
            await user.send_message("hello", role="user")
            await eventually(lambda: any(e["type"] == "message.append" for e in seen), 30)
            await user.close()  # the user leaves mid-reply
        await eventually(lambda: any(e["type"] == "progress.paused" for e in seen), 30)
        paused_at = next(e["seq"] for e in seen if e["type"] == "progress.paused")
        await asyncio.sleep(1.5)  # ~6 words' worth of time: nothing may be appended meanwhile
        assert not [e for e in seen if e["type"] == "message.append" and e["seq"] > paused_at]
        async with BatonClient(own_server.url, token["token"]) as user_client:
            user = await user_client.connect(info["id"])  # back: the reply goes on
            await eventually(lambda: any(e["type"] == "progress.resumed" for e in seen), 30)
            await eventually(lambda: any(e["type"] == "message.complete" for e in seen), 60)
            await user.close()
        reading.cancel()
        await watcher.close()


async def test_demo_agent_streams_from_an_openai_compatible_endpoint():
    import httpx

    from baton_client.demo_agent import OpenAICompatibleLLM

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["Authorization"] == "Bearer sk-test"
        body = "".join(
            f'data: {{"choices":[{{"delta":{{"content":"{t}"}}}}]}}\n\n' for t in ["Hel", "lo", "!"]
        )
        return httpx.Response(
            200, text=body + "data: [DONE]\n\n", headers={"Content-Type": "text/event-stream"}
        )

    llm = OpenAICompatibleLLM(
        "http://llm.local/v1", "sk-test", transport=httpx.MockTransport(handler)
    )
    assert [t async for t in llm.stream("hi")] == ["Hel", "lo", "!"]
