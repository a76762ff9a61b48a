"""The demo chat in Debian's Chromium (Playwright), against a real server and the demo agent."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from sessions_app.services import create_agent_key
from tests.conftest import ROOT, ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: sync Playwright runs an event loop in this thread while it is open,
    which would break every async test that ran after it."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def demo_key(server: ServerProcess) -> str:
    _key, raw = create_agent_key(name="demo-agent")
    return raw


@pytest.fixture
def demo_agent(server: ServerProcess, demo_key: str) -> Iterator[subprocess.Popen[bytes]]:
    """The scripted agent, slow enough (~14 words/s) to act in the middle of a reply."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baton_client.demo_agent",
            *("--url", server.base_url, "--key", demo_key),
            *("--token-delay", "0.07", "--poll", "0.2"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield proc
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def open_demo(browser: Browser, server: ServerProcess) -> Iterator[Any]:
    """Opens demo pages; closes them before the server fixture waits for sockets to go."""
    context = browser.new_context()

    def opener(url: str) -> Page:
        page = context.new_page()
        page.goto(url)
        expect(page.locator("#connection")).to_have_text("open", timeout=15_000)
        return page

    yield opener
    context.close()


def session_id_of(page: Page) -> str:
    return page.url.rstrip("/").rsplit("/", 1)[-1]


def assistant(page: Page) -> Any:
    return page.locator(".msg.role-assistant").last


def server_messages(server: ServerProcess, key: str, session_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.base_url}/api/v1/sessions/{session_id}/messages",
        headers={"Authorization": f"Bearer {key}"},
    )
    return response.json()["messages"]


def server_events(server: ServerProcess, key: str, session_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.base_url}/api/v1/sessions/{session_id}/events",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {key}"},
    )
    return response.json()["events"]


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def wait_streaming(page: Page) -> None:
    """Until the assistant's reply is visibly half-way: some words in, still streaming."""
    reply = assistant(page)
    expect(reply).to_have_attribute("data-status", "streaming", timeout=20_000)
    expect(reply.locator(".content")).to_contain_text("Baton", timeout=20_000)


def transcript(page: Page) -> list[str]:
    return page.locator("#transcript .msg .content").all_text_contents()


def test_two_windows_show_the_same_conversation(open_demo, server, demo_agent, demo_key):
    first = open_demo(f"{server.base_url}/demo/")
    second = open_demo(first.url)
    send(first, "hello from window one")
    for page in (first, second):
        expect(assistant(page)).to_have_attribute("data-status", "complete", timeout=30_000)
    assert transcript(first) == transcript(second)
    messages = server_messages(server, demo_key, session_id_of(first))
    assert transcript(first) == [m["content"] for m in messages]
    assert "hello from window one" in transcript(second)[0]


def test_reload_mid_stream_resumes_without_duplicated_text(open_demo, server, demo_agent, demo_key):
    page = open_demo(f"{server.base_url}/demo/")
    send(page, "please stream something long")
    wait_streaming(page)
    page.reload()
    expect(page.locator("#connection")).to_have_text("open", timeout=15_000)
    expect(assistant(page)).to_have_attribute("data-status", "complete", timeout=60_000)
    final = server_messages(server, demo_key, session_id_of(page))
    assert transcript(page) == [m["content"] for m in final]
    reply = final[-1]["content"]
    assert reply.count("Baton keeps this conversation durable") == 1


def test_stop_cancels_the_reply(open_demo, server, demo_agent, demo_key):
    page = open_demo(f"{server.base_url}/demo/")
    send(page, "say a lot")
    wait_streaming(page)
    page.click("#stop")
    expect(assistant(page)).to_have_attribute("data-status", "cancelled", timeout=20_000)
    events = server_events(server, demo_key, session_id_of(page))
    cancels = [e for e in events if e["type"] == "signal.cancel"]
    assert len(cancels) == 1
    assert cancels[0]["author"]["kind"] == "user"
    reply_id = cancels[0]["data"]["message_id"]
    completes = [e for e in events if e["type"] == "message.complete"]
    assert [(c["message_id"], c["data"]["status"]) for c in completes] == [(reply_id, "cancelled")]
    assert not [
        e for e in events if e["type"] == "message.append" and e["seq"] > completes[0]["seq"]
    ]


def test_going_offline_and_back_resumes_with_nothing_missing(
    open_demo, server, demo_agent, demo_key
):
    page = open_demo(f"{server.base_url}/demo/")
    send(page, "keep talking while I am offline")
    wait_streaming(page)
    page.context.set_offline(True)
    page.wait_for_timeout(1500)
    page.context.set_offline(False)
    expect(assistant(page)).to_have_attribute("data-status", "complete", timeout=60_000)
    final = server_messages(server, demo_key, session_id_of(page))
    assert transcript(page) == [m["content"] for m in final]


def test_hostile_content_is_rendered_as_text(open_demo, server, demo_agent):
    page = open_demo(f"{server.base_url}/demo/")
    page.evaluate("window.__xss = 0")
    send(page, '<img src=x onerror="window.__xss=1">')
    expect(page.locator(".msg.role-user .content").first).to_have_text(
        '<img src=x onerror="window.__xss=1">'
    )
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") == 0
    assert page.locator("#transcript img").count() == 0
