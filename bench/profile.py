"""Sample a server under load with py-spy and boil the samples down to a few lines of evidence.

Used for Baton only, in a run of its own (the sampler's own CPU must not pollute the timed
runs). py-spy is optional: without it this workload is skipped and the report says so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Frames that every stack shares and that say nothing about where the time goes.
BORING = (
    "threading.py",
    "runpy",
    "click/core.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "asyncio/runners.py",
    "concurrent/futures/thread.py",
    "asgiref/sync.py",
    "channels/db.py",
)


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            *(exe, "record", "-p", str(pid), "-d", str(seconds), "-r", "100", "-f", "raw"),
            *("--threads", "--nonblocking", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame_key(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)" with the package dir kept for context.
    if " (" not in frame:
        return frame
    func, where = frame.split(" (", 1)
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:])
    return f"{func} ({short})"


def summarize(raw: Path, seconds: float, rate: int = 100, top: int = 22) -> dict[str, Any]:
    """Inclusive share of samples per function, and how busy each thread was."""
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0]
        threads["event loop thread" if "MainThread" in thread else "worker threads"] += n
        seen: set[str] = set()
        for frame in frames[1:]:
            if any(b in frame for b in BORING):
                continue
            key = _frame_key(frame)
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    ticks = seconds * rate
    return {
        "samples": total,
        "seconds": seconds,
        "threads_busy": {k: v / ticks for k, v in threads.items()},
        "top": [(v / total, k) for k, v in inclusive.most_common(top)] if total else [],
    }
