"""The one uvicorn command line Baton runs under: the demo, the cluster, the test servers and
the benchmarks all build it here, so what is tested and measured is what runs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

APP = "project.asgi:application"

# uvicorn's sans-I/O protocol on `websockets` rather than its default (the legacy `websockets`
# server): same wire behaviour (every real-server test passes on both), but less work per
# frame sent. Side runs of the fan-out benchmark, alternated on one machine: 0.65-0.68 against
# 0.79-0.82 server cores at S=32 (16k deliveries/s); p99 309 against 454 ms at S=96.
WS_PROTOCOL = "websockets-sansio"


def uvicorn_args(
    *,
    host: str,
    port: int,
    app: str = APP,
    ping_seconds: float | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """uvicorn's arguments (after `python -m uvicorn`); `ping_seconds` sets both the WebSocket
    ping interval and its timeout, so a dead peer is noticed within twice that."""
    args = [app, "--host", host, "--port", str(port), "--ws", WS_PROTOCOL, "--lifespan", "off"]
    if ping_seconds is not None:
        ping = f"{ping_seconds:g}"
        args += ["--ws-ping-interval", ping, "--ws-ping-timeout", ping]
    return [*args, *options]


def uvicorn_command(**args: Any) -> list[str]:
    """The full command line, run with this interpreter (arguments as for `uvicorn_args`)."""
    return [sys.executable, "-m", "uvicorn", *uvicorn_args(**args)]
