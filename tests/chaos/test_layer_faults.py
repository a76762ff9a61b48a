"""Channel-layer faults against real workers and a private Redis.

With the periodic head check switched off, the only way events published on one worker reach a
subscriber on another is the channel layer (plus gap repair, which needs a later event to
arrive through it) — so these tests show that fan-out really comes back by itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import websockets
from channels.db import database_sync_to_async

from sessions_app.models import Event

NO_HEAD_CHECK = {"BATON_HEAD_CHECK_SECONDS": "3600"}


class Collector:
    """A subscriber that records every seq it is sent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seqs: list[int] = []
        self.closed_code: int | None = None
        self.attached = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with websockets.connect(self.url) as ws:
            try:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["op"] == "events":
                        self.seqs.extend(e["seq"] for e in frame["events"])
                    elif frame["op"] == "attached":
                        self.attached.set()
            except websockets.ConnectionClosed as closed:
                self.closed_code = closed.rcvd.code if closed.rcvd else None
            self.closed_code = self.closed_code or (ws.close_code if ws.close_code else None)

    async def start(self) -> Collector:
        self.task = asyncio.create_task(self.run())
        await asyncio.wait_for(self.attached.wait(), 30)
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def visible_seqs(session_id: str) -> list[int]:
    return list(
        Event.objects.filter(session_id=session_id, visibility="all")
        .order_by("seq")
        .values_list("seq", flat=True)
    )


async def wait_until(predicate: Any, timeout: float, tick: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        if tick is not None:
            await tick()
        await asyncio.sleep(0.3)


async def test_publishing_survives_a_redis_outage_and_fanout_comes_back(
    redis_cluster, private_redis, agent_key
):
    publisher, subscriber_worker = redis_cluster(2, **NO_HEAD_CHECK)
    headers = {"Authorization": f"Bearer {agent_key}"}
    async with httpx.AsyncClient(base_url=publisher.base_url, headers=headers, timeout=20) as http:
        sessions = [
            (await http.post("/api/v1/sessions", json={"title": f"s{i}"})).json()["id"]
            for i in range(2)
        ]
        n = 0

        async def publish(session_id: str) -> None:
            nonlocal n
            n += 1
            response = await http.post(
                f"/api/v1/sessions/{session_id}/events",
                json={"type": "progress.step", "data": {"n": n}, "client_ref": f"p{n}"},
            )
            assert response.status_code == 201, response.text

        ws_base = f"{subscriber_worker.ws_url}/ws/sessions"
        first = await Collector(f"{ws_base}/{sessions[0]}/?token={agent_key}&after=0").start()
        await publish(sessions[0])
        await wait_until(lambda: len(first.seqs) >= 1, 30)

        # Redis dies. Publishing keeps working (REST and WebSocket), attaching too.
        private_redis.stop()
        for _ in range(5):
            await publish(sessions[0])
        agent_ws = f"{publisher.ws_url}/ws/sessions/{sessions[0]}/?token={agent_key}"
        async with websockets.connect(agent_ws) as ws:
            event = {"type": "progress.step", "data": {}, "client_ref": "ws-during-outage"}
            await ws.send(json.dumps({"op": "publish", "ref": "a", "event": event}))
            ack = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert ack["op"] == "ack", ack
        second = await Collector(f"{ws_base}/{sessions[1]}/?token={agent_key}&after=0").start()

        # Redis is back (empty, as after a crash): fan-out must resume with no help from the
        # head check — including the group the second feed could not join during the outage.
        private_redis.start()
        expected_first = await database_sync_to_async(visible_seqs)(sessions[0])
        # Events published during the outage reach the subscriber once a later one comes
        # through the layer (gap repair); keep publishing until that happens.
        await wait_until(
            lambda: len(first.seqs) >= len(expected_first), 60, tick=lambda: publish(sessions[0])
        )
        await wait_until(lambda: len(second.seqs) > 0, 60, tick=lambda: publish(sessions[1]))

    for collector, session_id in ((first, sessions[0]), (second, sessions[1])):
        expected = await database_sync_to_async(visible_seqs)(session_id)
        await wait_until(lambda c=collector, e=expected: c.seqs[-1:] == e[-1:], 30)
        await collector.stop()
        assert collector.seqs == expected  # complete, in order, no duplicates
