"""Read CPU time and memory of processes from /proc, so the harness measures servers from outside.

Nothing here needs the measured process's cooperation: utime+stime and VmRSS are read the same
way for uvicorn, daphne, Postgres backends and Redis.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of all threads of ``pid`` in seconds, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces; fields after the closing paren are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (VmRSS) in bytes, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, to tell how saturated the 2 cores were."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return float(total - idle), float(total)


def find_pids(*, cmdline_contains: str | None = None, comm: str | None = None) -> list[int]:
    """Pids whose command line contains a string or whose comm equals a name.

    Used for processes the harness did not start itself (Postgres backends of the bench database,
    the machine's Redis), whose CPU is still part of what a delivered event costs.
    """
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if comm is not None and (entry / "comm").read_text().strip() == comm:
                pids.append(int(entry.name))
            elif cmdline_contains is not None:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if cmdline_contains in cmd:
                    pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


class CpuWindow:
    """CPU seconds of a set of pids between :meth:`start` and :meth:`stop`.

    A pid that exits within the window is dropped rather than counted as zero, since its
    last reading is unknowable.
    """

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._start: dict[int, float] = {}
        self._sys_start = (0.0, 0.0)

    def start(self) -> None:
        self._start = {}
        for group in self.pids.values():
            for pid in group:
                value = cpu_seconds(pid)
                if value is not None:
                    self._start[pid] = value
        self._sys_start = system_cpu()

    def stop(self) -> dict[str, object]:
        per_group: dict[str, list[float]] = {}
        for label, group in self.pids.items():
            deltas: list[float] = []
            for pid in group:
                end = cpu_seconds(pid)
                if end is not None and pid in self._start:
                    deltas.append(end - self._start[pid])
            per_group[label] = deltas
        busy0, total0 = self._sys_start
        busy1, total1 = system_cpu()
        machine = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        # /proc/stat sums all cores: a fraction of the whole machine, times nproc = cores busy.
        return {"cpu_s": per_group, "machine_busy_cores": machine * (os.cpu_count() or 1)}
