"""CPU per publish of the group commit (`append_many`) on its own, the way the writer calls it.

Fan-out load as the writer sees it: each request one `message.append` token (the SDK sends a
client_ref with every publish; the no-ref variant is a raw WebSocket client). Runs on a scratch
SQLite database (or on `--database-url`, which must be a disposable database) and prints thread
CPU and wall time per request, i.e. what the DB worker thread spends per publish.

Usage: ``python -m bench.append_many_cpu [--loops N] [--reps N] [--database-url URL]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=100, help="batches per scenario")
    parser.add_argument("--reps", type=int, default=2, help="rounds of all scenarios")
    parser.add_argument("--database-url", help="a disposable database (default: scratch SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as scratch:
        os.environ["DATABASE_URL"] = (
            args.database_url or f"sqlite:///{Path(scratch) / 'db.sqlite3'}"
        )
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
        measure(loops=args.loops, reps=args.reps)


def measure(*, loops: int, reps: int) -> None:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from sessions_app.identity import Author
    from sessions_app.services import (
        AppendRequest,
        EventInput,
        append_events,
        append_many,
        create_session,
    )

    call_command("migrate", verbosity=0)
    agent = Author(kind="agent", id="bench-agent", name="bench-agent")
    refs = itertools.count()

    def sessions(n: int) -> list[str]:
        ids = []
        for _ in range(n):
            session = create_session(created_by=agent, title="bench")
            create = EventInput("message.create", {"role": "assistant"}, message_id="m")
            append_events(session_id=session.id, author=agent, events=[create])
            ids.append(session.id)
        return ids

    def batch(ids: list[str], per_session: int, with_refs: bool) -> list[AppendRequest]:
        return [
            AppendRequest(
                session_id,
                agent,
                [
                    EventInput(
                        "message.append",
                        {"delta": "tok "},
                        message_id="m",
                        client_ref=f"r{next(refs)}" if with_refs else None,
                    )
                ],
            )
            for _ in range(per_session)
            for session_id in ids
        ]

    def run(label: str, ids: list[str], per_session: int, with_refs: bool, loops: int) -> None:
        for _ in range(5):
            append_many(batch(ids, per_session, with_refs))
        count, cpu, wall = 0, 0.0, 0.0
        for _ in range(loops):
            requests = batch(ids, per_session, with_refs)
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            outcomes = append_many(requests)
            cpu += time.thread_time() - cpu0
            wall += time.perf_counter() - wall0
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes
            count += len(requests)
        print(
            f"{label:34s} cpu {cpu / count * 1e6:7.1f} µs/req"
            f"  wall {wall / count * 1e6:7.1f} µs/req  ({count} requests)"
        )

    twenty, ten = sessions(20), sessions(10)
    for _ in range(reps):
        run("20 requests / 20 sessions, refs", twenty, 1, True, loops)
        run("20 requests / 20 sessions", twenty, 1, False, loops)
        run("50 requests / 10 sessions, refs", ten, 5, True, loops // 2)
        run("50 requests / 10 sessions", ten, 5, False, loops // 2)
    connection.close()


if __name__ == "__main__":
    main()
