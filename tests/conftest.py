"""Shared fixtures: credentials, sessions, API clients, and a real server process.

The suite runs on the embedded default (SQLite + in-memory layer) and, when `DATABASE_URL` /
`REDIS_URL` are set, on Postgres + Redis.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from rest_framework.test import APIClient

from project.server import uvicorn_command
from sessions_app.auth import mint_client_token
from sessions_app.hub import shutdown_hub
from sessions_app.identity import Author
from sessions_app.models import Session
from sessions_app.services import create_agent_key, create_session

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def agent_key(db: None) -> str:
    """A raw agent key for an agent named `test-agent`."""
    _key, raw = create_agent_key(name="test-agent")
    return raw


@pytest.fixture
def make_session(db: None) -> Callable[..., Session]:
    def factory(title: str = "test", **metadata: Any) -> Session:
        return create_session(
            created_by=Author(kind="agent", id="test-agent", name="test-agent"),
            title=title,
            metadata=metadata,
        )

    return factory


@pytest.fixture
def session(make_session: Callable[..., Session]) -> Session:
    return make_session()


@pytest.fixture
def make_token() -> Callable[..., str]:
    def factory(
        session_id: str,
        client_id: str = "user-1",
        kind: str = "user",
        capabilities: list[str] | None = None,
        ttl: int = 600,
    ) -> str:
        token, _ = mint_client_token(
            session_id=session_id,
            client_id=client_id,
            kind=kind,
            name=client_id.title(),
            capabilities=capabilities,
            ttl=ttl,
        )
        return token

    return factory


@pytest.fixture
def api(agent_key: str) -> APIClient:
    """An API client authenticated as the agent."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {agent_key}")
    return client


@pytest.fixture
def anon_api() -> APIClient:
    return APIClient()


@pytest.fixture
def operator_user(db: None) -> Any:
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user("olivia", password="pw-olivia", first_name="Olivia")
    user.user_permissions.add(
        Permission.objects.get(codename="operate", content_type__app_label="handover")
    )
    return User.objects.get(pk=user.pk)  # fresh instance: no stale permission cache


@pytest.fixture
async def hub_cleanup() -> Any:
    """Stop the hub's background tasks at the end of an async test (each test has its loop)."""
    yield
    await shutdown_hub()


# --------------------------------------------------------------------------- real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url_for_tests() -> str:
    """The URL of the database pytest-django created, for a server process to share it."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


@dataclass
class ServerProcess:
    """A Baton server (uvicorn) in its own process, on a free port."""

    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.log_path is not None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            uvicorn_command(
                host="127.0.0.1",
                port=self.port,
                ping_seconds=5,
                options=[
                    *("--log-level", "warning", "--timeout-graceful-shutdown", "2"),
                    *self.extra_args,
                ],
            ),
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                httpx.get(f"{self.base_url}/api/schema/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in 30 s")

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def server_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": database_url_for_tests(), **extra}
    env.setdefault("BATON_HEARTBEAT_SECONDS", "1")
    env.setdefault("BATON_WORKER_TIMEOUT_SECONDS", "4")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(scope="session", autouse=True)
def _close_sync_thread_connections(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """`database_sync_to_async` runs in its own thread, whose connections the test-database
    teardown cannot see; close them first so Postgres can drop the database."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        asyncio.run(database_sync_to_async(connections.close_all)())


@pytest.fixture(scope="session")
def live_server_proc(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server process for the whole run, sharing the test database."""
    server = ServerProcess(port=free_port(), env=server_env())
    server.log_path = tmp_path_factory.mktemp("server") / "server.log"
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_cluster(
    transactional_db: None, tmp_path: Path
) -> Iterator[Callable[..., list[ServerProcess]]]:
    """Start `n` worker processes sharing the test database (and REDIS_URL, when set)."""
    started: list[ServerProcess] = []

    def factory(n: int = 2, **env: str) -> list[ServerProcess]:
        workers = []
        for _ in range(n):
            worker = ServerProcess(port=free_port(), env=server_env(**env))
            worker.log_path = tmp_path / f"worker-{len(started)}.log"
            started.append(worker)
            worker.start()
            workers.append(worker)
        return workers

    yield factory
    for worker in started:
        worker.stop()


@pytest.fixture
def server(live_server_proc: ServerProcess, transactional_db: None) -> Iterator[ServerProcess]:
    """The live server, with this test's writes committed so the server sees them."""
    if live_server_proc.process is None or live_server_proc.process.poll() is not None:
        live_server_proc.start()
    yield live_server_proc
    wait_until_quiet()


def wait_until_quiet(timeout: float = 15) -> None:
    """Let the server finish closing this test's sockets before the tables are truncated
    (on Postgres a TRUNCATE racing a close_connection transaction can deadlock)."""
    from sessions_app.models import Connection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Connection.objects.filter(closed_at__isnull=True).exists():
            break
        time.sleep(0.1)
    time.sleep(0.3)  # the last close's transaction commits right after its row update
