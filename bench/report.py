"""Turn a results dict into a Markdown report and PNG plots (matplotlib, optional).

Every number printed comes from the results file; where a workload did not run the cell says
so instead of guessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GEN_BOUND = 0.85
TARGETS = {
    "ratio_c": 10.0,
    "ratio_d": 0.5,
    "p99_ms": 50.0,
    "resume_ms": 250.0,
    "commits_per_token": 1 / 20,
    "rss_kib": 30.0,
}


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def server_cpu(step: dict[str, Any], group: str = "server") -> float:
    return sum(step["server_cpu_s"].get(group, []))


def us_per_event(step: dict[str, Any], group: str = "server") -> float | None:
    delivered = step["delivered_per_s"] * step["window_s"]
    if not delivered:
        return None
    return server_cpu(step, group) / delivered * 1e6


def other_cores(step: dict[str, Any]) -> float:
    """Machine CPU not spent by metered processes or the generator: kernel softirq for loopback
    traffic, and anything else running on the shared machine at the time."""
    metered = sum(sum(v) for v in step["server_cpu_s"].values()) / step["window_s"]
    return step["machine_busy_cores"] - metered - step["generator_cpu_cores"]


def held(step: dict[str, Any]) -> str:
    text = "yes" if step.get("within_knee") else "no"
    tries = len(step.get("attempts", [])) or 1
    return text + (f" (attempt {tries})" if tries > 1 else "")


def half_runs_note(half: dict[str, Any]) -> str:
    """'; the median p99 of 3 runs: a, b, c' when the half-knee run is one of several."""
    runs = half.get("runs") or []
    if len(runs) < 2:
        return ""
    p99s = ", ".join(fmt(r["lat_p99_ms"], 1) for r in runs)
    return f"; the median p99 of {len(runs)} runs: {p99s}"


def gen_flag(step: dict[str, Any] | None) -> str:
    if step and step.get("generator_cpu_cores", 0) > GEN_BOUND:
        return " (G)"
    return ""


def cpu_cell(step: dict[str, Any] | None) -> str:
    """µs of server CPU per delivered event: per process, then Postgres/Redis if metered."""
    if not step:
        return "n/a"
    delivered = step["delivered_per_s"] * step["window_s"]
    if not delivered:
        return "n/a"
    procs = step["server_cpu_s"].get("server", [])
    per = [f"{c / delivered * 1e6:.1f}" for c in procs]
    text = " + ".join(per)
    if len(per) > 1:
        text += f" = {sum(procs) / delivered * 1e6:.1f}"
    extra = []
    for group in ("postgres", "redis"):
        if group in step["server_cpu_s"]:
            extra.append(f"{group} {server_cpu(step, group) / delivered * 1e6:.1f}")
    if extra:
        text += " (+ " + ", ".join(extra) + ")"
    return text


def idle_per_socket(readings: list[dict[str, Any]], n: int) -> float | None:
    """KiB of server RSS per idle socket between the warm baseline and the n-socket stage.

    A stage cut short by the quick mode's time budget counts as its planned size's stage (the
    sockets really open are in ``n``), so the ≤ 1k figure still appears.
    """
    if not readings:
        return None
    base = readings[0]
    for r in readings[1:]:
        if r.get("planned", r["n"]) == n and r["n"] > base["n"]:
            return (r["rss"] - base["rss"]) / (r["n"] - base["n"]) / 1024
    return None


def pass_miss(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**miss**")


def plots(results: dict[str, Any], out_dir: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[str] = []
    series = [(c["label"], c["steps"]) for c in results["contenders"].values() if c.get("steps")]
    if not series:
        return []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for label, steps in series:
        xs = [s["offered_deliveries_per_s"] for s in steps]
        ys = [s["delivered_per_s"] for s in steps]
        top = max(top, *xs)
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([100, top], [100, top], ls=":", color="grey", label="offered = delivered")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered deliveries/s (S sessions x K subscribers x 50 tokens/s)")
    ax.set_ylabel("delivered events/s")
    ax.set_title("Fan-out throughput against load")
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    name = f"{prefix}throughput.png"
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    made.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, steps) in enumerate(series):
        color = f"C{i}"
        xs = [s["offered_deliveries_per_s"] for s in steps if s["lat_p99_ms"] is not None]
        p99 = [s["lat_p99_ms"] for s in steps if s["lat_p99_ms"] is not None]
        p50 = [s["lat_p50_ms"] for s in steps if s["lat_p50_ms"] is not None]
        ax.plot(xs, p99, marker="o", color=color, label=f"{label} p99")
        ax.plot(xs, p50, marker=".", ls="--", color=color, label=f"{label} p50")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("offered deliveries/s")
    ax.set_ylabel("publish -> deliver latency (ms)")
    ax.set_title("Latency against load (open loop)")
    ax.legend(fontsize=5.5, ncol=2, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    name = f"{prefix}latency.png"
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    made.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, steps in series:
        pts = [(s["offered_deliveries_per_s"], us_per_event(s)) for s in steps]
        pts = [(x, y) for x, y in pts if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("offered deliveries/s")
    ax.set_ylabel("server CPU µs per delivered event (all server processes)")
    ax.set_title("CPU cost per delivered event")
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    name = f"{prefix}cpu.png"
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    made.append(name)
    return made


def write_report(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = "bench-" if out.name == "benchmarks.md" else f"{out.stem}-"
    images = plots(results, out.parent, prefix)
    meta = results["meta"]
    plan = meta["plan"]
    cs = results["contenders"]
    lines: list[str] = []
    add = lines.append
    add("# Baton benchmarks")
    add("")
    add(
        f"Measured {meta['date']} by `python -m bench.run{' --quick' if plan['k'] < 10 else ''}` "
        f"at commit `{meta['commit']}` on {meta['cores']} cores ({meta['cpu']}), Python "
        f"{meta['python']}, event loop `{meta['loop']}` for every uvicorn and the raw server. "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". Total run time {meta.get('total_s', 0):.0f} s."
    )
    add("")
    add(
        "Everything runs on the same 2-core machine at once: the servers, Postgres and Redis "
        "for (b), and the load generator (one process, uvloop; agents use the `websockets` "
        "client, subscribers are read through its sans-I/O protocol in the socket's data "
        "callback, where each token's latency is taken). Whatever the generator spends is "
        f"taken from the server (the harness runs at niceness {meta.get('nice', 0)}, its "
        "children inherit it, to keep other programs on the shared machine from distorting the "
        "figures), so a figure whose generator used more than "
        f"{GEN_BOUND:.0%} of a core is marked **(G)** (generator-bound): the server may have "
        "more headroom than shown. All traffic is on 127.0.0.1; WebSocket compression is off."
    )
    add("")
    add("Contenders (each a subprocess started by the harness, every one on 127.0.0.1):")
    add("")
    add(
        "- **a** Baton embedded: `python -m uvicorn project.asgi:application --ws "
        "websockets-sansio` (Baton's command line, `project/server.py`; and `daphne` for "
        "the same app), SQLite file + `InMemoryChannelLayer`, one process. Agents and "
        "subscribers authenticate with an agent key (`create_agent_key`), subscribers with "
        "their own `client_id`."
    )
    add(
        "- **b** Baton production: Postgres (`DATABASE_URL`, a fresh `baton_bench` database) + "
        "Redis (`REDIS_URL`, db 9) channel layer, 2 uvicorn processes on 2 ports; each session's "
        "agent and subscribers are spread over both, so fan-out crosses Redis; a worker whose "
        "own publish rate is low hands its publishes to the committing worker (group commit "
        "across workers, `BATON_FORWARD_COMMITS`, on by default)."
    )
    add(
        "- **c** a plain Django Channels consumer (`bench/plainchannels/`): `group_send` per "
        "message, one channel-layer message and one JSON encode per subscriber, no persistence, "
        "same uvicorn command line."
    )
    add(
        "- **d** a raw `websockets` server (`bench/wsbroadcast.py`): one JSON encode per event "
        "and `websockets.broadcast`, no Django, no persistence: the Python ceiling."
    )
    if "a-keepconn" in cs:
        add(
            "- **a-keepconn** (experiment, not a contender): (a) with a bench-side settings "
            "module (`bench/keepconn_settings.py`) that changes only SQLite's `CONN_MAX_AGE` "
            "from 0 to persistent, to price the per-call connection churn the profile shows."
        )
    add("")
    add(
        "Reproduce: `make bench` (this file and `docs/bench-*.png`) or `make bench-quick` "
        "(a < 2 min smoke run into `bench/results/quick.md`); raw numbers land in "
        "`bench/results/*.json` and `python -m bench.run --from-json FILE --out FILE` re-renders."
    )
    add("")
    add("## Summary")
    add("")
    add(
        f"Fan-out: S sessions x K={plan['k']} subscribers, one agent per session streaming "
        f"{plan['rate']:.0f} tokens/s (`message.append`), S raised through {plan['steps']} until "
        f"delivered < {plan['knee_min_ratio']:.0%} of offered or p99 > "
        f"{plan['knee_max_p99_ms']:.0f} ms (the knee is the last step that held). Latency is "
        "publish→deliver from the token's *intended* send time, measured at half the knee"
        + (
            f" in {plan['half_runs']} separate runs (a fresh server each); the run with the "
            "median p99 is the one shown, every run's p99 beside it."
            if plan.get("half_window_s") and plan.get("half_runs", 1) > 1
            else "."
        )
    )
    add("")
    add(
        "| contender | knee (S) | delivered events/s at knee | best delivered/s | "
        "p50 / p99 at half knee (ms) | server CPU µs/event at half knee | gen. cores | "
        "resume 10k (ms, median) | RSS/idle socket 1k / 5k (KiB) | DB commits/token |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for c in cs.values():
        if "error" in c and not c.get("steps"):
            add(f"| {c['label']} | failed: {c['error']} | | | | | | | | |")
            continue
        knee = c.get("knee")
        first = (c.get("steps") or [None])[0]
        best = max(c.get("steps", []), key=lambda s: s["delivered_per_s"], default=None)
        half = c.get("half")
        res = c.get("resume")
        per = c.get("persist")
        idle = c.get("idle", [])
        add(
            "| "
            + " | ".join(
                [
                    c["label"],
                    str(knee["s"]) if knee else (f"< {first['s']} (none held)" if first else "n/a"),
                    (fmt(knee["delivered_per_s"]) + gen_flag(knee))
                    if knee
                    else (f"< {fmt(first['offered_deliveries_per_s'])}" if first else "n/a"),
                    (fmt(best["delivered_per_s"]) + f" (S={best['s']})" + gen_flag(best))
                    if best
                    else "n/a",
                    (
                        f"{fmt(half['lat_p50_ms'], 1)} / {fmt(half['lat_p99_ms'], 1)}"
                        f" (S={half['s']}{', not held' if half.get('not_held') else ''}"
                        f"{half_runs_note(half)})" + gen_flag(half)
                    )
                    if half
                    else "n/a",
                    cpu_cell(half),
                    fmt(half["generator_cpu_cores"], 2) if half else "n/a",
                    fmt(res["median_ms"]) if res else "n/a",
                    f"{fmt(idle_per_socket(idle, 1000), 1)} / "
                    f"{fmt(idle_per_socket(idle, 5000), 1)}",
                    fmt(per["commits_per_token"], 3) if per else "n/a",
                ]
            )
            + " |"
        )
    add("")
    if any(c.get("error") for c in cs.values()):
        add("Errors: " + "; ".join(f"{k}: {c['error']}" for k, c in cs.items() if c.get("error")))
        add("")

    # Ratios and targets.
    a = cs.get("a-uvicorn", {})
    ka = (a.get("knee") or {}).get("delivered_per_s")
    bound = ""
    if ka is None and a.get("steps"):
        # No step held: the knee lies below the lowest offered load, an upper bound.
        ka, bound = a["steps"][0]["offered_deliveries_per_s"], "< "
    kc = (cs.get("c", {}).get("knee") or {}).get("delivered_per_s")
    kd = (cs.get("d", {}).get("knee") or {}).get("delivered_per_s")
    ratio_c = ka / kc if ka and kc else None
    ratio_d = ka / kd if ka and kd else None
    add("## Targets (reported, not asserted)")
    add("")
    add("| target | measured | result |")
    add("|---|---|---|")
    add(
        f"| Baton embedded ≥ 10x plain Channels (c) events/s at the knee | "
        f"{bound}{fmt(ratio_c, 2)}x ({bound}{fmt(ka)} vs {fmt(kc)}) | "
        f"{pass_miss(None if ratio_c is None else ratio_c >= TARGETS['ratio_c'])} |"
    )
    add(
        f"| Baton embedded ≥ 0.5x raw websockets (d) | {bound}{fmt(ratio_d, 2)}x "
        f"({bound}{fmt(ka)} vs "
        f"{fmt(kd)}) | {pass_miss(None if ratio_d is None else ratio_d >= TARGETS['ratio_d'])} |"
    )
    for key in ("a-uvicorn", "b"):
        c = cs.get(key)
        if not c:
            continue
        half = c.get("half")
        p99 = half["lat_p99_ms"] if half else None
        where = " (lowest step; none held)" if half and half.get("not_held") else ""
        add(
            f"| {c['label']}: p99 ≤ 50 ms at half the knee | {fmt(p99, 1)} ms{where}"
            f"{half_runs_note(half) if half else ''} | "
            f"{pass_miss(None if p99 is None else p99 <= TARGETS['p99_ms'])} |"
        )
        res = c.get("resume")
        rm = res["median_ms"] if res else None
        add(
            f"| {c['label']}: resume of 10k events ≤ 250 ms | {fmt(rm)} ms | "
            f"{pass_miss(None if rm is None else rm <= TARGETS['resume_ms'])} |"
        )
        per = c.get("persist")
        cpt = per["commits_per_token"] if per else None
        add(
            f"| {c['label']}: ≤ 1 DB commit per 20 tokens | {fmt(cpt, 3)} commits/token | "
            f"{pass_miss(None if cpt is None else cpt <= TARGETS['commits_per_token'])} |"
        )
        for n in (1000, 5000):
            kib = idle_per_socket(c.get("idle", []), n)
            if kib is None:
                continue
            add(
                f"| {c['label']}: ≤ 30 KiB RSS per idle WebSocket ({n}) | {fmt(kib, 1)} KiB | "
                f"{pass_miss(kib <= TARGETS['rss_kib'])} |"
            )
    add("")
    if images:
        add("## Plots")
        add("")
        for name in images:
            add(f"![{name}]({name})")
        add("")

    add("## Fan-out steps")
    add("")
    add(
        "Per step: offered and delivered deliveries/s, latency percentiles over the measurement "
        "window, events per frame (coalescing), CPU of each metered process group as cores, "
        "µs of server CPU per delivered event, the generator's CPU, and the whole machine's busy "
        "cores. *Other procs* is machine CPU that none of the metered processes used: the "
        "kernel's loopback networking and whatever else ran on the shared machine then. A "
        "step that failed while other programs used more than 0.3 cores is measured again "
        f"(at most {plan.get('noisy_retries', 2)} more times) and the last attempt is shown."
    )
    for c in cs.values():
        steps = c.get("steps")
        if not steps:
            continue
        add("")
        add(f"### {c['label']}")
        add("")
        add(
            "| S | offered/s | delivered/s | p50 ms | p99 ms | max ms | events/frame | "
            "server cores | µs/event | gen cores | machine cores | other procs cores | "
            "errors/closes | held |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        rows = list(steps)
        half = c.get("half")
        if half and not half.get("from_ramp"):
            runs = half.get("runs") or [half]
            for i, run in enumerate(runs, 1):
                label = f" (half-knee run {i}/{len(runs)})" if len(runs) > 1 else " (half-knee run)"
                rows.append({**run, "_half": label})
        for s in rows:
            w = s["window_s"]
            groups = ", ".join(f"{g} {sum(v) / w:.2f}" for g, v in s["server_cpu_s"].items())
            epf = s["delivered_per_s"] / s["frames_per_s"] if s["frames_per_s"] else None
            errs = sum(s["errors"].values())
            add(
                f"| {s['s']}{s.get('_half', '')} "
                f"| {fmt(s['offered_deliveries_per_s'])} | {fmt(s['delivered_per_s'])} "
                f"| {fmt(s['lat_p50_ms'], 1)} | {fmt(s['lat_p99_ms'], 1)} "
                f"| {fmt(s['lat_max_ms'], 0)} | {fmt(epf, 2)} | {groups} "
                f"| {cpu_cell(s)} | {fmt(s['generator_cpu_cores'], 2)}{gen_flag(s)} "
                f"| {fmt(s['machine_busy_cores'], 2)} | {fmt(other_cores(s), 2)} "
                f"| {errs}/{s['closed_connections']} "
                f"| {held(s)} |"
            )
    add("")

    add("## Resume catch-up")
    add("")
    add(
        f"A session holds {plan['resume_events']:,} events (one streaming message: a create and "
        "its appends, stored through the REST batch API). A fresh client connects and attaches "
        "with `after: 0`; the time runs from the TCP connect to the `attached` frame, all history "
        "frames received. (c) and (d) store nothing, so they have nothing to resume."
    )
    add("")
    add("| contender | runs (ms) | median ms | events received | `replayed` |")
    add("|---|---|---|---|---|")
    for c in cs.values():
        res = c.get("resume")
        if res:
            add(
                f"| {c['label']} | {', '.join(f'{t:.0f}' for t in res['times_ms'])} | "
                f"{res['median_ms']:.0f} | {res['received'][0]} | {res['replayed'][0]} |"
            )
    add("")

    add("## Idle connections")
    add("")
    add(
        f"Each session gets {plan.get('idle_per_session', 1)} idle attached socket(s) "
        "(1 is the worst case for per-session state). "
        "RSS is the sum of VmRSS of the server processes, read after the sockets settled; the "
        "per-socket figure is the growth from a warm baseline (20 sockets open) divided by the "
        "sockets added. Postgres/Redis memory for (b) is not included. Baton's sessions for "
        "this workload are made beforehand through `services.create_session` in a "
        "`manage.py shell` process (not through REST, see the analysis); the sockets attach "
        "over the WebSocket protocol as everywhere else."
    )
    add("")
    add(
        "| contender | sockets | alive | server RSS MiB | KiB per socket over baseline | "
        "server CPU while idle (cores) | time to open the stage (s; creating sessions) |"
    )
    add("|---|---|---|---|---|---|---|")
    for c in cs.values():
        for r in c.get("idle", []):
            opened = (
                f"{fmt(r.get('open_s'), 1)} ({fmt(r.get('sessions_s'), 1)})"
                if r.get("open_s") is not None
                else "n/a"
            )
            add(
                f"| {c['label']} | {r['n']} | {r['alive']} | {r['rss'] / 2**20:.1f} | "
                f"{fmt(idle_per_socket(c['idle'], r['n']), 1)} | {fmt(r.get('idle_cores'), 2)} "
                f"| {opened} |"
            )
    add("")

    add("## Persistence: DB commits per token")
    add("")
    add(
        f"{plan['persist_sessions']} sessions x 1 subscriber stream 50 tokens/s each for "
        f"{plan['persist_window_s']:.0f} s; the counters are read right before the window and "
        "after it (the agents stop at the window's end, acks get "
        f"{plan.get('ack_grace_s', 2.0):.0f} s to arrive, then the server "
        "is stopped before the last reading). `bench/commit_probe.py` around the unmodified "
        "server counts write transactions in every worker: commits of transactions that wrote "
        "plus writes made in autocommit (SQLite: a trace callback sees the engine's `COMMIT`s; "
        "Postgres: a wrapper on each connection's statements and commit). Heartbeats, the "
        "reaper and presence during the window count too. For Postgres the detail column also "
        "gives `pg_stat_database.xact_commit` (`pg_xact_commit`, every transaction, read-only "
        "autocommit SELECTs included), read from another database after an 11 s pause so "
        "setup transactions are flushed to the statistics."
    )
    add("")
    add("| contender | tokens acked | transactions | commits/token | tokens/commit | detail |")
    add("|---|---|---|---|---|---|")
    for c in cs.values():
        per = c.get("persist")
        if per:
            detail = ", ".join(f"{k} {v}" for k, v in per["delta"].items())
            add(
                f"| {c['label']} | {per['tokens_acked']:.0f} | {per['commits']} | "
                f"{fmt(per['commits_per_token'], 3)} | {fmt(per['tokens_per_commit'], 2)} | "
                f"{detail} |"
            )
    add("")
    profiled = [c for c in cs.values() if c.get("profile")]
    if profiled:
        add("## Where Baton's time goes (py-spy)")
        add("")
        add(
            "A separate run (not timed) samples the first server process with `py-spy record "
            "--threads --nonblocking` at 100 Hz while it serves S=1 session x K subscribers. "
            "*Busy* is the share of sampling ticks in which a thread was running (not idle); the "
            "table gives each function's inclusive share of all samples (thread-pool, asgiref "
            "and server-startup frames omitted)."
        )
        for c in profiled:
            p = c["profile"]
            busy = ", ".join(f"{k} {v:.0%}" for k, v in p["threads_busy"].items())
            st = p["step"]
            add("")
            add(
                f"### {c['label']}: {p['samples']} samples in {p['seconds']} s; busy: {busy}; "
                f"delivered {st['delivered_per_s']:.0f}/s, p99 {fmt(st['lat_p99_ms'], 1)} ms "
                "under the sampler"
            )
            add("")
            add("| share | function |")
            add("|---|---|")
            for share, name in p["top"]:
                add(f"| {share:.0%} | `{name}` |")
        add("")
    extra = results.get("notes")
    if extra:
        add("## Notes")
        add("")
        lines.extend(extra)
        add("")
    out.write_text("\n".join(lines) + "\n")
