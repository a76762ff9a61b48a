"""The whole handover in Debian chromium (Playwright) against a real server process.

An agent streams to a user (both real WebSocket clients); the agent asks for a human; the
operator logs in, sees the session arrive in the queue live, opens it with its full history
(tool progress included), claims it and replies; the user gets the reply, the agent is refused;
the operator hands back and the agent answers again. Screenshots go to `BATON_SCREENSHOT_DIR`
(the committed ones in `docs/screenshots/` come from this test) or to a temporary folder.

No database access once the browser runs: Playwright's sync API keeps an event loop in this
thread, which Django's ORM refuses to run beside. Everything after setup goes over HTTP and
WebSockets, as a real deployment would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from playwright.sync_api import expect, sync_playwright
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = "<img src=x onerror=alert(1)>"


class Peer:
    """A real WebSocket client of the Baton protocol, reading in a background thread."""

    def __init__(self, url: str) -> None:
        self.ws = connect(url, open_timeout=10).__enter__()  # closed in close()
        self.frames: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.refs = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                raw = self.ws.recv()
            except ConnectionClosed:
                return
            frame = json.loads(raw)
            with self.cond:
                self.frames.append(frame)
                self.cond.notify_all()

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; last frames: {self.frames[-5:]}")
                self.cond.wait(left)

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [e for f in self.frames if f["op"] == "events" for e in f["events"]]

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict:
        frame = self.wait(
            lambda f: f["op"] == "events" and any(predicate(e) for e in f["events"]), timeout
        )
        return next(e for e in frame["events"] if predicate(e))

    def publish(self, event_type: str, data: dict[str, Any], message_id: str | None = None):
        self.refs += 1
        ref = f"r{self.refs}"
        event: dict[str, Any] = {"type": event_type, "data": data}
        if message_id:
            event["message_id"] = message_id
        self.ws.send(json.dumps({"op": "publish", "ref": ref, "event": event}))
        return self.wait(lambda f: f.get("ref") == ref and f["op"] in ("ack", "error"))

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


def snap(page: Any, path: Path) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path))


def shot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("BATON_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def test_operator_takes_over_a_live_session_in_chromium(server, agent_key, operator_user, tmp_path):
    shots = shot_dir(tmp_path)
    base = server.base_url
    agent_http = httpx.Client(
        base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {agent_key}"}, timeout=10
    )
    sid = agent_http.post("/sessions", json={"title": "Order 1042 refund"}).json()["id"]
    user_token = agent_http.post(
        f"/sessions/{sid}/tokens", json={"client_id": "dana", "kind": "user", "name": "Dana"}
    ).json()["token"]

    user = Peer(f"{server.ws_url}/ws/sessions/{sid}/?token={user_token}&after=0")
    agent = Peer(f"{server.ws_url}/ws/sessions/{sid}/?token={agent_key}&after=0")
    user.wait(lambda f: f["op"] == "attached")
    agent.wait(lambda f: f["op"] == "attached")

    # The conversation so far: a user question, tool progress, a streamed answer.
    assert (
        user.publish(
            "message.create",
            {"role": "user", "content": "Where is my refund for order 1042?", "status": "complete"},
        )["op"]
        == "ack"
    )
    agent.publish("progress.tool_call", {"name": "lookup_order", "args": {"order": 1042}})
    agent.publish("progress.tool_result", {"name": "lookup_order", "result": {"state": "held"}})
    agent.publish("message.create", {"role": "assistant"}, message_id="a1")
    for token in ["Your refund ", "is on hold ", "by our payments team."]:
        agent.publish("message.append", {"delta": token}, message_id="a1")
    agent.publish("message.complete", {"status": "complete"}, message_id="a1")
    streamed = user.wait_event(lambda e: e["type"] == "message.complete")
    assert streamed["message_id"] == "a1"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        dialogs: list[str] = []
        errors: list[str] = []

        def on_dialog(dialog: Any) -> None:
            if dialog.type == "confirm" and dialog.message.startswith("Close this session"):
                dialog.accept()  # the Close button asks first
            else:
                dialogs.append(dialog.message)
                dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda e: errors.append(str(e)))

        # Log in (the console sends anonymous visitors to its login page).
        page.goto(f"{base}/console/")
        assert "/console/login/" in page.url
        page.fill("#id_username", "olivia")
        page.fill("#id_password", "pw-olivia")
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/console/")
        expect(page.locator("#live-status")).to_have_text("live")
        expect(page.locator("#queue .queue-item")).to_have_count(0)

        # The agent asks for a human: the queue updates without a reload, with a banner.
        response = agent_http.post(
            f"/sessions/{sid}/handover",
            json={"reason": "Refund on hold", "summary": "Payments hold; customer upset."},
        )
        assert response.status_code == 201, response.text
        item = page.locator(f'#queue .queue-item[data-session="{sid}"]')
        expect(item).to_be_visible(timeout=5000)
        expect(item.locator(".reason")).to_have_text("Refund on hold")
        expect(item.locator(".summary")).to_have_text("Payments hold; customer upset.")
        expect(item.locator(".waiting")).to_contain_text("waiting")
        expect(page.locator("#banner")).to_contain_text("New in the queue")
        snap(page, shots / "01-queue.png")

        # The full prior history, tool progress included.
        item.locator("a").click()
        page.wait_for_url(f"{base}/console/sessions/{sid}/")
        history = page.locator("#history")
        expect(history.locator(".role-user .content")).to_have_text(
            "Where is my refund for order 1042?"
        )
        expect(history.locator('[data-message-id="a1"] .content')).to_have_text(
            "Your refund is on hold by our payments team."
        )
        tool = history.locator('details.progress[data-type="progress.tool_call"]')
        expect(tool).to_contain_text("lookup_order")
        tool.locator("summary").click()
        expect(tool.locator("pre")).to_contain_text('"order": 1042')
        expect(history.locator('[data-type="handover.requested"]')).to_contain_text(
            "Refund on hold"
        )
        expect(page.locator("#status")).to_have_text("awaiting human")
        expect(page.locator("#presence")).to_contain_text("Dana")
        snap(page, shots / "02-history.png")

        # Claim, then the agent is refused.
        page.click("#claim")
        expect(page.locator("#status")).to_have_text("with human")
        expect(history.locator('[data-type="handover.claimed"]')).to_be_visible()
        agent.wait_event(lambda e: e["type"] == "handover.claimed")
        refused = agent.publish(
            "message.create", {"role": "assistant", "content": "I can help!", "status": "complete"}
        )
        assert (refused["op"], refused["code"]) == ("error", "controlled_by_human")
        rest_refused = agent_http.post(
            f"/sessions/{sid}/events",
            json={"type": "message.create", "data": {"role": "assistant", "content": "x"}},
        )
        assert rest_refused.status_code == 409
        assert rest_refused.json()["error"]["code"] == "controlled_by_human"

        # Typing both ways, then the operator's reply reaches the user.
        page.fill("#composer-text", "Hi Dana, I am Olivia from payments.")
        page.locator("#composer-text").dispatch_event("input")
        typing = user.wait(lambda f: f["op"] == "ephemeral" and f["type"] == "typing")
        assert typing["author"]["kind"] == "operator" and typing["state"] is True
        user.send({"op": "typing", "state": True})
        expect(page.locator("#typing")).to_contain_text("Dana typing")
        user.send({"op": "typing", "state": False})
        expect(page.locator("#typing")).to_be_hidden()
        page.click("#send")
        reply = user.wait_event(
            lambda e: e["type"] == "message.create" and e["author"]["kind"] == "operator"
        )
        assert reply["data"]["content"] == "Hi Dana, I am Olivia from payments."
        assert reply["data"]["role"] == "operator" and reply["data"]["status"] == "complete"

        # An internal note: shown to the operator, never sent to the user.
        page.fill("#composer-text", "Customer is a VIP; refund approved by finance.")
        page.click("#note")
        expect(history.locator(".note .note-text")).to_have_text(
            "Customer is a VIP; refund approved by finance."
        )

        # A refused reply says why and is given back to the operator, not lost.
        oversized = "x" * (settings.BATON_MAX_EVENT_BYTES + 1)
        page.fill("#composer-text", oversized)
        page.click("#send")
        expect(page.locator("#action-error")).to_contain_text("too_large")
        expect(page.locator("#composer-text")).to_have_value(oversized)
        page.fill("#composer-text", "")

        # A hostile user message is shown as text, never as markup.
        user.publish("message.create", {"role": "user", "content": HOSTILE, "status": "complete"})
        hostile = history.locator(".role-user .content").last
        expect(hostile).to_have_text(HOSTILE)
        assert history.locator("img").count() == 0
        snap(page, shots / "03-claimed-reply.png")

        # Hand back to the bot: the agent answers again.
        page.click("#release")
        expect(page.locator("#status")).to_have_text("active")
        agent.wait_event(lambda e: e["type"] == "handover.released")
        # The agent streams again, token by token, live into the console.
        assert agent.publish("message.create", {"role": "assistant"}, "a2")["op"] == "ack"
        answer = history.locator('[data-message-id="a2"]')
        expect(answer.locator(".msg-status")).to_have_text("streaming…")
        for token in ["Your refund ", "is "]:
            agent.publish("message.append", {"delta": token}, "a2")
        expect(answer.locator(".content")).to_have_text("Your refund is ")
        agent.publish("message.append", {"delta": "released."}, "a2")
        agent.publish("message.complete", {"status": "complete"}, "a2")
        expect(answer.locator(".content")).to_have_text("Your refund is released.")
        expect(answer.locator(".msg-status")).to_have_text("")
        user.wait_event(lambda e: e["type"] == "message.complete" and e["message_id"] == "a2")
        snap(page, shots / "04-released.png")

        # Diagnostics: each device with its delivery position against the head.
        user_seen = max(e["seq"] for e in user.events())
        user.send({"op": "received", "seq": user_seen})
        page.click("#tab-diagnostics")
        rows = page.locator("#diag-connections tr")
        expect(rows.first).to_be_visible()
        dana = page.locator("#diag-connections tr", has_text="Dana (user)")
        expect(dana).to_contain_text(f"#{user_seen}")  # its last acknowledged seq
        expect(page.locator("#diag-timeline")).to_contain_text("opened")
        snap(page, shots / "05-diagnostics.png")

        # Close: everyone sees it, and nobody can publish any more.
        page.click("#tab-history")
        page.click("#close")
        expect(page.locator("#status")).to_have_text("closed")
        expect(page.locator("#send")).to_be_disabled()
        user.wait_event(lambda e: e["type"] == "session.closed")
        late = agent.publish("progress.step", {"n": 1})
        assert (late["op"], late["code"]) == ("error", "session_closed")

        assert dialogs == [], dialogs  # the hostile message never ran
        assert errors == [], errors
        browser.close()

    user_types = [e["type"] for e in user.events()]
    assert "note.internal" not in user_types
    assert not any(t.startswith("connection.") for t in user_types)
    assert "note.internal" not in [e["type"] for e in agent.events()]
    exported = [
        json.loads(line) for line in agent_http.get(f"/sessions/{sid}/export").text.splitlines()
    ]
    assert [e["type"] for e in exported if e["type"].startswith("handover.")] == [
        "handover.requested",
        "handover.claimed",
        "handover.released",
    ]
    # Closed last (only the server's presence/diagnostics records may follow a close).
    after_close = [e["type"] for e in exported][
        [e["type"] for e in exported].index("session.closed") :
    ]
    assert all(t.split(".")[0] in ("session", "presence", "connection") for t in after_close)
    user.close()
    agent.close()
    agent_http.close()


@pytest.fixture(autouse=True)
def _no_browser_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let Playwright fetch a browser: the system chromium is the one under test."""
    monkeypatch.setenv("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
