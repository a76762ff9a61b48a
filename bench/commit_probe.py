"""Run uvicorn with a write-transaction counter in every Django connection (persistence workload).

The count is taken where the transactions are made. SQLite: a ``set_trace_callback`` on each
connection sees every statement the engine runs, including the ``BEGIN IMMEDIATE`` and ``COMMIT``
that Django's ``atomic`` issues and those of the writer's loop lane (its connection is opened
through Django's ``connect``, so ``connection_created`` reaches this probe too). Postgres:
``pg_stat_database.xact_commit`` counts read-only transactions too (every autocommit SELECT of the
head check, the reaper, an attach), so the probe wraps each connection's statements and its commit
and counts only commits of transactions that wrote. Either way a write transaction is one ``COMMIT``
after a write or one INSERT/UPDATE/DELETE run outside a transaction (autocommit). The counts go to a
JSON file every 200 ms and at exit. This is harness code wrapped around the unmodified server; it
costs a Python call per statement, so it is used only for the persistence workload, never for
timing.

Usage: ``python -m bench.commit_probe OUT.json -- <uvicorn arguments>``
"""

from __future__ import annotations

import atexit
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

COUNTS = {"commits": 0, "autocommit_writes": 0, "begins": 0, "rollbacks": 0, "statements": 0}
_lock = threading.Lock()
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _tracer(raw: sqlite3.Connection) -> Callable[[str], None]:
    def trace(sql: str) -> None:
        head = sql.lstrip()[:8].upper()
        with _lock:
            COUNTS["statements"] += 1
            if head.startswith("COMMIT") or head.startswith("END"):
                COUNTS["commits"] += 1
            elif head.startswith("BEGIN"):
                COUNTS["begins"] += 1
            elif head.startswith("ROLLBACK") and "TO" not in sql.upper()[:20]:
                COUNTS["rollbacks"] += 1
            elif head.startswith(WRITES) and not raw.in_transaction:
                COUNTS["autocommit_writes"] += 1

    return trace


def _install(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor == "sqlite":
        raw = connection.connection
        raw.set_trace_callback(_tracer(raw))
    elif not getattr(connection, "_baton_probe", False):
        _install_postgres(connection)


def _install_postgres(connection: Any) -> None:
    """Count commits of transactions that wrote, and writes made in autocommit."""
    connection._baton_probe = True
    state = {"wrote": False}

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        head = sql.lstrip()[:8].upper()
        with _lock:
            COUNTS["statements"] += 1
            if head.startswith(WRITES):
                if connection.get_autocommit():
                    COUNTS["autocommit_writes"] += 1
                else:
                    state["wrote"] = True
        return execute(sql, params, many, context)

    commit, rollback = connection._commit, connection._rollback

    def counted_commit() -> Any:
        if state["wrote"]:
            with _lock:
                COUNTS["commits"] += 1
        state["wrote"] = False
        return commit()

    def counted_rollback() -> Any:
        state["wrote"] = False
        with _lock:
            COUNTS["rollbacks"] += 1
        return rollback()

    connection.execute_wrappers.append(wrapper)
    connection._commit = counted_commit
    connection._rollback = counted_rollback


def main() -> None:
    out = Path(sys.argv[1])
    rest = sys.argv[sys.argv.index("--") + 1 :]

    from django.db.backends.signals import connection_created

    connection_created.connect(_install)

    def dump() -> None:
        with _lock:
            data = dict(COUNTS)
        out.write_text(json.dumps(data))

    def loop() -> None:
        while True:
            dump()
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()
    atexit.register(dump)
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(args=rest, standalone_mode=False)
    dump()


if __name__ == "__main__":
    main()
