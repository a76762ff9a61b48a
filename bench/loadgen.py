"""Open-loop WebSocket load generator, run as its own process so its CPU is not the server's.

``python -m bench.loadgen CONFIG.json`` prints one JSON object per line on stdout (results and
``sync`` points) and logs on stderr. Modes:

- ``fanout``: S sessions x K subscribers, one agent per session publishing ``message.append``
  tokens at a fixed rate. The publish schedule is a clock, never gated on acks, and every token
  carries its *intended* send time (µs since this process's epoch) in its delta, so a stalled
  server shows up as latency instead of as a politely slower generator. S is raised step by step
  and the run stops after the first step past the knee.
- ``resume``: a session with N stored events; time from TCP connect to the ``attached`` frame.
- ``idle``: open N attached sockets in stages and wait at each stage for the harness to read RSS.

The same frames drive Baton and the plain contenders; only session creation differs (Baton needs
a real session via REST, the others take any id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from bench.procstat import CpuWindow, find_pids

EPOCH = time.monotonic()
DELTA_RE = re.compile(r'"delta": ?"t([0-9a-f]+) ')
DELTA_BYTES_RE = re.compile(rb'"delta": ?"t([0-9a-f]+) ')
SEQ_RE = re.compile(r'"seq": ?\d')


def now_us() -> int:
    return int((time.monotonic() - EPOCH) * 1_000_000)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    sys.stderr.write(f"[loadgen {time.monotonic() - EPOCH:7.2f}s] {msg}\n")
    sys.stderr.flush()


async def wait_stdin() -> str:
    """Block until the harness writes a line: a sync point it uses to take its own readings."""
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def percentile(sorted_values: list[int] | array, q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


@dataclass
class Target:
    """How to reach one contender: its WebSocket/HTTP bases and whether it is Baton."""

    ws: list[str]
    http: list[str]
    baton: bool
    token: str | None = None

    def ws_url(self, session: str, slot: int, client_id: str) -> str:
        base = self.ws[slot % len(self.ws)]
        url = f"{base}/ws/sessions/{session}/"
        if self.token:
            url += f"?token={self.token}&client_id={client_id}"
        return url

    async def create_sessions(self, n: int, concurrency: int = 4) -> list[str]:
        """Baton sessions go through the public REST API; the others accept any id."""
        if not self.baton:
            run = uuid.uuid4().hex[:8]
            return [f"ses_{run}_{i}" for i in range(n)]
        sem = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(timeout=60, headers=headers) as http:

            async def one(i: int) -> str:
                async with sem:
                    base = self.http[i % len(self.http)]
                    resp = await http.post(f"{base}/api/v1/sessions", json={"title": f"bench {i}"})
                    if resp.status_code >= 300:
                        raise RuntimeError(f"create session: {resp.status_code} {resp.text[:200]}")
                    body = resp.json()
                    return str(body.get("id") or body.get("session_id"))

            return list(await asyncio.gather(*(one(i) for i in range(n))))


@dataclass
class Stats:
    """Counters of the current measurement window; recv loops add to them only while open."""

    window: bool = False
    delivered: int = 0
    published: int = 0
    acks: int = 0
    frames: int = 0
    lat: array = field(default_factory=lambda: array("q"))
    errors: Counter = field(default_factory=Counter)
    closes: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.delivered = self.published = self.acks = self.frames = 0
        self.lat = array("q")


async def open_ws(url: str) -> ClientConnection:
    # No permessage-deflate: it would dominate both sides' CPU and not every server offers it.
    return await connect(
        url,
        compression=None,
        max_size=None,
        max_queue=1024,
        ping_interval=None,
        open_timeout=60,
        close_timeout=2,
    )


async def attach(ws: ClientConnection, after: int | None = None) -> tuple[dict[str, Any], int]:
    """Send ``attach`` and read until ``attached``; returns that frame and events replayed."""
    frame: dict[str, Any] = {"op": "attach"}
    if after is not None:
        frame["after"] = after
    await ws.send(json.dumps(frame))
    events = 0
    while True:
        msg = await ws.recv()
        if isinstance(msg, bytes):
            msg = msg.decode()
        attached = attach_reply(msg)
        if attached is not None:
            return attached, events
        events += len(SEQ_RE.findall(msg))


def attach_reply(msg: str | bytes) -> dict[str, Any] | None:
    """The `attached` frame if `msg` is it, None for any other frame; raises if the attach
    was refused."""
    text = msg.decode() if isinstance(msg, bytes) else msg
    if '"attached"' in text[:40]:
        return dict(json.loads(text))
    if text.startswith(('{"op": "error"', '{"op":"error"')):
        raise RuntimeError(f"attach refused: {text[:200]}")
    return None


class Subscriber(asyncio.Protocol):
    """A fan-out subscriber socket, read inside `data_received`: websockets' sans-I/O protocol
    parses the frames and each token's latency is counted right there, with no queue, task or
    wake-up per frame between the socket and the count. The asyncio client spent most of the
    generator's CPU in those layers (0.80-0.86 core at 48k deliveries/s), and a generator that
    nearly fills a core adds its own lag to every latency it measures.

    `connect` (handshake), `attach` (until `attached`), then `start(stats)`; `close`.
    """

    def __init__(self, url: str) -> None:
        self.ws = ClientProtocol(parse_uri(url), max_size=None)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.attached: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.stats: Stats | None = None
        self.closing = False
        self.partial: list[bytes] = []  # a fragmented message's frames so far

    @classmethod
    async def connect(cls, url: str) -> Subscriber:
        uri = parse_uri(url)
        _, sub = await asyncio.get_running_loop().create_connection(
            lambda: cls(url), uri.host, uri.port
        )
        await asyncio.wait_for(asyncio.shield(sub.opened), 60)
        return sub

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not `asyncio.Transport` subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.ws.send_request(self.ws.connect())
        self.flush()

    def flush(self) -> None:
        assert self.transport is not None
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    self.opened.set_exception(self.ws.handshake_exc)
                else:
                    self.opened.set_result(None)
            elif event.opcode in (Opcode.TEXT, Opcode.CONT):
                self.partial.append(event.data)
                if event.fin:
                    message = b"".join(self.partial)
                    self.partial = []
                    self.on_message(message)
        self.flush()

    def on_message(self, msg: bytes) -> None:
        stats = self.stats
        if stats is not None:
            if not stats.window:
                return
            now = now_us()
            hits = DELTA_BYTES_RE.findall(msg)
            stats.frames += 1
            if hits:
                stats.delivered += len(hits)
                lat = stats.lat
                for h in hits:
                    lat.append(now - int(h, 16))
        elif not self.attached.done():
            try:
                attached = attach_reply(msg)
            except RuntimeError as exc:
                self.attached.set_exception(exc)
            else:
                if attached is not None:
                    self.attached.set_result(attached)

    async def attach(self) -> dict[str, Any]:
        self.ws.send_text(json.dumps({"op": "attach"}).encode())
        self.flush()
        return await asyncio.wait_for(asyncio.shield(self.attached), 60)

    def start(self, stats: Stats) -> None:
        """Count deliveries from now on (frames before the window are read and dropped)."""
        self.stats = stats

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.stats is not None:
            rcvd = self.ws.close_rcvd
            self.stats.closes[str(rcvd.code if rcvd else "abnormal")] += 1
        for future in (self.opened, self.attached):
            if not future.done():
                future.set_exception(ConnectionError("the server closed the connection"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def close(self) -> None:
        self.closing = True
        if self.transport is None or self.lost.done():
            return
        with contextlib.suppress(Exception):
            self.ws.send_close()
            self.flush()
            await asyncio.wait_for(asyncio.shield(self.lost), 3)
        self.transport.abort()


async def ack_loop(ws: ClientConnection, stats: Stats) -> None:
    """Drain the agent's acks (so the server never blocks on us) and count errors by code."""
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                msg = msg.decode()
            if '"error"' in msg:
                try:
                    code = json.loads(msg).get("code", "?")
                except ValueError:
                    code = "?"
                if not stats.errors:
                    log(f"first publish error: {msg[:300]}")
                stats.errors[code] += 1
            elif stats.window:
                stats.acks += 1
    except websockets.ConnectionClosed as exc:
        stats.closes[str(exc.rcvd.code if exc.rcvd else "abnormal")] += 1


def create_frame(message_id: str) -> str:
    return json.dumps(
        {
            "op": "publish",
            "ref": "c",
            "event": {
                "type": "message.create",
                "message_id": message_id,
                "data": {"role": "assistant", "status": "streaming"},
            },
        }
    )


def complete_frame(message_id: str) -> str:
    return json.dumps(
        {
            "op": "publish",
            "ref": "d",
            "event": {
                "type": "message.complete",
                "message_id": message_id,
                "data": {"status": "complete"},
            },
        }
    )


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


@dataclass
class SessionLoad:
    """One session under load: its agent connection, subscribers and tasks."""

    session: str
    agent: ClientConnection
    subs: list[Subscriber]
    tasks: list[asyncio.Task] = field(default_factory=list)


async def publisher(
    s: SessionLoad, message_id: str, rate: float, rotate: int, stats: Stats
) -> None:
    """Publish tokens on a fixed clock; late ticks are sent at once with their intended time."""
    period = 1.0 / rate
    next_t = time.monotonic() + random.random() * period
    sent_in_message = 0
    ws = s.agent
    try:
        while True:
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            while next_t <= now:
                intended = int((next_t - EPOCH) * 1_000_000)
                await ws.send(
                    '{"op":"publish","ref":"p","event":{"type":"message.append",'
                    f'"message_id":"{message_id}","data":{{"delta":"t{intended:x} "}}}}}}'
                )
                if stats.window:
                    stats.published += 1
                next_t += period
                sent_in_message += 1
                if rotate and sent_in_message >= rotate:
                    # Real answers end; keep message rows at a realistic length.
                    await ws.send(complete_frame(message_id))
                    message_id = new_message_id()
                    await ws.send(create_frame(message_id))
                    sent_in_message = 0
    except websockets.ConnectionClosed as exc:
        stats.closes[str(exc.rcvd.code if exc.rcvd else "abnormal")] += 1


def slots(index: int, k: int) -> tuple[int, list[int]]:
    """Server slots (`Target.ws_url` takes them mod the servers) of session `index`'s agent and
    of its K subscribers: the agent at `index`, its subscribers from the next slot on.

    With several workers the agents alternate between them for every K, as a load balancer
    would spread them, and each session's fan-out crosses the channel layer. (The agent's slot
    was once `index * (K + 1)`: with K = 1 every agent landed on the first worker.)
    """
    return index, [index + j + 1 for j in range(k)]


async def open_session(
    target: Target, session: str, index: int, k: int, stats: Stats, sem: asyncio.Semaphore
) -> SessionLoad:
    """Connect K attached subscribers and the agent, and create the streaming message."""
    agent_slot, sub_slots = slots(index, k)

    async def sub(j: int) -> Subscriber:
        async with sem:
            ws = await Subscriber.connect(target.ws_url(session, sub_slots[j], f"sub-{index}-{j}"))
            await ws.attach()
            return ws

    subs = list(await asyncio.gather(*(sub(j) for j in range(k))))
    async with sem:
        agent = await open_ws(target.ws_url(session, agent_slot, f"agent-{index}"))
    return SessionLoad(session=session, agent=agent, subs=subs)


async def start_agent(s: SessionLoad, rate: float, rotate: int, stats: Stats) -> None:
    message_id = new_message_id()
    await s.agent.send(create_frame(message_id))
    reply = await s.agent.recv()
    if '"error"' in str(reply):
        raise RuntimeError(f"message.create refused: {reply!s:.300}")
    s.tasks.append(asyncio.create_task(ack_loop(s.agent, stats)))
    for sub in s.subs:
        sub.start(stats)
    s.tasks.append(asyncio.create_task(publisher(s, message_id, rate, rotate, stats)))


async def loop_lag_probe(samples: list[float], stop: asyncio.Event) -> None:
    """Sleep 10 ms repeatedly and record the overshoot: a busy generator shows it first."""
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(0.01)
        samples.append((time.monotonic() - t - 0.01) * 1000)


def resolve_pids(spec: dict[str, Any]) -> dict[str, list[int]]:
    """Pids to meter: fixed ones (servers we started) and found ones (Postgres backends, Redis)."""
    out: dict[str, list[int]] = {}
    for label, how in spec.items():
        if isinstance(how, list):
            out[label] = [int(p) for p in how]
        else:
            out[label] = find_pids(cmdline_contains=how.get("cmdline"), comm=how.get("comm"))
    return out


async def close_all(conns: list[ClientConnection] | list[ClientConnection | Subscriber]) -> None:
    async def one(ws: ClientConnection | Subscriber) -> None:
        # A close that fails is still closed for our purposes.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)

    for i in range(0, len(conns), 200):
        await asyncio.gather(*(one(ws) for ws in conns[i : i + 200]))


async def run_fanout(cfg: dict[str, Any], target: Target) -> None:
    k = int(cfg["k"])
    rate = float(cfg.get("rate", 50))
    rotate = int(cfg.get("rotate", 500))
    warmup = float(cfg.get("warmup_s", 1.0))
    window = float(cfg.get("window_s", 4.0))
    min_ratio = float(cfg.get("knee_min_ratio", 0.9))
    max_p99 = float(cfg.get("knee_max_p99_ms", 500))
    sync = bool(cfg.get("sync", False))
    retries = int(cfg.get("noisy_retries", 2))
    noisy = float(cfg.get("noisy_other_cores", 0.3))
    stats = Stats()
    sem = asyncio.Semaphore(int(cfg.get("connect_concurrency", 64)))
    sessions: list[SessionLoad] = []
    lag: list[float] = []
    stop_lag = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag_probe(lag, stop_lag))
    try:
        for step in cfg["steps"]:
            s_target = int(step)
            t_setup = time.monotonic()
            new = s_target - len(sessions)
            if new > 0:
                ids = await target.create_sessions(new)
                base = len(sessions)
                opened = await asyncio.gather(
                    *(
                        open_session(target, sid, base + i, k, stats, sem)
                        for i, sid in enumerate(ids)
                    )
                )
                for s in opened:
                    await start_agent(s, rate, rotate, stats)
                sessions.extend(opened)
            setup_s = time.monotonic() - t_setup
            log(f"step S={s_target} K={k}: {len(sessions)} sessions ready in {setup_s:.1f}s")
            await asyncio.sleep(warmup)
            if sync:
                emit({"event": "sync", "name": "window_start", "s": s_target})
                await wait_stdin()
            # A failed step measured while other programs on the shared machine took a
            # sizeable share of the CPU is measured again (at most `retries` times): the knee
            # should be the server's, not a neighbour's. Every attempt is kept in the output.
            attempts: list[dict[str, Any]] = []
            for _attempt in range(1 + (0 if sync else retries)):
                pids = resolve_pids(cfg.get("pids", {}))
                cpu = CpuWindow(pids)
                stats.reset()
                stats.errors.clear()
                closes_before = sum(stats.closes.values())
                lag.clear()
                gen0 = os.times()
                cpu.start()
                t0 = time.monotonic()
                stats.window = True
                await asyncio.sleep(window)
                stats.window = False
                t1 = time.monotonic()
                cpu_res = cpu.stop()
                gen1 = os.times()
                elapsed = t1 - t0
                lat = sorted(stats.lat)
                lag_sorted = sorted(lag)
                offered = s_target * rate * k
                delivered_rate = stats.delivered / elapsed
                p99 = percentile(lat, 0.99)
                gen_cpu = (gen1.user + gen1.system - gen0.user - gen0.system) / elapsed
                result = {
                    "event": "step",
                    "s": s_target,
                    "k": k,
                    "rate": rate,
                    "window_s": elapsed,
                    "setup_s": setup_s,
                    "offered_publish_per_s": s_target * rate,
                    "published_per_s": stats.published / elapsed,
                    "acks_per_s": stats.acks / elapsed,
                    "offered_deliveries_per_s": offered,
                    "delivered_per_s": delivered_rate,
                    "frames_per_s": stats.frames / elapsed,
                    "lat_p50_ms": (percentile(lat, 0.5) or 0) / 1000 if lat else None,
                    "lat_p90_ms": (percentile(lat, 0.9) or 0) / 1000 if lat else None,
                    "lat_p99_ms": (p99 or 0) / 1000 if lat else None,
                    "lat_max_ms": lat[-1] / 1000 if lat else None,
                    "samples": len(lat),
                    "errors": dict(stats.errors),
                    "closed_connections": sum(stats.closes.values()) - closes_before,
                    "close_codes": dict(stats.closes),
                    "server_cpu_s": cpu_res["cpu_s"],
                    "machine_busy_cores": cpu_res["machine_busy_cores"],
                    "generator_cpu_cores": gen_cpu,
                    "generator_loop_lag_p99_ms": percentile(lag_sorted, 0.99),
                }
                ok = (
                    delivered_rate >= min_ratio * offered
                    and p99 is not None
                    and p99 / 1000 <= max_p99
                    and result["closed_connections"] == 0
                )
                result["within_knee"] = ok
                result["other_cores"] = (
                    result["machine_busy_cores"]
                    - sum(sum(v) for v in result["server_cpu_s"].values()) / elapsed
                    - gen_cpu
                )
                attempts.append(result)
                if ok or result["other_cores"] < noisy or _attempt == (0 if sync else retries):
                    break
                log(
                    f"S={s_target}: failed with {result['other_cores']:.2f} other cores busy; again"
                )
            result["attempts"] = [
                {k: a[k] for k in ("delivered_per_s", "lat_p99_ms", "other_cores", "within_knee")}
                for a in attempts
            ]
            if sync:
                # Stop the agents first so the harness's "after" reading covers exactly the
                # tokens acked here (the last acks arrive within the grace period).
                for s in sessions:
                    s.tasks[-1].cancel()
                stats.window = True
                stats.acks = 0
                await asyncio.sleep(float(cfg.get("ack_grace_s", 2.0)))
                stats.window = False
                result["acks_after_window"] = stats.acks
                emit(result)
                emit({"event": "sync", "name": "window_end", "s": s_target})
                await wait_stdin()
                break
            emit(result)
            log(
                f"S={s_target}: offered {offered:.0f}/s delivered {delivered_rate:.0f}/s "
                f"p99 {result['lat_p99_ms']} ms gen {gen_cpu:.2f} cores ok={ok}"
            )
            if not ok and cfg.get("stop_after_knee", True):
                break
    finally:
        stop_lag.set()
        await lag_task
        for s in sessions:
            for t in s.tasks:
                t.cancel()
        await close_all([ws for s in sessions for ws in [s.agent, *s.subs]])


async def fill_session(target: Target, session: str, n: int, batch: int = 500) -> None:
    """Store n events (one streaming message and its tokens) through the REST batch API."""
    headers = {"Authorization": f"Bearer {target.token}"}
    message_id = new_message_id()
    async with httpx.AsyncClient(timeout=120, headers=headers) as http:
        url = f"{target.http[0]}/api/v1/sessions/{session}/events"
        events: list[dict[str, Any]] = [
            {
                "type": "message.create",
                "message_id": message_id,
                "data": {"role": "assistant", "status": "streaming"},
            }
        ]
        i = 0
        while len(events) < n:
            events.append(
                {"type": "message.append", "message_id": message_id, "data": {"delta": f"w{i} "}}
            )
            i += 1
        for start in range(0, n, batch):
            resp = await http.post(url, json={"events": events[start : start + batch]})
            if resp.status_code >= 300:
                raise RuntimeError(f"fill: {resp.status_code} {resp.text[:200]}")


async def run_resume(cfg: dict[str, Any], target: Target) -> None:
    n = int(cfg.get("events", 10_000))
    reps = int(cfg.get("reps", 5))
    (session,) = await target.create_sessions(1)
    t = time.monotonic()
    await fill_session(target, session, n)
    log(f"stored {n} events in {time.monotonic() - t:.1f}s")
    times: list[float] = []
    replayed: list[int] = []
    received: list[int] = []
    for rep in range(reps):
        t0 = time.monotonic()
        ws = await open_ws(target.ws_url(session, rep, f"resumer-{rep}"))
        frame, events = await attach(ws, after=0)
        times.append((time.monotonic() - t0) * 1000)
        replayed.append(int(frame.get("replayed", -1)))
        received.append(events)
        await ws.close()
    emit(
        {
            "event": "resume",
            "events": n,
            "times_ms": times,
            "median_ms": sorted(times)[len(times) // 2],
            "replayed": replayed,
            "received": received,
        }
    )


async def run_idle(cfg: dict[str, Any], target: Target) -> None:
    conns: list[ClientConnection] = []
    tasks: list[asyncio.Task] = []
    sem = asyncio.Semaphore(int(cfg.get("connect_concurrency", 64)))

    async def drain(ws: ClientConnection) -> None:
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    async def one(session: str, i: int) -> ClientConnection:
        async with sem:
            ws = await open_ws(target.ws_url(session, i, f"idle-{i}"))
            await attach(ws)
            return ws

    per_session = int(cfg.get("sockets_per_session", 1))
    premade: list[str] = list(cfg.get("session_ids") or [])
    budget = float(cfg.get("open_budget_s") or 0)
    try:
        for n in cfg["stages"]:
            need = int(n) - len(conns)
            t = time.monotonic()
            created_s = 0.0
            if need > 0:
                n_sessions = -(-need // per_session)
                ids = premade[:n_sessions] or await target.create_sessions(n_sessions)
                del premade[:n_sessions]
                created_s = time.monotonic() - t
                base = len(conns)
                # Open in chunks so a time budget (quick mode on a busy machine) can stop the
                # stage early; the report then shows how many sockets were really open.
                for lo in range(0, need, 100):
                    if budget and time.monotonic() - t > budget:
                        log(f"open budget of {budget}s spent: stage stops at {len(conns)}")
                        break
                    new = await asyncio.gather(
                        *(
                            one(ids[i // per_session], base + i)
                            for i in range(lo, min(need, lo + 100))
                        )
                    )
                    conns.extend(new)
                    tasks.extend(asyncio.create_task(drain(ws)) for ws in new)
            open_s = time.monotonic() - t
            log(f"{len(conns)} idle sockets open in {open_s:.1f}s (sessions {created_s:.1f}s)")
            await asyncio.sleep(float(cfg.get("settle_s", 2.0)))
            alive = sum(1 for ws in conns if ws.close_code is None)
            emit(
                {
                    "event": "sync",
                    "name": "idle",
                    "n": len(conns),
                    "planned": int(n),
                    "alive": alive,
                    "open_s": open_s,
                    "sessions_s": created_s,
                    "opened": len(conns),
                }
            )
            await wait_stdin()
    finally:
        for t in tasks:
            t.cancel()
        await close_all(conns)


async def main(cfg: dict[str, Any]) -> None:
    target = Target(
        ws=cfg["ws"], http=cfg.get("http", []), baton=bool(cfg["baton"]), token=cfg.get("token")
    )
    mode = cfg["mode"]
    if mode == "fanout":
        await run_fanout(cfg, target)
    elif mode == "resume":
        await run_resume(cfg, target)
    elif mode == "idle":
        await run_idle(cfg, target)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = json.loads(open(sys.argv[1]).read())  # noqa: SIM115
    try:
        import uvloop

        uvloop.run(main(config))
    except ImportError:
        asyncio.run(main(config))
