"""End to end against a real server process: the delivery guarantee under drops and resumes.

5 subscribers attach with real `websockets` clients; an agent publishes 2,000 events over REST
and over a WebSocket at the same time; subscribers drop at random points (clean closes and
transport aborts) and resume with `after`. Every subscriber must end with each visible seq
exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import httpx
import pytest
import websockets
from channels.db import database_sync_to_async

from sessions_app.models import Event

SUBSCRIBERS = 5
REST_EVENTS = 1000
WS_EVENTS = 1000


class ResumingSubscriber:
    """Keeps its own position; reconnects with `after` after every drop."""

    def __init__(self, ws_url: str, session_id: str, token: str, rng: random.Random) -> None:
        self.url = f"{ws_url}/ws/sessions/{session_id}/?token={token}"
        self.rng = rng
        self.seqs: list[int] = []
        self.duplicates = 0
        self.out_of_order = 0
        self.drops = {"clean": 0, "abort": 0}
        self.stop = asyncio.Event()
        self.target: int | None = None
        self.caught_up = asyncio.Event()

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def take(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            seq = event["seq"]
            if seq <= self.last:
                if seq in self.seqs:
                    self.duplicates += 1
                else:
                    self.out_of_order += 1
                continue
            self.seqs.append(seq)
        if self.target is not None and self.last >= self.target:
            self.caught_up.set()

    async def run(self) -> None:
        while not self.stop.is_set():
            async with websockets.connect(f"{self.url}&after={self.last}") as ws:
                budget = self.rng.randint(4, 30)  # frames before the next drop
                while True:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        if self.stop.is_set():
                            return
                        continue
                    frame = json.loads(raw)
                    if frame["op"] == "events":
                        self.take(frame["events"])
                        budget -= 1
                    if budget <= 0 and not self.stop.is_set():
                        break
                if self.rng.random() < 0.5:
                    self.drops["clean"] += 1
                    await ws.close()
                else:
                    self.drops["abort"] += 1
                    ws.transport.abort()
            await asyncio.sleep(self.rng.uniform(0, 0.05))

    def wait_for(self, seq: int) -> asyncio.Event:
        self.target = seq
        if self.last >= seq:
            self.caught_up.set()
        return self.caught_up


async def publish_over_rest(
    base_url: str, key: str, session_id: str, total: int, rng: random.Random
) -> None:
    headers = {"Authorization": f"Bearer {key}", "X-Baton-Client-Id": "agent-rest"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        sent = 0
        while sent < total:
            n = min(rng.randint(1, 20), total - sent)
            message_id = f"rest-{sent}"
            events: list[dict[str, Any]] = [
                {"type": "message.create", "message_id": message_id, "data": {"role": "assistant"}}
            ]
            events += [
                {"type": "message.append", "message_id": message_id, "data": {"delta": f"t{i} "}}
                for i in range(max(0, n - 2))
            ]
            if n >= 2:
                events.append({"type": "message.complete", "message_id": message_id, "data": {}})
            events = events[:n]
            response = await http.post(
                f"/api/v1/sessions/{session_id}/events",
                json={"events": events},
                headers={"Idempotency-Key": f"rest-{sent}"},
            )
            assert response.status_code == 201, response.text
            sent += n


async def publish_over_ws(ws_url: str, key: str, session_id: str, total: int) -> None:
    url = f"{ws_url}/ws/sessions/{session_id}/?token={key}&client_id=agent-ws"
    async with websockets.connect(url) as ws:
        for i in range(total):
            ref = f"w{i}"
            event = {"type": "progress.step", "data": {"i": i}, "client_ref": ref}
            await ws.send(json.dumps({"op": "publish", "ref": ref, "event": event}))
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("ref") == ref:
                    assert frame["op"] == "ack", frame
                    break


@pytest.mark.timeout(240)
async def test_every_subscriber_gets_every_visible_event_once_in_order(server, agent_key):
    seed = int(os.environ.get("BATON_E2E_SEED", random.randrange(1 << 30)))
    print(f"e2e seed: {seed} (replay with BATON_E2E_SEED={seed})")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {agent_key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
        session_id = (await http.post("/api/v1/sessions", json={"title": "e2e"})).json()["id"]
        tokens = []
        for i in range(SUBSCRIBERS):
            response = await http.post(
                f"/api/v1/sessions/{session_id}/tokens",
                json={"client_id": f"viewer-{i}", "kind": "user"},
            )
            tokens.append(response.json()["token"])

    subscribers = [
        ResumingSubscriber(server.ws_url, session_id, token, random.Random(rng.random()))
        for token in tokens
    ]
    runners = [asyncio.create_task(s.run()) for s in subscribers]
    await asyncio.gather(
        publish_over_rest(server.base_url, agent_key, session_id, REST_EVENTS, rng),
        publish_over_ws(server.ws_url, agent_key, session_id, WS_EVENTS),
    )

    def visible_seqs() -> list[int]:
        return list(
            Event.objects.filter(session_id=session_id, visibility="all")
            .order_by("seq")
            .values_list("seq", flat=True)
        )

    expected = await database_sync_to_async(visible_seqs)()
    await asyncio.wait_for(
        asyncio.gather(*(s.wait_for(expected[-1]).wait() for s in subscribers)), 60
    )
    for s in subscribers:
        s.stop.set()
    await asyncio.gather(*runners)

    published = await database_sync_to_async(
        lambda: Event.objects.filter(session_id=session_id, author_id__startswith="agent-").count()
    )()
    assert published == REST_EVENTS + WS_EVENTS
    for s in subscribers:
        assert s.duplicates == 0
        assert s.out_of_order == 0
        assert s.seqs[: len(expected)] == expected
        assert s.seqs == sorted(set(s.seqs))
    total_drops = sum(sum(s.drops.values()) for s in subscribers)
    assert total_drops >= SUBSCRIBERS  # the test really dropped and resumed
    assert all(s.drops["abort"] + s.drops["clean"] > 0 for s in subscribers)
    print("drops:", [s.drops for s in subscribers])


def test_a_stalled_reader_is_closed_with_4408_and_memory_stays_bounded(
    transactional_db, agent_key, tmp_path
):
    """A client that stops reading fills the socket; the server stops buffering past its limit
    and, once the client reads again, says `too_slow` and closes with 4408."""
    import base64
    import socket
    import struct

    from tests.conftest import ServerProcess, free_port, server_env

    server = ServerProcess(
        port=free_port(),
        env=server_env(BATON_MAX_BUFFERED_EVENTS="300"),
        extra_args=("--ws-ping-interval", "600"),  # a ping timeout would close it first
    )
    server.log_path = tmp_path / "server.log"
    server.start()
    try:
        http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {agent_key}"}
        )
        session_id = http.post("/api/v1/sessions").json()["id"]
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws/sessions/{session_id}/?token={agent_key}&after=0 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        blob = {"type": "progress.blob", "data": {"x": "y" * 2000}}
        for _ in range(30):  # 3,000 events, ~6 MB, while the client reads nothing
            response = http.post(
                f"/api/v1/sessions/{session_id}/events", json={"events": [blob] * 100}
            )
            assert response.status_code == 201
        sock.settimeout(3)
        received = b""
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        assert len(received) < 5_000_000  # less than was published: it was cut off
        assert b'"too_slow"' in received
        assert struct.pack("!H", 4408) in received  # the close frame's code
    finally:
        server.stop()
