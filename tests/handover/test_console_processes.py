"""`/ws/console/` across processes: a request made in another process reaches a console socket
of a real server — by the channel-layer poke on Redis, by the periodic re-read in memory."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from websockets.sync.client import connect

from handover import services
from tests.conftest import ServerProcess, free_port, server_env
from tests.handover.conftest import USER


@pytest.fixture
def console_server(server: ServerProcess, tmp_path: Path) -> Iterator[ServerProcess]:
    """A second server process on the same database (and the same Redis, when there is one).

    With Redis its periodic re-read is made so slow that only the poke can explain a prompt
    update; without Redis (one process per layer) the re-read is the only way, so it is quick.
    """
    refresh = "120" if settings.REDIS_URL else "0.5"
    proc = ServerProcess(port=free_port(), env=server_env(BATON_CONSOLE_REFRESH_SECONDS=refresh))
    proc.log_path = tmp_path / "console-server.log"
    proc.start()
    yield proc
    proc.stop()


def login(base_url: str, username: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, timeout=10)
    page = client.get("/console/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = client.post(
        "/console/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302, response.text
    return client


def test_a_request_in_another_process_reaches_the_console_socket(
    console_server, operator_user, make_session
):
    session = make_session(title="cross-process")
    browser = login(console_server.base_url, "olivia", "pw-olivia")
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    url = f"{console_server.ws_url}/ws/console/"
    with connect(
        url, additional_headers={"Cookie": cookie, "Origin": console_server.base_url}
    ) as ws:
        first = json.loads(ws.recv(10))
        assert first["op"] == "state" and first["queue"] == []
        started = time.monotonic()
        # This test process is "another worker": its commit pokes through the layer.
        services.request_handover(session_id=session.id, author=USER, reason="from afar")
        frame = json.loads(ws.recv(10))
        elapsed = time.monotonic() - started
        assert [q["id"] for q in frame["queue"]] == [session.id]
        assert frame["queue"][0]["handover"]["reason"] == "from afar"
        assert elapsed < 5, elapsed
    browser.close()
