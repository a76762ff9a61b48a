"""Tests of the harness itself: meters, knee rule, report rendering, and one tiny live run.

No timing is asserted: on a shared 2-core machine any threshold would be flaky. The live test
only checks that the generator drives a real server end to end and reports what it saw.
Run with ``python -m pytest bench``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bench.contenders import all_contenders
from bench.loadgen import Target, percentile, slots
from bench.procstat import CpuWindow, cpu_seconds, rss_bytes
from bench.report import idle_per_socket, write_report
from bench.run import knee_step, median_run, run_loadgen


def test_procstat_reads_this_process() -> None:
    assert (cpu_seconds(os.getpid()) or 0) > 0
    assert (rss_bytes(os.getpid()) or 0) > 1_000_000
    assert cpu_seconds(2**22 + 7) is None  # no such pid: None, not a crash
    window = CpuWindow({"me": [os.getpid()]})
    window.start()
    sum(i * i for i in range(200_000))
    out = window.stop()
    assert len(out["cpu_s"]["me"]) == 1  # type: ignore[index]


def test_percentile_and_knee_rule() -> None:
    assert percentile([], 0.5) is None
    assert percentile(list(range(101)), 0.99) == 99
    steps = [{"s": 1, "within_knee": True}, {"s": 2, "within_knee": True}, {"s": 4}]
    assert knee_step(steps) == steps[1]
    assert knee_step([{"s": 1, "within_knee": False}]) is None


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_agents_alternate_between_workers_for_every_k(k: int) -> None:
    target = Target(ws=["ws://w0", "ws://w1"], http=[], baton=True)

    def worker(slot: int) -> str:
        return target.ws_url("s", slot, "c").split("/ws/")[0]

    agents = [worker(slots(i, k)[0]) for i in range(4)]
    assert agents == ["ws://w0", "ws://w1", "ws://w0", "ws://w1"]
    for i in range(4):
        agent, subs = slots(i, k)
        assert len(subs) == k
        assert worker(subs[0]) != worker(agent)  # fan-out crosses the channel layer
        if k > 1:
            assert {worker(s) for s in subs} == {"ws://w0", "ws://w1"}


def test_idle_per_socket_uses_growth_over_baseline() -> None:
    readings = [{"n": 20, "rss": 100 * 1024}, {"n": 1020, "rss": 100 * 1024 + 1000 * 2048}]
    assert idle_per_socket(readings, 1020) == 2.0
    assert idle_per_socket(readings, 5000) is None


def _step(s: int, delivered: float, held: bool) -> dict[str, Any]:
    return {
        "s": s,
        "k": 10,
        "window_s": 4.0,
        "offered_deliveries_per_s": s * 500.0,
        "delivered_per_s": delivered,
        "frames_per_s": delivered,
        "lat_p50_ms": 1.0,
        "lat_p99_ms": 5.0,
        "lat_max_ms": 9.0,
        "errors": {},
        "closed_connections": 0,
        "server_cpu_s": {"server": [1.0]},
        "machine_busy_cores": 1.0,
        "generator_cpu_cores": 0.9,
        "within_knee": held,
    }


def _render(tmp_path: Path, contenders: dict[str, Any], **plan: Any) -> str:
    """The report of a made-up run with these contenders and plan fields."""
    results = {
        "meta": {
            "date": "d",
            "commit": "c",
            "cores": 2,
            "cpu": "x",
            "python": "3",
            "versions": {},
            "loop": "asyncio",
            "plan": {
                "k": 10,
                "rate": 50,
                "knee_min_ratio": 0.9,
                "knee_max_p99_ms": 500,
                "resume_events": 10,
                "persist_sessions": 1,
                "persist_window_s": 1,
                **plan,
            },
        },
        "contenders": contenders,
    }
    out = tmp_path / "report.md"
    write_report(results, out)
    return out.read_text()


def test_report_renders_tables_and_marks_generator_bound(tmp_path: Path) -> None:
    steps = [_step(1, 500, True), _step(2, 700, False)]
    text = _render(
        tmp_path,
        {
            "d": {"label": "D", "steps": steps, "knee": steps[0], "half": steps[0]},
            "c": {"label": "C", "error": "RuntimeError: boom"},
        },
        steps=[1, 2],
    )
    assert "## Summary" in text and "## Fan-out steps" in text
    assert "(G)" in text  # generator used 0.9 cores > 85%
    assert "failed: RuntimeError: boom" in text


@pytest.mark.timeout(120)
def test_generator_drives_raw_server(tmp_path: Path) -> None:
    contender = all_contenders(tmp_path, "asyncio")["d"]
    contender.prepare()
    contender.start()
    try:
        cfg = {
            **contender.target(),
            "mode": "fanout",
            "k": 2,
            "steps": [1],
            "warmup_s": 0.2,
            "window_s": 0.5,
            "pids": contender.meter_spec(),
        }
        (step,) = run_loadgen(cfg, tmp_path / "gen.log")
    finally:
        contender.stop()
    assert step["delivered_per_s"] > 0
    assert step["samples"] > 0
    assert step["errors"] == {}
    assert step["server_cpu_s"]["server"]


def test_half_knee_reports_the_run_with_the_median_p99_and_every_run(tmp_path: Path) -> None:
    runs = [_step(8, 4000, True), _step(8, 4000, True), _step(8, 4000, True)]
    for run, p99 in zip(runs, [61.0, 22.5, 38.25], strict=True):
        run["lat_p99_ms"] = p99
    half = median_run(runs)
    assert half["lat_p99_ms"] == 38.25
    assert [r["lat_p99_ms"] for r in half["runs"]] == [61.0, 22.5, 38.25]  # in run order
    assert median_run(runs[:2])["lat_p99_ms"] == 22.5  # even count: the lower middle
    steps = [_step(16, 8000, True)]
    text = _render(
        tmp_path,
        {"a-uvicorn": {"label": "A", "steps": steps, "knee": steps[0], "half": half}},
        steps=[16],
        half_window_s=8.0,
        half_runs=3,
    )
    assert "the median p99 of 3 runs: 61.0, 22.5, 38.2" in text
    assert "| A: p99 ≤ 50 ms at half the knee | 38.2 ms" in text
    assert "| 8 (half-knee run 3/3) |" in text
