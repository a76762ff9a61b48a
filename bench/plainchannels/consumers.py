"""The textbook Channels fan-out: every publish is one ``group_send``; every subscriber's
consumer gets its own channel-layer message and encodes its own frame.

This is what Baton's hub is meant to beat, so it is written the way the Channels tutorial
writes a chat room, without tricks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

SEQ: dict[str, int] = defaultdict(int)


class SessionConsumer(AsyncWebsocketConsumer):
    """Same frames as Baton: attach → attached, publish → ack + group-wide events frame."""

    async def connect(self) -> None:
        self.session_id: str = self.scope["url_route"]["kwargs"]["session_id"]
        self.group = f"s.{self.session_id}"
        self.attached = False
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.attached:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            frame = json.loads(text_data or "")
        except ValueError:
            await self.send(json.dumps({"op": "error", "code": "bad_json", "message": ""}))
            return
        op = frame.get("op")
        if op == "publish":
            events = frame.get("events") or [frame.get("event") or {}]
            seqs = []
            for ev in events:
                out = self._event(ev)
                seqs.append(out["seq"])
                await self.channel_layer.group_send(
                    self.group, {"type": "session.event", "event": out}
                )
            ack: dict[str, Any] = {"op": "ack", "ref": frame.get("ref")}
            if "events" in frame:
                ack["seqs"] = seqs
            else:
                ack["seq"] = seqs[0]
            await self.send(json.dumps(ack))
        elif op == "attach":
            await self.channel_layer.group_add(self.group, self.channel_name)
            self.attached = True
            head = SEQ[self.session_id]
            await self.send(
                json.dumps({"op": "attached", "head": head, "replayed": 0, "presence": []})
            )
        elif op == "ping":
            await self.send('{"op":"pong"}')

    def _event(self, ev: dict[str, Any]) -> dict[str, Any]:
        SEQ[self.session_id] += 1
        seq = SEQ[self.session_id]
        return {
            "seq": seq,
            "id": f"evt_{self.session_id}_{seq}",
            "session": self.session_id,
            "type": ev.get("type"),
            "message_id": ev.get("message_id"),
            "author": {"kind": "agent", "id": "agent", "name": "agent"},
            "data": ev.get("data", {}),
            "visibility": "all",
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }

    async def session_event(self, message: dict[str, Any]) -> None:
        await self.send(json.dumps({"op": "events", "events": [message["event"]]}))
