"""`make run-cluster`: production mode — N uvicorn workers on Postgres + Redis, supervised.

Each worker is its own process on its own port (8001, 8002, …) so a load balancer (or a test)
can address them one by one; they share nothing but the database and the Redis channel layer.
A worker that dies is restarted (with a growing pause if it keeps dying); the connections it
held are reaped by the survivors through the worker heartbeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from project.server import uvicorn_command

RESTART_PAUSE_MAX = 10.0


def ensure_postgres_database() -> bool:
    """Create the configured Postgres database if it is missing; True if it was created."""
    import psycopg
    from psycopg import sql

    db = settings.DATABASES["default"]
    params = {
        "host": db.get("HOST") or "127.0.0.1",
        "port": db.get("PORT") or 5432,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**{k: v for k, v in params.items() if v is not None}) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
        if exists.fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
        return True


class Command(BaseCommand):
    help = "Migrate, then run and supervise N uvicorn workers (ports PORT, PORT+1, …)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "2")))
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8001, help="port of the first worker")
        parser.add_argument(
            "--allow-embedded",
            action="store_true",
            help="run even without Postgres + Redis (cross-worker fan-out then only polls)",
        )
        parser.add_argument("--no-migrate", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        workers: int = options["workers"]
        if workers < 1:
            raise CommandError("--workers must be at least 1.")
        postgres = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
        if not options["allow_embedded"] and not (postgres and settings.REDIS_URL):
            raise CommandError(
                "run_cluster needs DATABASE_URL=postgres://… and REDIS_URL=redis://… "
                "(`make run-cluster` sets this machine's defaults)."
            )
        if postgres and ensure_postgres_database():
            self.stdout.write(f"created database {settings.DATABASES['default']['NAME']}")
        if not options["no_migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        connections.close_all()  # the workers open their own

        ports = [options["port"] + i for i in range(workers)]
        supervisor = Supervisor(host=options["host"], ports=ports, stdout=self.stdout)
        signal.signal(signal.SIGTERM, supervisor.request_stop)
        signal.signal(signal.SIGINT, supervisor.request_stop)
        supervisor.run()


class Supervisor:
    """Start one uvicorn per port, restart the ones that die, stop them all on SIGTERM/SIGINT."""

    def __init__(self, *, host: str, ports: list[int], stdout: Any) -> None:
        self.host = host
        self.ports = ports
        self.stdout = stdout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.failures: dict[int, int] = dict.fromkeys(ports, 0)
        self.restart_at: dict[int, float] = {}
        self.stopping = False

    def command(self, port: int) -> list[str]:
        return uvicorn_command(
            host=self.host,
            port=port,
            ping_seconds=float(os.environ.get("BATON_WS_PING_SECONDS", "20")),
            options=["--no-access-log"],
        )

    def start(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(self.command(port), cwd=settings.BASE_DIR)
        self.stdout.write(f"worker :{port} started (pid {self.procs[port].pid})")

    def request_stop(self, signum: int, _frame: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        for port in self.ports:
            self.start(port)
        self.stdout.write(
            "Baton cluster: "
            + ", ".join(f"http://{self.host}:{p}" for p in self.ports)
            + " — Ctrl+C stops it"
        )
        while not self.stopping:
            now = time.monotonic()
            for port, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    if now - self.restart_at.get(port, now) > 60:
                        self.failures[port] = 0  # up for a minute: forget earlier crashes
                    continue
                del self.procs[port]
                self.failures[port] += 1
                pause = min(RESTART_PAUSE_MAX, 0.5 * 2 ** (self.failures[port] - 1))
                self.stdout.write(f"worker :{port} exited with {code}; restarting in {pause:.1f}s")
                self.restart_at[port] = now + pause
            for port, at in list(self.restart_at.items()):
                if port not in self.procs and now >= at and not self.stopping:
                    self.start(port)
            time.sleep(0.2)
        self.stop_all()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.stdout.write("Baton cluster stopped")
