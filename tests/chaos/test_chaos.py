"""The chaos run: agents stream, subscribers hop and drop, a worker dies, Redis restarts.

3 agents each stream 3,000 events into their own session (REST batches and WebSocket publishes,
every event with a client_ref, retried on any failure — possibly on the other worker); 12
subscribers hop between the 2 workers, dropping at random (clean closes and transport aborts) and
resuming with `after`; one worker is killed with SIGKILL mid-run and restarted; Redis is
restarted once. Then: every subscriber's stream is exactly the session's visible seqs, in order,
without duplicates; every published event is stored exactly once; presence converges to nobody
within 15 s of the last client leaving.

Seeded: the seed is printed; `BATON_CHAOS_SEED=<seed>` replays the same choices (timing on a
shared machine still varies).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import websockets
from channels.db import database_sync_to_async

from sessions_app.models import Connection, Event
from tests.conftest import ServerProcess

AGENTS = 3
EVENTS_PER_AGENT = 3000
SUBSCRIBERS_PER_SESSION = 4
PRESENCE_BOUND_SECONDS = 15.0
NETWORK_ERRORS = (OSError, httpx.HTTPError, websockets.WebSocketException, TimeoutError)


def agent_events(agent: int, rng: random.Random) -> list[dict[str, Any]]:
    """3,000 events: streamed messages (create, appends, complete) with progress in between."""
    events: list[dict[str, Any]] = []
    m = 0
    while len(events) < EVENTS_PER_AGENT:
        remaining = EVENTS_PER_AGENT - len(events)
        if remaining < 3 or rng.random() < 0.15:
            events.append({"type": "progress.step", "data": {"n": len(events)}})
            continue
        m += 1
        message_id = f"a{agent}-m{m}"
        appends = min(rng.randint(1, 60), remaining - 2)
        events.append(
            {"type": "message.create", "message_id": message_id, "data": {"role": "assistant"}}
        )
        events += [
            {"type": "message.append", "message_id": message_id, "data": {"delta": f"t{i} "}}
            for i in range(appends)
        ]
        events.append({"type": "message.complete", "message_id": message_id, "data": {}})
    for j, event in enumerate(events):
        event["client_ref"] = f"a{agent}-{j}"
    return events


class Agent:
    """Publishes its events in chunks; a chunk is retried until acknowledged (same client_refs)."""

    def __init__(self, index: int, workers: list[ServerProcess], key: str, session_id: str, seed):
        self.index = index
        self.workers = workers
        self.key = key
        self.session_id = session_id
        self.rng = random.Random(seed)
        self.events = agent_events(index, self.rng)
        self.client_id = f"agent-{index}"
        self.sent = 0
        self.retries = 0
        self.ws: Any = None

    def worker(self) -> ServerProcess:
        return self.rng.choice(self.workers)

    async def publish_rest(self, chunk: list[dict[str, Any]]) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "X-Baton-Client-Id": self.client_id}
        async with httpx.AsyncClient(base_url=self.worker().base_url, timeout=15) as http:
            response = await http.post(
                f"/api/v1/sessions/{self.session_id}/events",
                json={"events": chunk},
                headers=headers,
            )
        assert response.status_code == 201, response.text

    async def publish_ws(self, chunk: list[dict[str, Any]], ref: str) -> None:
        if self.ws is None:
            url = (
                f"{self.worker().ws_url}/ws/sessions/{self.session_id}/"
                f"?token={self.key}&client_id={self.client_id}"
            )
            self.ws = await asyncio.wait_for(websockets.connect(url), 10)
        await self.ws.send(json.dumps({"op": "publish", "ref": ref, "events": chunk}))
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 15))
            if frame.get("ref") == ref:
                assert frame["op"] == "ack", frame
                return

    async def run(self) -> None:
        n = 0
        while self.sent < len(self.events):
            chunk = self.events[self.sent : self.sent + self.rng.randint(1, 20)]
            over_ws = self.rng.random() < 0.5
            while True:
                n += 1
                try:
                    if over_ws:
                        await self.publish_ws(chunk, f"r{n}")
                    else:
                        await self.publish_rest(chunk)
                    break
                except NETWORK_ERRORS:
                    self.retries += 1
                    if self.ws is not None:
                        self.ws.transport.abort()
                        self.ws = None
                    await asyncio.sleep(0.2)
            self.sent += len(chunk)
            await asyncio.sleep(self.rng.uniform(0.02, 0.08))
        if self.ws is not None:
            await self.ws.close()


class Subscriber:
    """Hops between workers, drops at random, resumes with `after`; records every seq."""

    def __init__(self, workers: list[ServerProcess], session_id: str, token: str, seed) -> None:
        self.workers = workers
        self.session_id = session_id
        self.token = token
        self.rng = random.Random(seed)
        self.seqs: list[int] = []
        self.duplicates = 0
        self.out_of_order = 0
        self.drops = Counter[str]()
        self.target: int | None = None

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def take(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["seq"] <= self.last:
                if event["seq"] in self.seqs:
                    self.duplicates += 1
                else:
                    self.out_of_order += 1
                continue
            self.seqs.append(event["seq"])

    def done(self) -> bool:
        return self.target is not None and self.last >= self.target

    async def run(self) -> None:
        while not self.done():
            worker = self.rng.choice(self.workers)
            url = (
                f"{worker.ws_url}/ws/sessions/{self.session_id}/"
                f"?token={self.token}&after={self.last}"
            )
            budget = self.rng.randint(5, 60)  # frames before the next drop
            try:
                async with websockets.connect(url, open_timeout=10) as ws:
                    while budget > 0 and not self.done():
                        try:
                            raw = await asyncio.wait_for(ws.recv(), 1)
                        except TimeoutError:
                            continue
                        frame = json.loads(raw)
                        if frame["op"] == "events":
                            self.take(frame["events"])
                            budget -= 1
                    if self.done() or self.rng.random() < 0.5:
                        self.drops["clean"] += 1
                        await ws.close()
                    else:
                        self.drops["abort"] += 1
                        ws.transport.abort()
            except NETWORK_ERRORS:
                self.drops["server"] += 1  # the worker died under us, or refused while down
            await asyncio.sleep(self.rng.uniform(0, 0.2))


def stored(session_id: str) -> tuple[list[int], Counter[str], int]:
    events = Event.objects.filter(session_id=session_id)
    visible = list(events.filter(visibility="all").order_by("seq").values_list("seq", flat=True))
    refs = Counter(
        events.filter(author_id__startswith="agent-", client_ref__isnull=False).values_list(
            "client_ref", flat=True
        )
    )
    published = (
        events.filter(author_id__startswith="agent-")
        .exclude(type__startswith="presence.")
        .exclude(type__startswith="connection.")
    )
    return visible, refs, published.count()


@pytest.mark.timeout(540)
async def test_chaos(redis_cluster, private_redis, agent_key):
    seed = int(os.environ.get("BATON_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed: {seed} (replay with BATON_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    started = time.monotonic()
    workers = redis_cluster(2)
    headers = {"Authorization": f"Bearer {agent_key}"}
    sessions: list[str] = []
    subscribers: list[Subscriber] = []
    async with httpx.AsyncClient(base_url=workers[0].base_url, headers=headers, timeout=30) as http:
        for a in range(AGENTS):
            session_id = (await http.post("/api/v1/sessions", json={"title": f"c{a}"})).json()["id"]
            sessions.append(session_id)
            for s in range(SUBSCRIBERS_PER_SESSION):
                token = (
                    await http.post(
                        f"/api/v1/sessions/{session_id}/tokens",
                        json={"client_id": f"viewer-{a}-{s}", "kind": "user"},
                    )
                ).json()["token"]
                subscribers.append(Subscriber(workers, session_id, token, rng.random()))
    agents = [Agent(a, workers, agent_key, sessions[a], rng.random()) for a in range(AGENTS)]
    sub_tasks = [asyncio.create_task(s.run()) for s in subscribers]
    agent_tasks = [asyncio.create_task(a.run()) for a in agents]
    total = AGENTS * EVENTS_PER_AGENT

    async def progress_reaches(fraction: float) -> None:
        while sum(a.sent for a in agents) < fraction * total:  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.1)

    # Faults, mid-run: a worker dies hard and comes back; later Redis restarts (empty).
    await progress_reaches(rng.uniform(0.15, 0.35))
    victim = rng.choice(workers)
    victim.stop(kill=True)
    print(f"killed worker :{victim.port} at {time.monotonic() - started:.1f} s")
    await asyncio.sleep(2)
    await asyncio.to_thread(victim.start)
    await progress_reaches(rng.uniform(0.5, 0.7))
    await asyncio.to_thread(private_redis.restart, 1.0)
    print(f"restarted redis at {time.monotonic() - started:.1f} s")

    await asyncio.gather(*agent_tasks)
    print(
        f"agents done at {time.monotonic() - started:.1f} s, retries {[a.retries for a in agents]}"
    )
    # Subscribers' own leaves add events: aim at the head as of now, then at the final head.
    for s in subscribers:
        visible, _, _ = await database_sync_to_async(stored)(s.session_id)
        s.target = visible[-1]
    await asyncio.wait_for(asyncio.gather(*sub_tasks), 180)
    closed_at = time.monotonic()

    # Presence converges to nobody: every subscriber and agent is gone.
    converged: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=workers[1].base_url, headers=headers, timeout=30) as http:
        while len(converged) < len(sessions):
            for session_id in sessions:
                if session_id in converged:
                    continue
                members = (await http.get(f"/api/v1/sessions/{session_id}/presence")).json()
                if not members["members"]:
                    converged[session_id] = time.monotonic() - closed_at
            assert time.monotonic() - closed_at <= PRESENCE_BOUND_SECONDS, (
                f"presence did not converge: {members}"
            )
            await asyncio.sleep(0.25)
    print(f"presence converged after {max(converged.values()):.1f} s")

    for agent in agents:
        _, refs, published = await database_sync_to_async(stored)(agent.session_id)
        assert published == EVENTS_PER_AGENT, "every published event stored exactly once"
        assert len(refs) == EVENTS_PER_AGENT and set(refs.values()) == {1}
    for s in subscribers:
        visible, _, _ = await database_sync_to_async(stored)(s.session_id)
        assert s.duplicates == 0 and s.out_of_order == 0
        assert s.seqs == [seq for seq in visible if seq <= s.last]
        assert s.last >= s.target
    # The killed worker's connections were reaped by the survivor (reason "timeout"; no leave
    # unless the member had no other connection by then — they usually reconnect first).
    reaped = await database_sync_to_async(
        lambda: Connection.objects.filter(session_id__in=sessions, close_reason="timeout").count()
    )()
    open_left = await database_sync_to_async(
        lambda: Connection.objects.filter(session_id__in=sessions, closed_at__isnull=True).count()
    )()
    print(f"connections reaped from the killed worker: {reaped}")
    assert reaped > 0 and open_left == 0
    drops = sum((s.drops for s in subscribers), Counter())
    print(f"drops: {dict(drops)}; chaos run took {time.monotonic() - started:.1f} s")
    assert drops["clean"] and drops["abort"] and drops["server"]
