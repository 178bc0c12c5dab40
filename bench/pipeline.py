"""The pipeline with no injected latency: our full chain on real workers against the sandbox.

    python -m bench.pipeline [--orders 200] [--concurrency 8] [--worker-cpus 1] [--floor-json PATH] [--profile] [--json PATH]

Orders/s and worker CPU per order, against what it cannot go below in one round:
the Celery floor (``bench.floor``'s no-op tasks, as many per Order as a run sends)
plus the steps' own CPU in-process (the same kind of Orders' steps run one after
the other by ``bench.inprocess``, a process of its own with no Celery at all, in one
thread; and again in as many threads as the worker has). Their ratio is the overhead
of our task layer (the goal: 1.15 at most, against the one-thread term).
``--worker-cpus`` keeps the worker, the floor's worker and the steps in-process on
those CPUs (``WORKER_CPUS``, as docs/operations.md advises for a threads worker).
Runs are published with ``publish_run`` (what the listener does for each event) all
at once. ``--profile`` samples the
worker with py-spy during the measured batch.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    BenchRedis,
    Broker,
    Cleanup,
    CpuMeter,
    Table,
    base_parser,
    emit,
    log,
    machine_info,
    median,
    run_main,
    spread,
    workdir_for,
)
from bench.floor import TASKS_PER_CHAIN as TASKS_PER_FLOOR_CHAIN
from bench.floor import FloorRunner
from bench.inprocess import measure as inprocess_steps
from bench.profile import Profiler, summarise
from bench.stack import Batch, Stack
from provisioning.core.cpus import format_cpu_list, parse_cpu_list
from provisioning.runs.chain import CHAIN

TASKS = CHAIN.names
FLOOR_WARMUP = 20


def cpu_list(text: str) -> str:
    """--worker-cpus' value, checked and written as the kernel writes it."""
    try:
        return format_cpu_list(parse_cpu_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def floor_row(path: str | None, pool: str, concurrency: int) -> dict[str, Any] | None:
    """The floor's result for the same worker options, from bench.floor's JSON."""
    if not path or not Path(path).exists():
        return None
    configs = json.loads(Path(path).read_text())["data"]["configs"]
    for row in configs:
        if row["pool"] == pool and row["concurrency"] == concurrency:
            return dict(row)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--orders", type=int, default=200, help="Orders measured per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds (median).")
    parser.add_argument("--warmup", type=int, default=10, help="Orders run before the clock starts.")
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--worker-cpus",
        type=cpu_list,
        default=None,
        help="CPUs the worker, the floor's worker and the steps in-process run on (WORKER_CPUS: 0, 0,2, "
        "0-3); default: wherever the scheduler puts them.",
    )
    parser.add_argument(
        "--floor-chains",
        type=int,
        default=200,
        help="Floor chains measured in each round, interleaved with the pipeline (same worker options), "
        "for the ratios; 0: take the floor from --floor-json instead.",
    )
    parser.add_argument("--floor-json", help="bench.floor's JSON, for the ratios when --floor-chains is 0.")
    parser.add_argument(
        "--profile", action="store_true", help="Sample the worker with py-spy (if installed)."
    )
    parser.add_argument(
        "--profile-flags",
        default="--gil",
        help="py-spy record flags (default --gil: samples that hold the GIL, i.e. Python CPU; '' for all running).",
    )
    args = parser.parse_args(argv)

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "pipeline", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup))
        settings = stack.settings("pipe", worker_cpus=args.worker_cpus)
        services = stack.services(settings)
        orders = stack.seed(services, args.warmup + args.rounds * args.orders)
        # The same number of Orders of the same kinds, for the steps run in-process each round: in one
        # thread, and (a threads pool) in as many threads as the worker has.
        inprocess_orders = stack.seed(services, args.rounds * args.orders)
        threaded = args.pool == "threads" and args.concurrency > 1
        threaded_orders = stack.seed(services, args.rounds * args.orders) if threaded else []
        (worker,) = stack.start_workers(settings, pool=args.pool, concurrency=args.concurrency)
        batch = Batch(stack, settings, services)
        batch.warm_up(orders[: args.warmup])
        floor_runner = None
        if args.floor_chains:
            floor_runner = FloorRunner(
                server,
                cleanup,
                workdir / "logs",
                pool=args.pool,
                concurrency=args.concurrency,
                broker=stack.broker,
                env={"WORKER_CPUS": args.worker_cpus} if args.worker_cpus else None,
            )
            floor_runner.warm_up(FLOOR_WARMUP)
        profiler = (
            Profiler(worker.pid, workdir / "worker-profile.txt", extra=args.profile_flags.split())
            if args.profile
            else None
        )
        if profiler is not None:
            profiler.start()
        results = []
        floor_rounds: list[tuple[float, dict[str, float]]] = []
        inprocess: list[tuple[float, float]] = []  # (CPU ms per Order, tasks per Order)
        inprocess_threaded: list[float] = []  # CPU ms per Order, in the worker's number of threads
        for round_no in range(args.rounds):
            if floor_runner is not None:
                # The floor right before each round: the machine is in the same state for both.
                floor_rounds.append(floor_runner.round(args.floor_chains))
            first = args.warmup + round_no * args.orders
            meter = CpuMeter({"worker": worker.pid}, server.client)
            result = batch.run(orders[first : first + args.orders], meter=meter)
            log(f"pipeline round {round_no + 1}: {result.orders_per_s:.1f} orders/s, states {result.states}")
            results.append(result)
            chunk = inprocess_orders[round_no * args.orders : (round_no + 1) * args.orders]
            inprocess.append(inprocess_steps(settings, [o.run_id for o in chunk]))
            log(f"steps in-process round {round_no + 1}: {inprocess[-1][0]:.2f} ms CPU per Order")
            if threaded:
                chunk = threaded_orders[round_no * args.orders : (round_no + 1) * args.orders]
                cpu_ms, _ = inprocess_steps(settings, [o.run_id for o in chunk], threads=args.concurrency)
                inprocess_threaded.append(cpu_ms)
                log(
                    f"steps in-process in {args.concurrency} threads, round {round_no + 1}: "
                    f"{inprocess_threaded[-1]:.2f} ms CPU per Order"
                )
        raw_profile = profiler.stop() if profiler is not None else None
        if floor_runner is not None:
            floor_runner.stop()

        rates = [r.orders_per_s for r in results]
        cpus = [r.cpu_per_order_ms("worker") for r in results]
        rate, cpu_order = median(rates), median(cpus)
        floor: dict[str, Any] | None
        if floor_rounds:
            n = args.floor_chains
            floor_rates = [f for f, _ in floor_rounds]
            floor_cpus = [c["worker"] * 1000 / n for _, c in floor_rounds]
            floor = {
                "source": "interleaved",
                "chains_per_s": median(floor_rates),
                "worker_cpu_ms_per_chain": median(floor_cpus),
                "chains_per_s_rounds": floor_rates,
                "worker_cpu_ms_per_chain_rounds": floor_cpus,
            }
            cpu_ratios = [c / f for c, f in zip(cpus, floor_cpus, strict=True)]
            rate_ratios = [r / f for r, f in zip(rates, floor_rates, strict=True)]
            # The limit: a floor task's CPU times the tasks a run sends, plus the steps in-process.
            limits = [
                f / TASKS_PER_FLOOR_CHAIN * tasks + steps
                for f, (steps, tasks) in zip(floor_cpus, inprocess, strict=True)
            ]
            overhead = [c / lim for c, lim in zip(cpus, limits, strict=True)]
            limits_threaded = (
                [
                    f / TASKS_PER_FLOOR_CHAIN * tasks + steps
                    for f, (_, tasks), steps in zip(floor_cpus, inprocess, inprocess_threaded, strict=True)
                ]
                if inprocess_threaded
                else []
            )
            overhead_threaded = (
                [c / lim for c, lim in zip(cpus, limits_threaded, strict=True)] if limits_threaded else []
            )
        else:
            floor = floor_row(args.floor_json, args.pool, args.concurrency)
            cpu_ratios = [c / floor["worker_cpu_ms_per_chain"] for c in cpus] if floor else []
            rate_ratios = [r / floor["chains_per_s"] for r in rates] if floor else []
            limits = (
                [floor["worker_cpu_ms_per_chain"] / TASKS_PER_FLOOR_CHAIN * t + st for st, t in inprocess]
                if floor
                else []
            )
            overhead = [c / lim for c, lim in zip(cpus, limits, strict=True)]
            limits_threaded = (
                [
                    floor["worker_cpu_ms_per_chain"] / TASKS_PER_FLOOR_CHAIN * t + st
                    for (_, t), st in zip(inprocess, inprocess_threaded, strict=True)
                ]
                if floor and inprocess_threaded
                else []
            )
            overhead_threaded = (
                [c / lim for c, lim in zip(cpus, limits_threaded, strict=True)] if limits_threaded else []
            )
        measured = orders[args.warmup :]
        steps_per_order = sum(len(TASKS) if o.esim else len(TASKS) - 1 for o in measured) / len(measured)
        states: Counter[str] = Counter()
        for res in results:
            states.update(res.states)
        table = Table(
            "Pipeline, no injected latency",
            [
                "pool",
                "concurrency",
                "worker CPUs",
                "orders",
                "orders/s",
                "orders/s range",
                "worker CPU ms/order",
                "CPU range",
                "worker CPU ms/step",
                "floor chains/s",
                "floor CPU ms/chain",
                "orders/s ÷ floor chains/s",
                "CPU/order ÷ floor CPU/chain",
                "CPU ratio range",
                "tasks/order",
                "steps in-process CPU ms/order",
                "limit CPU ms/order",
                "CPU/order ÷ limit",
                "overhead range",
                "steps in-process, worker's threads, CPU ms/order",
                "CPU/order ÷ limit at the worker's threads",
                "Redis CPU ms/order",
                "sandbox + driver CPU ms/order",
                "external calls/order",
            ],
            notes=[
                f"One worker process; {sum(o.esim for o in measured)} of {len(measured)} Orders are eSIM "
                "(9 external calls), the rest physical (7). Medians over the rounds, with their range.",
                "A run is a chain of step tasks (5 for an eSIM Order, 4 for a physical one: no eSIM task); "
                "the floor's chain is 5 no-op tasks, measured on a floor worker with the same options right "
                "before each round. The limit is a floor task's CPU times the tasks a run sends, plus the "
                "steps' own CPU in-process (the same kinds of Orders, one after the other in one thread of a "
                "process of their own, bench.inprocess, no Celery), measured right after each round; ratios "
                "are per round, then the median.",
                "The sandbox (all four simulators) runs in the benchmark's own process, on the same machine.",
                "At the worker's threads: the same limit with the steps in-process run by as many threads as "
                "the worker has (each its share of the Orders, its own CPU), so that both sides pay the "
                "threads' contention for the interpreter lock; the goal is stated against the one-thread "
                "limit (the column before).",
                "Worker CPUs: 'any' is wherever the scheduler puts the worker's threads; a CPU list is "
                "WORKER_CPUS, for the worker, the floor's worker and the steps in-process alike.",
                f"Final states: {dict(states)}.",
            ],
        )
        if floor is None:
            table.notes.append("No floor for these worker options (--floor-json): ratios are n/a.")
        table.add(
            args.pool,
            args.concurrency,
            args.worker_cpus or "any",
            f"{args.rounds} x {args.orders}",
            rate,
            spread(rates),
            cpu_order,
            spread(cpus),
            cpu_order / steps_per_order,
            floor["chains_per_s"] if floor else float("nan"),
            floor["worker_cpu_ms_per_chain"] if floor else float("nan"),
            median(rate_ratios),
            median(cpu_ratios),
            spread(cpu_ratios),
            median([t for _, t in inprocess]),
            median([st for st, _ in inprocess]),
            median(limits) if limits else float("nan"),
            median(overhead) if overhead else float("nan"),
            spread(overhead) if overhead else "n/a",
            median(inprocess_threaded) if inprocess_threaded else float("nan"),
            median(overhead_threaded) if overhead_threaded else float("nan"),
            median([r.cpu_per_order_ms("redis") for r in results]),
            median([r.cpu_per_order_ms("driver") for r in results]),
            median([r.external_calls() / r.orders for r in results]),
        )
        tables = [table]
        if raw_profile is not None:
            tables += summarise(raw_profile, "Worker profile, no-latency pipeline", steps=TASKS)
        data = {
            "pool": args.pool,
            "concurrency": args.concurrency,
            "worker_cpus": args.worker_cpus,
            "orders": args.orders,
            "rounds": args.rounds,
            "orders_per_s": rate,
            "orders_per_s_rounds": rates,
            "worker_cpu_ms_per_order": cpu_order,
            "worker_cpu_ms_per_order_rounds": cpus,
            "cpu_s_rounds": [r.cpu_s for r in results],
            "states": dict(states),
            "calls_rounds": [r.calls for r in results],
            "floor": floor,
            "cpu_ratio_to_floor": median(cpu_ratios),
            "tasks_per_order": median([t for _, t in inprocess]),
            "steps_inprocess_cpu_ms_per_order": median([st for st, _ in inprocess]),
            "steps_inprocess_rounds": inprocess,
            "limit_cpu_ms_per_order": median(limits) if limits else None,
            "overhead_ratio": median(overhead) if overhead else None,
            "overhead_ratio_rounds": overhead,
            "steps_inprocess_threaded_cpu_ms_per_order": median(inprocess_threaded)
            if inprocess_threaded
            else None,
            "steps_inprocess_threaded_rounds": inprocess_threaded,
            "overhead_ratio_threaded": median(overhead_threaded) if overhead_threaded else None,
            "overhead_ratio_threaded_rounds": overhead_threaded,
            "cpu_ratio_to_floor_rounds": cpu_ratios,
            "rate_ratio_to_floor": median(rate_ratios),
            "profile": str(raw_profile) if raw_profile else None,
        }
        emit("pipeline", args, info, tables, data)
    return 0


if __name__ == "__main__":
    run_main(main)
