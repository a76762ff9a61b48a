"""The chaos suite: real workers, a private Redis it may restart, faults injected mid-run.

Collected only in the Postgres + Redis pass (`DATABASE_URL=postgres…` and `REDIS_URL` set):
SQLite and the in-memory layer are the one-process default, where these faults cannot happen.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

PRODUCTION_PASS = os.environ.get("DATABASE_URL", "").startswith("postgres") and bool(
    os.environ.get("REDIS_URL")
)
collect_ignore_glob = [] if PRODUCTION_PASS else ["test_*.py"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway `redis-server` on a spare port, so a test can restart it freely."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # like a crash: no goodbye to the subscribers
            self.process.wait()
            self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path / "redis.log")
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def redis_cluster(
    make_cluster: Callable[..., list[ServerProcess]], private_redis: PrivateRedis
) -> Callable[..., list[ServerProcess]]:
    """Workers whose channel layer is the private Redis."""

    def factory(n: int = 2, **env: str) -> list[ServerProcess]:
        return make_cluster(
            n, REDIS_URL=private_redis.url, BATON_REDIS_PREFIX=f"chaos{uuid.uuid4().hex[:8]}", **env
        )

    return factory
