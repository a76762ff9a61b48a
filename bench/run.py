"""Run every contender through every workload in one go and write the report.

``python -m bench.run`` (full, ~15 min: docs/benchmarks.md + docs/bench-*.png) or
``python -m bench.run --quick`` (< 2 min: bench/results/quick.md). Each server is a subprocess;
the load comes from ``bench.loadgen`` in another subprocess; this process only orchestrates and
takes readings at the generator's sync points (RSS, commit counters), so neither its CPU nor the
generator's is billed to a server. Nothing here asserts timing: the exit status is non-zero only
if a contender fails to start or a workload crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.contenders import PG_DB, PG_DSN, ROOT, Contender, all_contenders, probe_path
from bench.procstat import cpu_seconds, rss_bytes


@dataclass
class Plan:
    """Sizes of one run. Quick keeps (a), (c), (d) and shrinks every dimension."""

    contenders: list[str]
    k: int
    steps: list[int]
    warmup_s: float
    window_s: float
    half_window_s: float | None  # None: take half-knee figures from the ramp
    resume_events: int
    resume_reps: int
    idle_stages: list[int]
    persist_sessions: int
    persist_window_s: float
    idle_per_session: int = 1
    # Separate half-knee runs (each on a freshly started server); the one with the median p99
    # is reported, with every run's p99 beside it: single runs at one load varied 20-60 ms.
    half_runs: int = 3
    profile: bool = True
    noisy_retries: int = 2
    ack_grace_s: float = 2.0
    idle_open_budget_s: float = 0.0  # 0: no limit
    idle_cpu_s: float = 3.0  # how long to read the server's CPU with only idle sockets
    rate: float = 50.0
    knee_max_p99_ms: float = 500.0
    knee_min_ratio: float = 0.9


FULL = Plan(
    contenders=["a-uvicorn", "a-daphne", "b", "c", "d", "a-keepconn"],
    k=10,
    steps=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192],
    warmup_s=1.5,
    window_s=4.0,
    half_window_s=8.0,
    resume_events=10_000,
    resume_reps=5,
    idle_stages=[20, 1000, 5000],
    persist_sessions=10,
    persist_window_s=15.0,
)
QUICK = Plan(
    contenders=["a-uvicorn", "c", "d"],
    k=5,
    steps=[1, 4, 16],
    warmup_s=0.5,
    window_s=1.5,
    half_window_s=None,
    resume_events=10_000,
    resume_reps=3,
    idle_stages=[20, 1000],
    persist_sessions=4,
    persist_window_s=2.0,
    idle_per_session=4,
    profile=False,
    noisy_retries=0,
    ack_grace_s=1.0,
    idle_open_budget_s=20.0,
    idle_cpu_s=1.0,
)

# Which workloads each contender gets; (c) and (d) keep nothing, so there is nothing to resume
# and no commit to count.
WORKLOADS = {
    "a-uvicorn": ["fanout", "half", "resume", "idle", "profile", "persist"],
    "a-daphne": ["fanout", "half", "resume", "idle"],
    "b": ["fanout", "half", "resume", "idle", "profile", "persist"],
    "a-keepconn": ["fanout", "half", "resume", "persist"],
    "c": ["fanout", "half", "idle"],
    "d": ["fanout", "half", "idle"],
}


# Daphne serves the same app as a-uvicorn: its 5k stage would add minutes for little news.
IDLE_STAGES = {"a-daphne": [20, 1000]}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_loadgen(
    cfg: dict[str, Any],
    logfile: Path,
    on_sync: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Run one generator process; answer its sync points; return its result lines."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
        path = f.name
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with logfile.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", path],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            for line in proc.stdout:
                if time.monotonic() > deadline:
                    raise TimeoutError("load generator overran its time budget")
                obj = json.loads(line)
                if obj.get("event") == "sync":
                    if on_sync is not None:
                        on_sync(obj)
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                else:
                    results.append(obj)
            rc = proc.wait(timeout=max(5.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    Path(path).unlink(missing_ok=True)
    if rc != 0:
        raise RuntimeError(f"load generator exited {rc}; see {logfile}")
    return results


class Bench:
    def __init__(self, plan: Plan, workdir: Path, loop: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.loop = loop
        self.contenders = all_contenders(workdir, loop)
        self.gen_log = workdir / "loadgen.log"

    def base_cfg(self, c: Contender) -> dict[str, Any]:
        return {
            **c.target(),
            "rate": self.plan.rate,
            "pids": c.meter_spec(),
            "noisy_retries": self.plan.noisy_retries,
            "ack_grace_s": self.plan.ack_grace_s,
        }

    def fanout(self, c: Contender, steps: list[int], window_s: float, stop: bool) -> list[dict]:
        cfg = {
            **self.base_cfg(c),
            "mode": "fanout",
            "k": self.plan.k,
            "steps": steps,
            "warmup_s": self.plan.warmup_s,
            "window_s": window_s,
            "knee_max_p99_ms": self.plan.knee_max_p99_ms,
            "knee_min_ratio": self.plan.knee_min_ratio,
            "stop_after_knee": stop,
        }
        return run_loadgen(cfg, self.gen_log)

    def resume(self, c: Contender) -> dict[str, Any]:
        cfg = {
            **self.base_cfg(c),
            "mode": "resume",
            "events": self.plan.resume_events,
            "reps": self.plan.resume_reps,
        }
        return run_loadgen(cfg, self.gen_log)[0]

    def idle(self, c: Contender) -> list[dict[str, Any]]:
        readings: list[dict[str, Any]] = []

        stages = IDLE_STAGES.get(c.key, self.plan.idle_stages)

        def on_sync(obj: dict[str, Any]) -> None:
            # CPU the server burns with only idle sockets (heartbeats, head checks).
            span = self.plan.idle_cpu_s
            cpu0 = [cpu_seconds(p) or 0.0 for p in c.pids]
            time.sleep(span)
            cpu1 = [cpu_seconds(p) or 0.0 for p in c.pids]
            idle_cores = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / span
            rss = [rss_bytes(p) or 0 for p in c.pids]
            readings.append(
                {
                    "n": obj["n"],
                    "planned": obj.get("planned", obj["n"]),
                    "alive": obj["alive"],
                    "rss": sum(rss),
                    "idle_cores": idle_cores,
                    "open_s": obj.get("open_s"),
                    "sessions_s": obj.get("sessions_s"),
                    "opened": obj.get("opened"),
                }
            )
            log(f"  idle {obj['n']} sockets ({obj['alive']} alive): RSS {sum(rss) / 2**20:.1f} MiB")
            if obj.get("planned", obj["n"]) >= stages[-1]:
                # Stop the server before the generator hangs up, so thousands of disconnect
                # handlers don't stretch the run; nothing is measured after this point.
                c.stop()

        t = time.monotonic()
        premade = c.bulk_sessions(-(-stages[-1] // self.plan.idle_per_session))
        if premade:
            dt = time.monotonic() - t
            log(f"  {len(premade)} sessions made through the service layer in {dt:.1f}s")
        cfg = {
            **self.base_cfg(c),
            "session_ids": premade,
            "mode": "idle",
            "stages": stages,
            "sockets_per_session": self.plan.idle_per_session,
            "open_budget_s": self.plan.idle_open_budget_s,
        }
        run_loadgen(cfg, self.gen_log, on_sync)
        return readings

    def persist(self, c: Contender) -> dict[str, Any]:
        """Stream tokens with K=1 and count DB transactions around exactly that window."""
        probe = self.workdir / f"{c.key}.commit-probe.json"
        readings: dict[str, Any] = {}

        def pg_counts() -> dict[str, int]:
            import psycopg

            # Read from the `postgres` database so this query is not counted in the bench one.
            with psycopg.connect(f"{PG_DSN}/postgres", autocommit=True) as conn:
                row = conn.execute(
                    "SELECT xact_commit, tup_inserted, tup_updated FROM pg_stat_database "
                    "WHERE datname = %s",
                    (PG_DB,),
                ).fetchone()
            assert row is not None
            return {"xact_commit": row[0], "tup_inserted": row[1], "tup_updated": row[2]}

        def on_sync(obj: dict[str, Any]) -> None:
            name = "before" if obj["name"] == "window_start" else "after"
            if name == "before" and c.db == "postgres":
                # Idle backends flush their stats within 10 s (PGSTAT_IDLE_INTERVAL):
                # wait so setup transactions land before the "before" reading.
                time.sleep(11)
            elif name == "before":
                time.sleep(0.5)
            else:
                c.stop()  # exiting backends flush their pending stats; the probes dump
                time.sleep(1.5 if c.db == "postgres" else 0.3)
            counts = probe_counts()
            if c.db == "postgres":
                counts.update({f"pg_{k}": v for k, v in pg_counts().items()})
            readings[name] = counts

        def probe_counts() -> dict[str, int]:
            total: dict[str, int] = {}
            for i in range(c.workers):
                for k, v in json.loads(probe_path(probe, i).read_text()).items():
                    total[k] = total.get(k, 0) + v
            return total

        c.start(probe=probe)
        cfg = {
            **self.base_cfg(c),
            "mode": "fanout",
            "k": 1,
            "steps": [self.plan.persist_sessions],
            "warmup_s": 1.0,
            "window_s": self.plan.persist_window_s,
            "sync": True,
        }
        try:
            (step,) = run_loadgen(cfg, self.gen_log, on_sync)
        finally:
            c.stop()
        before, after = readings["before"], readings["after"]
        delta = {k: after[k] - before[k] for k in before}
        published = step["published_per_s"] * step["window_s"]
        acks = step["acks_per_s"] * step["window_s"] + step.get("acks_after_window", 0)
        commits = delta["commits"] + delta["autocommit_writes"]
        how = "commit probe: commits of transactions that wrote + autocommit writes"
        return {
            "tokens_published": published,
            "tokens_acked": acks,
            "delta": delta,
            "commits": commits,
            "commits_per_token": commits / acks if acks else None,
            "tokens_per_commit": acks / commits if commits else None,
            "how": how,
            "errors": step["errors"],
        }

    def profile(self, c: Contender) -> dict[str, Any] | None:
        """py-spy on the server at a load it holds (S=1, K) for a few seconds."""
        from bench import profile

        seconds = 10
        c.start()
        try:
            raw = self.workdir / f"{c.key}.pyspy.txt"
            spy = profile.start(c.pids[0], seconds, raw)
            if spy is None:
                return None
            cfg = {
                **self.base_cfg(c),
                "mode": "fanout",
                "k": self.plan.k,
                "steps": [1],
                "warmup_s": 0.5,
                "window_s": seconds,
                "stop_after_knee": False,
            }
            (step,) = run_loadgen(cfg, self.gen_log)
            spy.wait(timeout=60)
        finally:
            c.stop()
        if not raw.exists():
            return None
        out = profile.summarize(raw, seconds)
        out["step"] = {k: step[k] for k in ("s", "k", "delivered_per_s", "lat_p99_ms")}
        return out

    def run_contender(self, c: Contender, results: dict[str, Any]) -> None:
        todo = WORKLOADS[c.key]
        res: dict[str, Any] = {"label": c.label, "key": c.key}
        results["contenders"][c.key] = res
        t = time.monotonic()
        c.prepare()
        if "fanout" in todo:
            c.start()
            try:
                res["steps"] = self.fanout(c, self.plan.steps, self.plan.window_s, True)
            finally:
                c.stop()
            knee = knee_step(res["steps"])
            res["knee"] = knee
            log(f"{c.key}: knee {knee and knee['s']} sessions")
            if "half" in todo and knee is None and res["steps"]:
                # Nothing held, not even the lowest load: report that step, marked as such.
                res["half"] = {**res["steps"][0], "from_ramp": True, "not_held": True}
            if "half" in todo and knee is not None:
                half_s = max(1, knee["s"] // 2)
                if self.plan.half_window_s is None:
                    res["half"] = min(res["steps"], key=lambda s: abs(s["s"] - half_s))
                    res["half"]["from_ramp"] = True
                else:
                    runs = []
                    for _ in range(max(1, self.plan.half_runs)):
                        c.start()
                        try:
                            runs += self.fanout(c, [half_s], self.plan.half_window_s, False)
                        finally:
                            c.stop()
                    res["half"] = median_run(runs)
        if "resume" in todo:
            c.start()
            try:
                res["resume"] = self.resume(c)
                log(f"{c.key}: resume median {res['resume']['median_ms']:.0f} ms")
            finally:
                c.stop()
        if "idle" in todo:
            c.start()
            try:
                res["idle"] = self.idle(c)
            finally:
                c.stop()
        if "profile" in todo and self.plan.profile:
            res["profile"] = self.profile(c)
        if "persist" in todo:
            res["persist"] = self.persist(c)
            log(f"{c.key}: {res['persist']['commits_per_token']} commits per token")
        res["elapsed_s"] = time.monotonic() - t

    def run(self, only: list[str] | None) -> dict[str, Any]:
        results: dict[str, Any] = {"meta": meta(self.plan, self.loop), "contenders": {}}
        failures: list[str] = []
        for key in only or self.plan.contenders:
            c = self.contenders[key]
            log(f"=== {key}: {c.label}")
            try:
                self.run_contender(c, results)
            except Exception as exc:
                failures.append(f"{key}: {exc}")
                results["contenders"].setdefault(key, {"label": c.label, "key": key})
                results["contenders"][key]["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                c.cleanup()
        results["failures"] = failures
        return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median p99 (the lower middle of an even count), carrying every run's
    figures in `runs`, in the order they ran."""
    ranked = sorted(runs, key=lambda r: r["lat_p99_ms"])
    chosen = ranked[(len(ranked) - 1) // 2]
    return {**chosen, "runs": [dict(r) for r in runs]}


def knee_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last step that still tracked the offered rate with a sane p99."""
    ok = [s for s in steps if s.get("within_knee")]
    return ok[-1] if ok else None


def meta(plan: Plan, loop: str) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for name in ["django", "channels", "channels-redis", "uvicorn", "daphne", "websockets"]:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "-"
    for name in ["uvloop"]:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "versions": versions,
        "loop": loop,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "commit": commit,
        "plan": plan.__dict__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="< 2 min smoke run for CI")
    parser.add_argument("--out", type=Path, help="report path (default depends on --quick)")
    parser.add_argument("--only", nargs="*", help="contender keys, e.g. a-uvicorn c d")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default=None)
    parser.add_argument("--results", type=Path, help="write raw results JSON here")
    parser.add_argument(
        "--nice", type=int, default=-10, help="niceness for the harness and its children (root)"
    )
    parser.add_argument(
        "--from-json", type=Path, help="skip measuring: render the report from a results file"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out or (ROOT / ("bench/results/quick.md" if args.quick else "docs/benchmarks.md"))
    workdir = ROOT / "bench" / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    loop = args.loop
    if loop is None:
        try:
            import uvloop  # noqa: F401

            loop = "uvloop"
        except ImportError:
            loop = "asyncio"
    if args.nice:
        # The machine is shared: a higher priority for the harness and everything it starts
        # (servers and generator inherit it) keeps neighbours' bursts out of the figures.
        # Postgres and Redis are the machine's services and keep their own priority.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            log(f"could not renice to {args.nice}: {exc}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from bench.report import write_report

    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        t0 = time.monotonic()
        results = Bench(plan, workdir, loop).run(args.only)
        results["meta"]["total_s"] = time.monotonic() - t0
        raw = args.results or workdir / ("quick.json" if args.quick else "full.json")
        raw.write_text(json.dumps(results, indent=1))
        log(f"raw results: {raw}")
    write_report(results, out)
    log(f"report: {out} ({results['meta'].get('total_s', 0):.0f} s)")
    if results.get("failures"):
        log("FAILED: " + "; ".join(results["failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
