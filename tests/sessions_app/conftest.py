"""A small WebSocket test client over Channels' WebsocketCommunicator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from project.asgi import application


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class WsClient:
    """Speaks the Baton protocol; keeps every event it was sent, in arrival order."""

    def __init__(
        self,
        session_id: str,
        token: str | None = None,
        query: str = "",
        app: Any = None,
        **kw: Any,
    ):
        path = f"/ws/sessions/{session_id}/"
        params = [p for p in [f"token={token}" if token else "", query] if p]
        if params:
            path += "?" + "&".join(params)
        self.communicator = WebsocketCommunicator(app or application, path, **kw)
        self.events: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.closed_code: int | None = None

    async def connect(self) -> WsClient:
        connected, _ = await self.communicator.connect()
        assert connected
        return self

    async def frame(self, timeout: float = 3) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            self.closed_code = output.get("code")
            raise Closed(self.closed_code)
        frame = json.loads(output["text"])
        self.frames.append(frame)
        if frame["op"] == "events":
            self.events.extend(frame["events"])
        return frame

    async def until(self, op: str, timeout: float = 3) -> dict[str, Any]:
        while True:
            frame = await self.frame(timeout)
            if frame["op"] == op:
                return frame

    async def until_event(self, event_type: str, timeout: float = 3) -> dict[str, Any]:
        for event in self.events:
            if event["type"] == event_type and not event.get("_seen"):
                event["_seen"] = True
                return event
        while True:
            frame = await self.frame(timeout)
            if frame["op"] == "events":
                for event in frame["events"]:
                    if event["type"] == event_type and not event.get("_seen"):
                        event["_seen"] = True
                        return event

    async def until_seq(self, seq: int, timeout: float = 3) -> None:
        while not self.events or self.events[-1]["seq"] < seq:
            await self.frame(timeout)

    async def send(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        await self.communicator.send_to(text_data=text)

    async def attach(self, **fields: Any) -> dict[str, Any]:
        await self.send({"op": "attach", **fields})
        return await self.until("attached")

    async def publish(self, ref: str = "r", **event: Any) -> dict[str, Any]:
        await self.send({"op": "publish", "ref": ref, "event": event})
        while True:
            frame = await self.frame()
            if frame["op"] in ("ack", "error") and frame.get("ref") == ref:
                return frame

    async def expect_close(self, timeout: float = 3) -> int | None:
        try:
            while True:
                await self.frame(timeout)
        except Closed as closed:
            return closed.code

    async def close(self, code: int = 1000) -> None:
        await self.communicator.disconnect(code=code)

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.events]


@pytest.fixture
def ws() -> type[WsClient]:
    return WsClient
