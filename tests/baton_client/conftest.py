"""A real Baton server in a subprocess (uvicorn) and a TCP proxy that can cut connections.

The SDK is tested over real sockets against the real ASGI app. Each server gets a database of
its own (SQLite file, or Postgres when the run's DATABASE_URL is Postgres; migrated once per
run, copied per server) rather than pytest-django's shared test database: killing and
restarting a server mid-test is then safe, the tests need no `transactional_db` flush, and
nothing leaks between servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from baton_client import BatonClient, BatonREST
from project.server import uvicorn_command

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Database:
    """The database of one test server: a SQLite file, or a Postgres database of its own.

    Postgres is used when the run's `DATABASE_URL` points at Postgres (the CI's second pass);
    each server then gets `CREATE DATABASE … TEMPLATE` of one migrated template.
    """

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory  # unique per database: also names its Redis prefix

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith(("postgres://", "postgresql://"))

    def env(self) -> dict[str, str]:
        """`REDIS_URL`, when set, is kept (the SDK is then tested over channels-redis) with a
        prefix of this server's own so two test servers never share channel-layer groups."""
        env = dict(os.environ)
        env["DATABASE_URL"] = self.url
        env["BATON_REDIS_PREFIX"] = f"baton-sdk-test-{os.getpid()}-{self.directory.name}"
        env["DJANGO_SETTINGS_MODULE"] = "project.settings"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def execute(self, sql: str, params: tuple[object, ...]) -> None:
        """Run one statement (`%s` placeholders) the way another process would."""
        if self.is_postgres:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql, params)  # type: ignore[arg-type]
        else:
            import sqlite3

            with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30) as conn:
                conn.execute(sql.replace("%s", "?"), params)


def _pg_admin_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


def _pg_with_name(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(_pg_admin_url(url), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def _manage(db: Database, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=db.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@dataclass
class Template:
    db: Database
    agent_key: str
    pg_prefix: str | None = None
    copies: int = 0

    def copy(self, directory: Path) -> Database:
        """A fresh database for one server, holding the template's key."""
        if self.pg_prefix is None:
            path = directory / "baton.sqlite3"
            shutil.copy(self.db.url.removeprefix("sqlite:///"), path)
            return Database(f"sqlite:///{path}", directory)
        self.copies += 1
        name = f"{self.pg_prefix}_{self.copies}"
        _pg_admin(self.db.url, f'CREATE DATABASE "{name}" TEMPLATE "{self.pg_prefix}_tpl"')
        return Database(_pg_with_name(self.db.url, name), directory)

    def drop_all(self) -> None:
        if self.pg_prefix is None:
            return
        for n in range(1, self.copies + 1):
            _pg_admin(self.db.url, f'DROP DATABASE IF EXISTS "{self.pg_prefix}_{n}" WITH (FORCE)')
        _pg_admin(self.db.url, f'DROP DATABASE IF EXISTS "{self.pg_prefix}_tpl" WITH (FORCE)')


@pytest.fixture(scope="session")
def baton_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """A migrated database holding one agent key; each server works on a copy of it."""
    directory = tmp_path_factory.mktemp("baton-db")
    run_url = os.environ.get("DATABASE_URL", "")
    if run_url.startswith(("postgres://", "postgresql://")):
        prefix = f"baton_sdk_{os.getpid()}"
        _pg_admin(run_url, f'CREATE DATABASE "{prefix}_tpl"')
        db = Database(_pg_with_name(run_url, f"{prefix}_tpl"), directory)
    else:
        prefix = None
        db = Database(f"sqlite:///{directory / 'template.sqlite3'}", directory)
    template = Template(db, "", prefix)
    try:
        _manage(db, "migrate", "--noinput")
        out = _manage(db, "create_agent_key", "sdk-tests")
        template.agent_key = out.strip().splitlines()[-1].strip()
        assert template.agent_key.startswith("bk_"), out
        yield template
    finally:
        template.drop_all()


class LiveServer:
    """`python -m uvicorn project.asgi:application` on a fixed port, restartable in place."""

    def __init__(self, db: Database, agent_key: str, log_path: Path) -> None:
        self.db = db
        self.agent_key = agent_key
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            uvicorn_command(host="127.0.0.1", port=self.port, options=["--log-level", "warning"]),
            cwd=REPO,
            env=self.db.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/api/v1/sessions", timeout=1)
                return
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no close frames, no cleanup; exactly what a crashed worker looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _server(template: Template, directory: Path) -> LiveServer:
    return LiveServer(template.copy(directory), template.agent_key, directory / "server.log")


@pytest.fixture(scope="session")
def baton_server(
    baton_template: Template, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server shared by the tests that never kill it."""
    server = _server(baton_template, tmp_path_factory.mktemp("baton-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server(baton_template: Template, tmp_path: Path) -> Iterator[LiveServer]:
    """A server of this test's own, free to be killed and restarted."""
    server = _server(baton_template, tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rest(baton_server: LiveServer) -> Iterator[BatonREST]:
    with BatonREST(baton_server.url, baton_server.agent_key) as client:
        yield client


@pytest.fixture
async def agent(baton_server: LiveServer) -> AsyncIterator[BatonClient]:
    async with BatonClient(baton_server.url, baton_server.agent_key, client_id="agent") as client:
        yield client


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the server and can cut or blackhole every connection.

    `drop()` aborts both sides at once (no close frame), like a network failure: the server
    sees an abnormal close and the client a lost connection. With `blackhole = True` bytes from
    the server are swallowed, so a publish reaches the server but its ack never comes back.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blackhole = False
        self.connections = 0
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._pairs.append((writer, up_writer))
        for src, dst, downstream in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, downstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, downstream: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if downstream and self.blackhole:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.transport.abort()

    def drop(self) -> None:
        for client_writer, upstream_writer in self._pairs:
            client_writer.transport.abort()
            upstream_writer.transport.abort()
        self._pairs.clear()

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()


@pytest.fixture
async def proxy(baton_server: LiveServer) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(baton_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def _eventually(predicate: Callable[[], object], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit}s")
        await asyncio.sleep(0.02)


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """`await eventually(lambda: cond, limit=10)`: poll instead of sleeping a guessed time."""
    return _eventually
