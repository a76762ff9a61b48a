"""Contender (d): a raw ``websockets`` broadcast server, the Python ceiling.

No Django, no persistence, no auth: one JSON encode per event and ``websockets.broadcast`` to
the session's sockets. It speaks the same frames as Baton (attach/attached, publish/ack,
events) so the load generator drives every contender with identical code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve

SUBSCRIBERS: dict[str, set[ServerConnection]] = defaultdict(set)
SEQ: dict[str, int] = defaultdict(int)


def _session_of(path: str) -> str:
    # /ws/sessions/<id>/?token=... -> <id>
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    return parts[2] if len(parts) >= 3 else "default"


def make_event(session: str, event: dict[str, Any], author: str) -> dict[str, Any]:
    """Shape an event like Baton's wire JSON so frame sizes are comparable."""
    SEQ[session] += 1
    seq = SEQ[session]
    return {
        "seq": seq,
        "id": f"evt_{session}_{seq}",
        "session": session,
        "type": event.get("type"),
        "message_id": event.get("message_id"),
        "author": {"kind": "agent", "id": author, "name": author},
        "data": event.get("data", {}),
        "visibility": "all",
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


async def handler(ws: ServerConnection) -> None:
    session = _session_of(ws.request.path if ws.request else "/")
    author = "agent"
    subs = SUBSCRIBERS[session]
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                await ws.send(json.dumps({"op": "error", "code": "bad_json", "message": ""}))
                continue
            op = frame.get("op")
            if op == "publish":
                events = frame.get("events") or [frame.get("event") or {}]
                seqs = []
                for ev in events:
                    out = make_event(session, ev, author)
                    seqs.append(out["seq"])
                    websockets.broadcast(subs, json.dumps({"op": "events", "events": [out]}))
                ack: dict[str, Any] = {"op": "ack", "ref": frame.get("ref")}
                if "events" in frame:
                    ack["seqs"] = seqs
                else:
                    ack["seq"] = seqs[0]
                await ws.send(json.dumps(ack))
            elif op == "attach":
                subs.add(ws)
                await ws.send(
                    json.dumps(
                        {"op": "attached", "head": SEQ[session], "replayed": 0, "presence": []}
                    )
                )
            elif op == "ping":
                await ws.send('{"op":"pong"}')
    except websockets.ConnectionClosed:
        pass
    finally:
        subs.discard(ws)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port, compression=None, max_size=2**22, ping_interval=None):
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.host, args.port))
    else:
        asyncio.run(main(args.host, args.port))
