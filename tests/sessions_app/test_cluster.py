"""Worker liveness with two real worker processes sharing one database (and Redis when set).

A worker killed with SIGKILL leaves its connections open in the database; the survivor reaps
them within 15 s as `presence.leave` reason `timeout`. A connection whose transport is lost
leaves at once with reason `lost`, from its own (living) worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings

from tests.conftest import ROOT, free_port, server_env

PRESENCE_BOUND_SECONDS = 15.0
# Production liveness settings (not the fast test defaults): the 15 s bound must hold for them.
PRODUCTION_LIVENESS = {"BATON_HEARTBEAT_SECONDS": "3", "BATON_WORKER_TIMEOUT_SECONDS": "10"}


async def new_session(base_url: str, key: str) -> tuple[str, str]:
    """A session and a user token (with presence) for an observer."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        session_id = (await http.post("/api/v1/sessions", json={"title": "cluster"})).json()["id"]
        token = (
            await http.post(
                f"/api/v1/sessions/{session_id}/tokens",
                json={"client_id": "observer", "kind": "user"},
            )
        ).json()["token"]
    return session_id, token


async def presence_event(
    ws: Any, event_type: str, client_id: str, timeout: float
) -> dict[str, Any]:
    """The next `event_type` presence event about `client_id` on this socket."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {event_type} for {client_id} within {timeout} s"
        frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        if frame["op"] != "events":
            continue
        for event in frame["events"]:
            if event["type"] == event_type and event["data"]["client_id"] == client_id:
                return event


async def presence_ids(base_url: str, key: str, session_id: str) -> set[str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        members = (await http.get(f"/api/v1/sessions/{session_id}/presence")).json()["members"]
    return {m["client_id"] for m in members}


async def test_a_killed_workers_presence_is_reaped_by_the_survivor(make_cluster, agent_key):
    doomed, survivor = make_cluster(2, **PRODUCTION_LIVENESS)
    session_id, token = await new_session(survivor.base_url, agent_key)
    observer_url = f"{survivor.ws_url}/ws/sessions/{session_id}/?token={token}&after=0"
    agent_url = f"{doomed.ws_url}/ws/sessions/{session_id}/?token={agent_key}&client_id=bot"
    async with (
        websockets.connect(observer_url) as observer,
        websockets.connect(f"{agent_url}&after=0") as agent,
    ):
        assert json.loads(await agent.recv())["op"] in ("events", "attached")
        await presence_event(observer, "presence.enter", "bot", PRESENCE_BOUND_SECONDS)
        killed_at = time.monotonic()
        doomed.stop(kill=True)  # SIGKILL: no disconnect handler runs
        leave = await presence_event(observer, "presence.leave", "bot", PRESENCE_BOUND_SECONDS + 5)
        elapsed = time.monotonic() - killed_at
    assert leave["data"]["reason"] == "timeout"
    assert elapsed <= PRESENCE_BOUND_SECONDS, f"reaped after {elapsed:.1f} s"
    assert "bot" not in await presence_ids(survivor.base_url, agent_key, session_id)


async def test_a_lost_transport_leaves_at_once_with_reason_lost(make_cluster, agent_key):
    agents_worker, observers_worker = make_cluster(2, **PRODUCTION_LIVENESS)
    session_id, token = await new_session(observers_worker.base_url, agent_key)
    observer_url = f"{observers_worker.ws_url}/ws/sessions/{session_id}/?token={token}&after=0"
    agent_url = (
        f"{agents_worker.ws_url}/ws/sessions/{session_id}/?token={agent_key}&client_id=bot&after=0"
    )
    async with websockets.connect(observer_url) as observer:
        agent = await websockets.connect(agent_url)
        assert json.loads(await agent.recv())["op"] in ("events", "attached")
        await presence_event(observer, "presence.enter", "bot", PRESENCE_BOUND_SECONDS)
        agent.transport.abort()  # no close frame: the server sees 1006
        leave = await presence_event(observer, "presence.leave", "bot", PRESENCE_BOUND_SECONDS)
    assert leave["data"]["reason"] == "lost"
    # The agent's worker is alive: this leave is its own, not the reaper's.
    assert agents_worker.process is not None and agents_worker.process.poll() is None
    assert "bot" not in await presence_ids(agents_worker.base_url, agent_key, session_id)


def contiguous_free_ports(n: int) -> int:
    """A first port such that it and the next n-1 are free right now."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no contiguous free ports")


def wait_for_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.2)


@pytest.mark.timeout(120)
def test_run_cluster_supervises_its_workers(transactional_db, tmp_path):
    first = contiguous_free_ports(2)
    args = ["--workers", "2", "--port", str(first), "--no-migrate"]
    if not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL):
        args.append("--allow-embedded")
    log_path = tmp_path / "cluster.log"
    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "manage.py", "run_cluster", *args],
            cwd=ROOT,
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for port in (first, first + 1):
            wait_for_http(f"http://127.0.0.1:{port}/api/schema/")
        pids = re.findall(rf":{first} started \(pid (\d+)\)", log_path.read_text())
        os.kill(int(pids[0]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(re.findall(rf":{first} started", log_path.read_text())) < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        wait_for_http(f"http://127.0.0.1:{first}/api/schema/")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
    assert "Baton cluster stopped" in log_path.read_text()
    for port in (first, first + 1):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/schema/", timeout=1)


@pytest.mark.skipif(
    not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL),
    reason="handing publishes over needs several workers on a shared layer (Postgres + Redis)",
)
@pytest.mark.timeout(120)
async def test_publishes_handed_to_a_stalled_committer_are_stored_once_in_order(
    make_cluster, agent_key, live_server_proc
):
    """One worker hands its publishes to the elected committing worker; while that one is
    stopped (SIGSTOP) they are committed by their own worker after the hand-over timeout, and
    when it resumes and commits them too, nothing is stored twice and the order holds."""
    from sessions_app.models import Event, Worker
    from sessions_app.selectors import get_committing_worker

    live_server_proc.stop()  # older than the cluster, it would be the committing worker
    workers = make_cluster(2, BATON_FORWARD_TIMEOUT_SECONDS="1")
    pids = {worker.process.pid: worker for worker in workers if worker.process is not None}
    session_id, token = await new_session(workers[0].base_url, agent_key)

    @database_sync_to_async
    def elected_pid() -> int | None:
        elected = get_committing_worker()
        listed = Worker.objects.exclude(channel="").filter(pid__in=pids).count()
        return elected.pid if elected is not None and listed == 2 else None

    @database_sync_to_async
    def stored() -> list[int]:
        steps = Event.objects.filter(session_id=session_id, type="progress.step").order_by("seq")
        return list(steps.values_list("data__i", flat=True))

    acks: list[int] = []
    seen: list[int] = []
    observer_path = f"/ws/sessions/{session_id}/?token={token}&after=0"
    async with (  # an observer on each worker starts its hub (and heartbeat)
        websockets.connect(f"{workers[0].ws_url}{observer_path}") as first_observer,
        websockets.connect(f"{workers[1].ws_url}{observer_path}") as second_observer,
    ):
        deadline = time.monotonic() + 15
        while (pid := await elected_pid()) not in pids:
            assert time.monotonic() < deadline, "no committing worker was elected"
            await asyncio.sleep(0.2)
        committer = pids[pid]
        follower, observer = (
            (workers[1], second_observer)
            if committer is workers[0]
            else (workers[0], first_observer)
        )
        assert committer.process is not None
        await asyncio.sleep(1.5)  # one more heartbeat: the follower has read who commits
        agent_url = f"{follower.ws_url}/ws/sessions/{session_id}/?token={agent_key}&client_id=bot"
        async with websockets.connect(agent_url) as agent:

            async def publish(first: int, count: int) -> float:
                started = time.monotonic()
                for i in range(first, first + count):
                    event = {"type": "progress.step", "data": {"i": i}}
                    await agent.send(json.dumps({"op": "publish", "ref": f"r{i}", "event": event}))
                while len(acks) < first + count:
                    frame = json.loads(await asyncio.wait_for(agent.recv(), 15))
                    if frame["op"] == "ack":
                        assert frame["ref"] == f"r{len(acks)}", frame
                        acks.append(frame["seq"])
                    else:
                        assert frame["op"] != "error", frame
                return time.monotonic() - started

            assert await publish(0, 10) < 1  # the committer answers
            committer.process.send_signal(signal.SIGSTOP)
            try:
                # Handed over, unanswered, reclaimed after the 1 s timeout, committed here.
                assert await publish(10, 10) >= 1
            finally:
                committer.process.send_signal(signal.SIGCONT)
            assert await publish(20, 10) < 1  # committed here while the committer is avoided
        while len(seen) < 30:
            frame = json.loads(await asyncio.wait_for(observer.recv(), 15))
            if frame["op"] == "events":
                seen += [e["data"]["i"] for e in frame["events"] if e["type"] == "progress.step"]
    assert acks == sorted(acks) and len(set(acks)) == 30
    assert seen == list(range(30))
    await asyncio.sleep(1.5)  # the resumed committer has worked through what it was handed
    assert await stored() == list(range(30))
