"""The pipeline when every external call is slow: 100 ms injected on each simulator.

    python -m bench.io_bound [--orders 200] [--concurrency 20,50,100] [--processes 1,2,4]
                             [--rate 10] [--json PATH]

For each worker configuration: orders/s against the limit
``processes x concurrency / (injected latency per order)``, and the latency
from publishing a run to its Order's ``Activated`` write (the Salesforce
simulator records when each PATCH arrived). Batches queue every run at once
(their latency is mostly queueing); the open-loop row publishes at a fixed
rate (default 10 orders/s), which is the latency a user sees at that load.
"""

from __future__ import annotations

import os
from typing import Any

from bench.common import (
    BenchRedis,
    Broker,
    Cleanup,
    CpuMeter,
    Table,
    base_parser,
    emit,
    latency_summary,
    log,
    machine_info,
    percentile,
    run_main,
    workdir_for,
)
from bench.stack import CALLS_BEFORE_ACTIVATED, Batch, Stack


def run_config(
    stack: Stack,
    *,
    processes: int,
    pool: str,
    concurrency: int,
    orders: int,
    warmup: int,
    latency_ms: float,
    rate_per_s: float | None = None,
) -> dict[str, Any]:
    label = f"{processes}x{pool}:{concurrency}" + (f"@{rate_per_s:g}/s" if rate_per_s else "")
    settings = stack.settings("io")
    services = stack.services(settings)
    seeded = stack.seed(services, warmup + orders)
    procs = stack.start_workers(settings, count=processes, pool=pool, concurrency=concurrency)
    try:
        batch = Batch(stack, settings, services)
        batch.warm_up(seeded[:warmup])
        meter = CpuMeter({p.name: p.pid for p in procs}, stack.redis_server.client)
        result = batch.run(
            seeded[warmup:], meter=meter, rate_per_s=rate_per_s, latency=True, injected_latency_ms=latency_ms
        )
    finally:
        for p in procs:
            p.stop()
    # urllib3 drops connections beyond the pool size (provisioning.core.http.DEFAULT_POOL_SIZE per host): a new
    # TLS handshake each time, logged as a warning.
    discards = sum(p.log_text().count("Connection pool is full") for p in procs)
    calls = result.external_calls()
    injected_s = calls * latency_ms / 1000 / result.orders
    limit = processes * concurrency / injected_s
    worker_cpu = sum(v for k, v in result.cpu_s.items() if k not in ("driver", "redis"))
    total_cpu = sum(result.cpu_s.values())
    lat = latency_summary(result.latencies_s)
    by_kind = {k: percentile(v, 50) * 1000 for k, v in result.latencies_by_kind_s.items()}
    row: dict[str, Any] = {
        "label": label,
        "processes": processes,
        "pool": pool,
        "concurrency": concurrency,
        "rate_per_s": rate_per_s,
        "orders": result.orders,
        "elapsed_s": result.elapsed_s,
        "orders_per_s": result.orders_per_s,
        "injected_s_per_order": injected_s,
        "limit_orders_per_s": limit,
        "share_of_limit": result.orders_per_s / limit,
        "latency": lat,
        "p50_ms_by_sim": by_kind,
        "p50_ratio_to_injected_before_activated": percentile(result.latency_ratios, 50),
        "worker_cpu_ms_per_order": worker_cpu * 1000 / result.orders,
        "machine_cpu_share": total_cpu / result.elapsed_s / (os.cpu_count() or 1),
        "cpu_s": result.cpu_s,
        "states": result.states,
        "calls": result.calls,
        "pool_full_discards": discards,
    }
    log(
        f"{label}: {row['orders_per_s']:.1f} orders/s ({100 * row['share_of_limit']:.0f}% of {limit:.1f}), "
        f"p50 {lat['p50_ms']:.0f} ms, states {result.states}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--orders", type=int, default=200, help="Orders per configuration.")
    parser.add_argument(
        "--warmup", type=int, default=10, help="Orders per configuration before the clock starts."
    )
    parser.add_argument("--latency-ms", type=float, default=100.0, help="Injected on every external call.")
    parser.add_argument("--concurrency", default="20,50,100", help="Threads per worker, one process.")
    parser.add_argument(
        "--processes", default="1,2,4", help="Worker processes, each with --process-concurrency."
    )
    parser.add_argument("--process-concurrency", type=int, default=20)
    parser.add_argument(
        "--rate", type=float, default=10.0, help="Open-loop arrival rate (orders/s); 0 skips it."
    )
    parser.add_argument("--rate-orders", type=int, default=200, help="Orders published at --rate.")
    args = parser.parse_args(argv)
    if args.rate > 0 and args.rate_orders < 1:
        parser.error(
            f"--rate-orders {args.rate_orders}: give at least 1 Order, or --rate 0 to skip the open loop"
        )
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    process_counts = [int(c) for c in args.processes.split(",") if c]
    common = {"orders": args.orders, "warmup": args.warmup, "latency_ms": args.latency_ms}

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "io_bound", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup))
        stack.set_latency(args.latency_ms)

        rows: list[dict[str, Any]] = []
        done: dict[tuple[int, str, int], dict[str, Any]] = {}
        for c in concurrencies:
            done[(1, "threads", c)] = run_config(stack, processes=1, pool="threads", concurrency=c, **common)
        for n in process_counts:
            key = (n, "threads", args.process_concurrency)
            if key not in done:
                done[key] = run_config(
                    stack, processes=n, pool="threads", concurrency=args.process_concurrency, **common
                )
        rows = list(done.values())
        open_loop = None
        if args.rate > 0:
            open_loop = run_config(
                stack,
                processes=1,
                pool="threads",
                concurrency=args.process_concurrency,
                orders=args.rate_orders,
                warmup=args.warmup,
                latency_ms=args.latency_ms,
                rate_per_s=args.rate,
            )

        def add(table: Table, row: dict[str, Any]) -> None:
            lat = row["latency"]
            table.add(
                row["processes"],
                row["pool"],
                row["concurrency"],
                row["orders"],
                row["orders_per_s"],
                row["limit_orders_per_s"],
                f"{100 * row['share_of_limit']:.0f}%",
                lat["p50_ms"],
                lat["p95_ms"],
                lat["p99_ms"],
                row["worker_cpu_ms_per_order"],
                f"{100 * row['machine_cpu_share']:.0f}%",
                row["pool_full_discards"],
            )

        columns = [
            "processes",
            "pool",
            "concurrency",
            "orders",
            "orders/s",
            "limit orders/s",
            "share of limit",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "worker CPU ms/order",
            "machine CPU busy",
            "HTTP pool-full discards",
        ]
        injected = rows[0]["injected_s_per_order"] * 1000 if rows else float("nan")
        sweep = Table(
            f"Pipeline, I/O bound: {args.latency_ms:g} ms on every external call, one worker process",
            columns,
            notes=[
                f"Injected latency per order: {injected:.0f} ms on average (9 calls for an eSIM Order, 7 for a "
                "physical one, 60% eSIM); limit = processes x concurrency / that.",
                "Latency: publication of the run to the Order's Activated write; every run is queued at once, so "
                "it is mostly time in the queue.",
                "Machine CPU busy: worker(s) + Redis + the benchmark process (which runs the simulators) over all cores.",
                "HTTP pool-full discards: urllib3 warnings 'Connection pool is full' in the worker logs (each one "
                "a connection thrown away; the next call opens a new TLS connection).",
            ],
        )
        for c in concurrencies:
            add(sweep, done[(1, "threads", c)])
        scaling = Table(
            f"Pipeline, I/O bound: horizontal scaling ({args.process_concurrency} threads per process)",
            columns,
        )
        for n in process_counts:
            add(scaling, done[(n, "threads", args.process_concurrency)])
        tables = [t for t in (sweep, scaling) if t.rows]
        if open_loop is not None:
            lat = open_loop["latency"]
            by_sim = open_loop["p50_ms_by_sim"]
            ol = Table(
                f"Latency at {args.rate:g} orders/s (open loop, 1 process x {args.process_concurrency} threads)",
                [
                    "orders",
                    "achieved orders/s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "p50 eSIM ms (800 injected)",
                    "p50 physical ms (600 injected)",
                    "p50 of latency ÷ injected before Activated",
                    "p50 ÷ injected per whole run",
                ],
                notes=[
                    f"Injected before Activated: {CALLS_BEFORE_ACTIVATED[True]} calls for eSIM, "
                    f"{CALLS_BEFORE_ACTIVATED[False]} for physical (the e-mail comes after the Order's write).",
                ],
            )
            ol.add(
                open_loop["orders"],
                open_loop["orders_per_s"],
                lat["p50_ms"],
                lat["p95_ms"],
                lat["p99_ms"],
                by_sim.get("esim", float("nan")),
                by_sim.get("physical", float("nan")),
                open_loop["p50_ratio_to_injected_before_activated"],
                lat["p50_ms"] / (open_loop["injected_s_per_order"] * 1000),
            )
            tables.append(ol)
        emit("io_bound", args, info, tables, {"configs": rows, "open_loop": open_loop})
    return 0


if __name__ == "__main__":
    run_main(main)
