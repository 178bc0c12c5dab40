"""Every benchmark with small defaults (``make bench``), then the goals side by side.

    python -m bench.run_all [--only floor,pipeline,pipeline_pinned,io_bound,listener,cost] [--orders N] [--events N] [--broker both|redis|rabbitmq]

Each benchmark runs in its own process (``python -m bench.<name>``), prints
its tables and writes its JSON under --out (default bench/results/); this
script then prints the goals against the measured numbers, once per broker (the
pipeline, I/O-bound and listener benchmarks run on Redis, then on RabbitMQ with a
quorum queue), and writes every table to ``summary.md`` there. ``pipeline_pinned`` is
the pipeline again with the worker kept on one CPU, the machine's last (``WORKER_CPUS``).
Bigger runs: ``--orders``, ``--events``, ``--chains``, or run one benchmark with its
own flags (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, Table, machine_line, pythonpath_env

BENCHMARKS = (
    "floor",
    "pipeline",
    "pipeline_pinned",
    "io_bound",
    "listener",
    "cost",
    "protection",
    "sandbox_throughput",
)
# The benchmarks whose numbers depend on the broker: run on Redis, then on RabbitMQ (quorum queue).
PER_BROKER = ("pipeline", "pipeline_pinned", "io_bound", "listener")
BROKERS = ("redis", "rabbitmq")
MODULES = {"listener": "bench.listener_catchup", "pipeline_pinned": "bench.pipeline"}
# A load average above this at the start means something else is running: the numbers will say so.
BUSY_LOAD = 0.5
# How long a child gets to clean up after Ctrl-C before it is killed.
CHILD_STOP_GRACE_S = 30.0

GOALS = {
    # Worker CPU per Order ÷ (the floor's CPU for as many tasks as a run sends + the steps in-process).
    "overhead_ratio": 1.15,
    "rate_share": 0.9,
    "breaker_calls_share": 0.05,
    "io_share": 0.8,
    "latency_ratio": 1.3,
    "listener_rate": 2000.0,
    "listener_cpu_ms": 0.4,
    "sf_calls": 2.0,
}


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt()


def result_name(name: str, broker: str) -> str:
    """The JSON result's name: ``pipeline``, or ``pipeline-rabbitmq`` for the run on RabbitMQ."""
    return name if broker == "redis" else f"{name}-{broker}"


def argv_for(name: str, args: argparse.Namespace, out: Path, broker: str = "redis") -> list[str]:
    module = MODULES.get(name, f"bench.{name}")
    argv = [sys.executable, "-m", module, "--json", str(out / f"{result_name(name, broker)}.json")]
    if name in PER_BROKER:
        argv += ["--broker", broker]
    if name != "sandbox_throughput":
        argv += ["--redis-url", args.redis_url]
    if name == "floor" and args.chains:
        argv += ["--chains", str(args.chains)]
    if name in ("pipeline", "pipeline_pinned", "io_bound") and args.orders:
        argv += ["--orders", str(args.orders)]
    if name == "pipeline_pinned":
        argv += ["--worker-cpus", str(pinned_cpu())]
    if name == "io_bound" and args.orders:
        argv += ["--rate-orders", str(args.orders)]
    if name == "cost" and args.orders:
        argv += ["--orders", str(max(1, args.orders // 4))]
    if name == "listener" and args.events:
        argv += ["--events", str(args.events)]
    return argv


def pinned_cpu() -> int:
    """The CPU ``pipeline_pinned`` keeps the worker on: the last this process may run on."""
    return max(os.sched_getaffinity(0))


def run(name: str, argv: list[str]) -> tuple[int, float]:
    print(f"\n===== {name}: {' '.join(argv[1:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env={**os.environ, **pythonpath_env()})
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # The child got the Ctrl-C too and is cleaning up its processes: give it the time to.
        try:
            proc.wait(CHILD_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return code, time.monotonic() - start


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def goals_table(out: Path, broker: str = "redis") -> Table:
    table = Table(f"Goals, broker {broker}", ["goal", "measured", "target", "met"])

    def add(goal: str, measured: float | None, target: str, ok: bool | None, unit: str = "") -> None:
        value = "n/a" if measured is None else f"{measured:,.2f}{unit}"
        table.add(goal, value, target, "n/a" if ok is None else ("yes" if ok else "NO"))

    def load_for(name: str) -> dict[str, Any] | None:
        return load(out, result_name(name, broker) if name in PER_BROKER else name)

    for name, where in (
        ("pipeline", "the worker on any CPU"),
        ("pipeline_pinned", "the worker kept on one CPU (WORKER_CPUS)"),
    ):
        pipeline = load_for(name)
        if pipeline is None:
            continue
        ratio = pipeline["data"].get("overhead_ratio")
        add(
            f"worker CPU per Order ÷ (floor CPU for its tasks + its steps in-process), {where}",
            ratio,
            f"≤ {GOALS['overhead_ratio']:g}x",
            None if ratio is None else ratio <= GOALS["overhead_ratio"],
            "x",
        )
        threaded = pipeline["data"].get("overhead_ratio_threaded")
        if threaded is not None:
            # Not the goal's term: the same ratio with the steps in-process in the worker's number of threads.
            add(
                f"the same, steps in-process in the worker's threads (not the goal's term), {where}",
                threaded,
                "(for comparison)",
                None,
                "x",
            )

    io = load_for("io_bound")
    share = None
    latency_ratio = None
    if io:
        for row in io["data"]["configs"]:
            if row["processes"] == 1 and row["pool"] == "threads" and row["concurrency"] == 20:
                share = row["share_of_limit"]
        if io["data"].get("open_loop"):
            latency_ratio = io["data"]["open_loop"]["p50_ratio_to_injected_before_activated"]
    add(
        "I/O bound, concurrency 20: share of the limit",
        None if share is None else 100 * share,
        f"≥ {100 * GOALS['io_share']:.0f}%",
        None if share is None else share >= GOALS["io_share"],
        "%",
    )
    add(
        "p50 latency at 10 orders/s ÷ injected latency",
        latency_ratio,
        f"≤ {GOALS['latency_ratio']:g}x",
        None if latency_ratio is None else latency_ratio <= GOALS["latency_ratio"],
        "x",
    )

    listener = load_for("listener")
    for transport in ("pubsub", "cometd"):
        row = listener["data"].get(transport) if listener else None
        rate = row["events_per_s_steady"] if row else None
        add(
            f"listener catch-up ({transport}), events/s",
            rate,
            f"≥ {GOALS['listener_rate']:,.0f}",
            None if rate is None else rate >= GOALS["listener_rate"],
        )
        cpu = row["cpu_us_per_event"] / 1000 if row else None
        add(
            f"listener CPU per event ({transport}), ms",
            cpu,
            f"≤ {GOALS['listener_cpu_ms']:g}",
            None if cpu is None else cpu <= GOALS["listener_cpu_ms"],
        )

    protection = load(out, "protection") if broker == "redis" else None
    rate = protection["data"].get("rate_limit") if protection else None
    add(
        "rate limit on the SM-DP+: achieved share of it",
        None if rate is None else 100 * rate["share_of_limit"],
        f"≥ {100 * GOALS['rate_share']:.0f}%",
        None if rate is None else rate["share_of_limit"] >= GOALS["rate_share"],
        "%",
    )
    add(
        "rate limit on the SM-DP+: seconds over it",
        None if rate is None else rate["seconds_over_limit"],
        "0",
        None if rate is None else rate["seconds_over_limit"] == 0,
    )
    outage = protection["data"].get("outage") if protection else None
    add(
        "WHMCS outage: calls with breakers ÷ without",
        None if outage is None else 100 * outage["calls_share"],
        f"≤ {100 * GOALS['breaker_calls_share']:.0f}%",
        None if outage is None else outage["calls_share"] <= GOALS["breaker_calls_share"],
        "%",
    )
    add(
        "WHMCS outage with breakers: runs failed",
        None if outage is None else outage["with"]["failed"],
        "0",
        None
        if outage is None
        else outage["with"]["failed"] == 0 and outage["with"]["done"] == outage["with"]["orders"],
    )

    cost = load_for("cost")
    calls = cost["data"]["salesforce_api_calls_per_run"] if cost else None
    add(
        "Salesforce API calls per successful run",
        calls,
        "exactly 2",
        None if calls is None else calls == GOALS["sf_calls"],
    )
    table.notes.append(
        "Latency ratio: p50 over Orders of (publication to Activated) ÷ (the injected latency of the calls "
        "before the Activated write: 800 ms eSIM, 600 ms physical)."
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--only", default="", help=f"Comma-separated subset of {', '.join(BENCHMARKS)}.")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="Where the JSON results and summary.md go."
    )
    parser.add_argument("--redis-url", default="private", help="Passed to each benchmark (see their --help).")
    parser.add_argument(
        "--orders", type=int, default=0, help="Orders per configuration (default: each script's)."
    )
    parser.add_argument("--events", type=int, default=0, help="Listener catch-up events (default 10,000).")
    parser.add_argument("--chains", type=int, default=0, help="Floor chains (default 200).")
    parser.add_argument(
        "--broker",
        choices=("both", *BROKERS),
        default="both",
        help="Broker of the pipeline, I/O-bound and listener benchmarks (both: Redis, then RabbitMQ).",
    )
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    brokers = BROKERS if args.broker == "both" else (args.broker,)
    plan = [(name, broker) for name in chosen for broker in (brokers if name in PER_BROKER else ("redis",))]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, broker in plan:
        (out / f"{result_name(name, broker)}.json").unlink(missing_ok=True)

    load1, _, _ = os.getloadavg()
    if load1 > BUSY_LOAD:
        print(
            f"note: the 1-minute load average is {load1:.1f}: other work on this machine will make the numbers noisy",
            file=sys.stderr,
        )
    # Ctrl-C reaches the children too (same process group); each stops what it started.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    timings: list[tuple[str, int, float]] = []
    try:
        for name, broker in plan:
            code, took = run(result_name(name, broker), argv_for(name, args, out, broker))
            timings.append((result_name(name, broker), code, took))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    tables: list[str] = []
    machine = None
    for name, broker in plan:
        result = load(out, result_name(name, broker))
        if result is None:
            continue
        machine = machine or result.get("machine")
        # The same benchmark on each broker: the title says which.
        suffix = f", broker {broker}" if name in PER_BROKER else ""
        for t in result.get("tables", []):
            tables.append(Table(t["title"] + suffix, t["columns"], t["rows"], t.get("notes", [])).render())
    goals = [goals_table(out, broker) for broker in brokers]
    runs = Table("Benchmark runs", ["benchmark", "exit code", "seconds"])
    for name, code, took in timings:
        runs.add(name, code, round(took, 1))
    runs.add("total", "", round(time.monotonic() - started, 1))

    print("\n===== summary")
    if machine:
        print(machine_line(machine))
    print()
    for table in goals:
        print(table.render())
        print()
    print(runs.render())
    summary = [machine_line(machine) if machine else "", *tables, *(g.render() for g in goals), runs.render()]
    (out / "summary.md").write_text("\n\n".join(summary) + "\n")
    print(f"\nall tables: {out / 'summary.md'}", flush=True)
    return 0 if all(code == 0 for _, code, _ in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
