"""The servers under test, started as subprocesses on 127.0.0.1 and stopped by their own pid.

Every contender speaks Baton's frames; what differs is the stack behind them:

- ``a-uvicorn`` / ``a-daphne``: Baton embedded (SQLite + in-memory channel layer), one process.
- ``b``: Baton production: Postgres + Redis channel layer, 2 uvicorn processes on 2 ports.
- ``c``: a plain Channels consumer doing ``group_send`` per message, same uvicorn.
- ``d``: a raw ``websockets`` broadcast server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from project.server import uvicorn_args

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = "postgres://postgres@127.0.0.1:5432"
PG_DB = "baton_bench"
REDIS_URL = "redis://127.0.0.1:6379/9"


def probe_path(probe: Path, worker: int) -> Path:
    """Each worker process writes its own commit-probe counts."""
    return probe.with_name(f"{probe.stem}.{worker}.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


@dataclass
class Contender:
    """One stack under test and how to start it."""

    key: str
    label: str
    kind: str  # "baton" | "plain" | "raw"
    server: str  # "uvicorn" | "daphne" | "websockets"
    db: str | None = None  # "sqlite" | "postgres"
    workers: int = 1
    settings: str = "project.settings"
    loop: str = "uvloop"
    workdir: Path = field(default_factory=lambda: ROOT / "bench" / "results")
    token: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    starts: int = 0

    @property
    def baton(self) -> bool:
        return self.kind == "baton"

    @property
    def sqlite_path(self) -> Path:
        return self.workdir / f"{self.key}.sqlite3"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        }
        env.update({"PYTHONUNBUFFERED": "1", "DEBUG": "0", "LOG_LEVEL": "WARNING"})
        if self.kind == "plain":
            env["DJANGO_SETTINGS_MODULE"] = "bench.plainchannels.settings"
        if self.kind == "baton":
            env["DJANGO_SETTINGS_MODULE"] = self.settings
            env["SECRET_KEY"] = "baton-bench-secret-not-for-production-0123456789"
            if self.db == "postgres":
                env["DATABASE_URL"] = f"{PG_DSN}/{PG_DB}"
                env["REDIS_URL"] = REDIS_URL
                env["BATON_REDIS_PREFIX"] = "batonbench"
            else:
                env["DATABASE_URL"] = f"sqlite:///{self.sqlite_path}"
        return env

    def manage(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    def prepare(self) -> None:
        """Fresh database, migrations and an agent key, through the project's own commands."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind != "baton":
            return
        if self.db == "postgres":
            import psycopg
            import redis

            with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {PG_DB}")
            redis.Redis.from_url(REDIS_URL).flushdb()
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)
        self.manage("migrate", "--noinput")
        self.token = self.manage("create_agent_key", f"bench-{self.key}").strip().splitlines()[-1]
        # Keep the migrated database (with the agent key) as a template, so every workload
        # starts from the same empty state: leftovers of one (say 5,000 connection rows of a
        # stopped server, which the next server's reaper would spend seconds closing) must not
        # be billed to the next.
        if self.db == "postgres":
            import psycopg

            with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB}_tpl")
                conn.execute(f"CREATE DATABASE {PG_DB}_tpl TEMPLATE {PG_DB}")
        else:
            shutil.copyfile(self.sqlite_path, self.template_path)

    @property
    def template_path(self) -> Path:
        return self.workdir / f"{self.key}.template.sqlite3"

    def reset(self) -> None:
        """Back to the freshly migrated database (and an empty Redis db) before a workload."""
        if self.kind != "baton":
            return
        if self.db == "postgres":
            import psycopg
            import redis

            with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {PG_DB} TEMPLATE {PG_DB}_tpl")
            redis.Redis.from_url(REDIS_URL).flushdb()
        else:
            for suffix in ("-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(self.template_path, self.sqlite_path)

    def bulk_sessions(self, n: int) -> list[str]:
        """Create n sessions through the service layer in a separate process, for idle sockets.

        Under ASGI every REST request runs in a thread of its own, and with Postgres and a
        non-zero ``CONN_MAX_AGE`` each one leaves a connection behind until garbage collection:
        thousands of ``POST /sessions`` exhaust ``max_connections``. The idle workload measures
        sockets, not session creation, so it makes its sessions here instead.
        """
        if self.kind != "baton" or n <= 0:
            return []
        script = (
            "import json\n"
            "from django.db import transaction\n"
            "from sessions_app.identity import Author\n"
            "from sessions_app.services import create_session\n"
            "a = Author(kind='agent', id='bench', name='bench')\n"
            "with transaction.atomic():\n"
            f"    ids = [create_session(created_by=a, title='idle').id for _ in range({n})]\n"
            "print(json.dumps(ids))\n"
        )
        out = self.manage("shell", "-c", script)
        return list(json.loads(out.strip().splitlines()[-1]))

    def command(self, port: int, probe: Path | None = None) -> list[str]:
        py = sys.executable
        app = "bench.plainchannels.asgi:application" if self.kind == "plain" else None
        app = app or "project.asgi:application"
        if self.server == "websockets":
            return [py, "-m", "bench.wsbroadcast", "--port", str(port), "--loop", self.loop]
        if self.server == "daphne":
            return [py, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0", app]
        # Baton's own command line (the plain Channels contender runs on the same server).
        uv_args = uvicorn_args(
            host="127.0.0.1",
            port=port,
            app=app,
            options=[
                *("--loop", self.loop, "--ws-per-message-deflate", "false"),
                *("--timeout-graceful-shutdown", "2", "--no-access-log", "--log-level", "warning"),
            ],
        )
        if probe is not None:
            return [py, "-m", "bench.commit_probe", str(probe), "--", *uv_args]
        return [py, "-m", "uvicorn", *uv_args]

    def start(self, probe: Path | None = None) -> None:
        self.reset()
        self.starts += 1
        self.ports = [free_port() for _ in range(self.workers)]
        for i, port in enumerate(self.ports):
            log = (self.workdir / f"{self.key}.server{i}.log").open("ab")
            proc = subprocess.Popen(
                self.command(port, probe and probe_path(probe, i)),
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_port(port, proc)
        time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def target(self) -> dict[str, Any]:
        return {
            "ws": [f"ws://127.0.0.1:{p}" for p in self.ports],
            "http": [f"http://127.0.0.1:{p}" for p in self.ports],
            "baton": self.baton,
            "token": self.token,
        }

    def meter_spec(self) -> dict[str, Any]:
        """Which processes' CPU a delivered event is charged to."""
        spec: dict[str, Any] = {"server": self.pids}
        if self.db == "postgres":
            # A backend's title is "postgres: [cluster: ]user database client state" (Debian
            # sets cluster_name, e.g. "15/main"), so match on "user database " alone.
            spec["postgres"] = {"cmdline": f"postgres {PG_DB} "}
            spec["redis"] = {"comm": "redis-server"}
        return spec

    def cleanup(self) -> None:
        self.stop()
        if self.db == "postgres":
            import psycopg

            with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB}_tpl")


def all_contenders(workdir: Path, loop: str) -> dict[str, Contender]:
    items = [
        Contender("a-uvicorn", "Baton embedded (SQLite, uvicorn)", "baton", "uvicorn", "sqlite"),
        Contender("a-daphne", "Baton embedded (SQLite, daphne)", "baton", "daphne", "sqlite"),
        Contender(
            "b", "Baton production (Postgres+Redis, 2 uvicorn)", "baton", "uvicorn", "postgres", 2
        ),
        Contender(
            "a-keepconn",
            "Experiment: Baton embedded, persistent SQLite connection (uvicorn)",
            "baton",
            "uvicorn",
            "sqlite",
            settings="bench.keepconn_settings",
        ),
        Contender("c", "Plain Channels group_send (uvicorn)", "plain", "uvicorn"),
        Contender("d", "Raw websockets broadcast", "raw", "websockets"),
    ]
    for c in items:
        c.workdir = workdir
        c.loop = loop
    return {c.key: c for c in items}
