"""Where the worker's CPU goes beyond the overhead goal's limit, counted by perf: the interpreter lock's hand-offs.

    python -m bench.contention [--orders 200] [--rounds 5] [--concurrency 8] [--broker redis|rabbitmq] [--json PATH]

The overhead goal (``bench.pipeline``) divides the worker's CPU per Order by a limit
of two terms: the floor's no-op tasks, as many as a run sends, and the steps' own
CPU in-process (``bench.inprocess``) in one thread. A CPU figure says how much the
worker spends beyond that; this says on what. In each round, with ``perf stat``
(``bench.perf``), it counts per Order the CPU (user and system apart), context
switches, system calls, futex calls and polls of: the worker running a batch of Orders (the pipeline, no
injected latency); the floor worker running as many chains (per task, times the
tasks an Order sends); and the steps in-process, in one thread and in the worker's
number of threads (each child counted whole, twice: with every run and with one,
the difference per run).

A thread that cannot take the interpreter lock at once waits on a futex, and so does
one that hands it over to a waiting thread: in one thread the steps make no futex
call, so a limit with the one-thread term leaves out what the lock costs a pool of
threads. The last columns show what the worker makes beyond each limit.

Needs Linux perf (Debian's linux-perf) and the right to read the syscall tracepoints
(root). Not in ``make bench``: a diagnostic of the overhead goal.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import perf
from bench.common import (
    BenchRedis,
    Broker,
    Cleanup,
    CpuMeter,
    Table,
    base_parser,
    cpu_split_seconds,
    emit,
    log,
    machine_info,
    median,
    run_main,
    workdir_for,
)
from bench.floor import TASKS_PER_CHAIN, FloorRunner
from bench.inprocess import measure as inprocess_steps
from bench.stack import Batch, Stack
from provisioning.core.settings import Settings

WARMUP_ORDERS = 20  # published at once: every thread of the pool is started before counting
FLOOR_WARMUP_CHAINS = 20
TASK_CLOCK = "task-clock"
T = TypeVar("T")


def per_run_difference(whole: dict[str, float], one: dict[str, float], runs: int) -> dict[str, float]:
    """Per run, from a child counted with ``runs`` measured runs and one counted with one: the
    start-up, the imports and the warm-up run are in both and fall out."""
    if runs < 2:
        raise ValueError(f"need at least 2 measured runs to take a difference, got {runs}")
    return {name: (whole[name] - one[name]) / (runs - 1) for name in whole}


def scaled(counts: dict[str, float], by: float) -> dict[str, float]:
    return {name: value * by for name, value in counts.items()}


def inprocess_counts(settings: Settings, run_ids: list[str], threads: int) -> dict[str, float]:
    """perf's counts per run of the steps in-process: ``run_ids`` is the warm-up run, the measured
    runs, then a second warm-up run and one more (the one-run child)."""
    whole_ids, one_ids = run_ids[:-2], run_ids[-2:]
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        counts = []
        for ids in (whole_ids, one_ids):
            out = Path(tmp) / "stat.csv"
            inprocess_steps(settings, ids, threads=threads, wrap=perf.wrapped(out))
            counts.append(perf.parse(out.read_text(), perf.EVENT_NAMES + perf.TIME_NAMES))
    return per_run_difference(counts[0], counts[1], len(whole_ids) - 1)


def counted(pid: int, run: Callable[[], T], cleanup: Cleanup, what: str) -> tuple[dict[str, float], T]:
    """perf's counts of ``pid`` while ``run()`` runs, with its user and system CPU (ms) from /proc;
    and what ``run()`` returned."""
    counter = perf.Attached(pid)
    cleanup.add(f"perf on the {what}", counter.close)
    user_before, system_before = cpu_split_seconds(pid)
    counter.start()
    returned = run()
    counts = counter.stop()
    user_after, system_after = cpu_split_seconds(pid)
    counts["user_time"] = (user_after - user_before) * 1000
    counts["system_time"] = (system_after - system_before) * 1000
    return counts, returned


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: median([r[name] for r in rounds]) for name in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--orders", type=int, default=200, help="Orders per round (and floor chains).")
    parser.add_argument("--rounds", type=int, default=5, help="Measured rounds (median of each count).")
    parser.add_argument("--concurrency", type=int, default=8, help="The worker's threads (threads pool).")
    args = parser.parse_args(argv)
    if args.orders < 2:
        parser.error("--orders: at least 2 (the in-process counts are a difference of two children)")
    why = perf.unavailable()
    if why is not None:
        parser.exit(2, f"bench.contention: {why}\n")
    n, threads = args.orders, args.concurrency
    # The steps in-process in one thread, and in the worker's (once, if that is one too).
    thread_counts = sorted({1, threads})

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "contention", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup))
        settings = stack.settings("contention")
        services = stack.services(settings)
        orders = stack.seed(services, WARMUP_ORDERS + args.rounds * n)
        # Per round and thread count: a warm-up run and n measured ones; then a warm-up run and one.
        inprocess_orders = {t: stack.seed(services, args.rounds * (n + 3)) for t in thread_counts}
        (worker,) = stack.start_workers(settings, pool="threads", concurrency=threads)
        batch = Batch(stack, settings, services)
        batch.warm_up(orders[:WARMUP_ORDERS])
        floor = FloorRunner(
            server, cleanup, workdir / "logs", pool="threads", concurrency=threads, broker=stack.broker
        )
        floor.warm_up(FLOOR_WARMUP_CHAINS)
        worker_threads = threads_of(worker.pid)

        floor_rounds: list[dict[str, float]] = []
        worker_rounds: list[dict[str, float]] = []
        proc_cpu_rounds: list[float] = []
        inprocess_rounds: dict[int, list[dict[str, float]]] = {t: [] for t in thread_counts}
        tasks_per_order: list[float] = []
        for round_no in range(args.rounds):
            floor_counts, _ = counted(floor.proc.pid, functools.partial(floor.round, n), cleanup, "floor")
            floor_rounds.append(scaled(floor_counts, 1 / (n * TASKS_PER_CHAIN)))

            chunk = orders[WARMUP_ORDERS + round_no * n : WARMUP_ORDERS + (round_no + 1) * n]
            run_batch = functools.partial(batch.run, chunk, meter=CpuMeter({"worker": worker.pid}))
            worker_counts, result = counted(worker.pid, run_batch, cleanup, "worker")
            worker_rounds.append(scaled(worker_counts, 1 / n))
            proc_cpu_rounds.append(result.cpu_per_order_ms("worker"))
            tasks_per_order.append(sum(5 if o.esim else 4 for o in chunk) / n)
            log(
                f"round {round_no + 1}: worker {worker_rounds[-1][TASK_CLOCK]:.2f} ms CPU per Order, {result.states}"
            )

            for t in thread_counts:
                ids = [o.run_id for o in inprocess_orders[t][round_no * (n + 3) : (round_no + 1) * (n + 3)]]
                inprocess_rounds[t].append(inprocess_counts(settings, ids, t))
                log(
                    f"round {round_no + 1}: steps in-process, {t} thread(s): "
                    f"{inprocess_rounds[t][-1][TASK_CLOCK]:.2f} ms CPU per Order"
                )
        floor.stop()
        if threads_of(worker.pid) != worker_threads:
            log(f"the worker's threads went from {worker_threads} to {threads_of(worker.pid)} while counted")

        tasks = median(tasks_per_order)
        floor_task = medians(floor_rounds)
        floor_order = scaled(floor_task, tasks)
        steps_one = medians(inprocess_rounds[1])
        steps_many = medians(inprocess_rounds[threads])
        worker_order = medians(worker_rounds)
        limit_one = {k: floor_order[k] + steps_one[k] for k in worker_order}
        limit_many = {k: floor_order[k] + steps_many[k] for k in worker_order}

        table = Table(
            f"Per Order, counted by perf: the worker (threads x {threads}) against its limit's terms",
            [
                "count",
                "floor, per task",
                f"floor x {tasks:.2f} tasks",
                "steps in-process, 1 thread",
                f"steps in-process, {threads} threads",
                "worker",
                "worker - (floor + steps, 1 thread)",
                f"worker - (floor + steps, {threads} threads)",
                "worker ÷ (floor + steps, 1 thread)",
                f"worker ÷ (floor + steps, {threads} threads)",
            ],
            notes=[
                f"{args.rounds} rounds of {n} Orders (all queued at once, no injected latency) and {n} floor "
                f"chains of {TASKS_PER_CHAIN} no-op tasks, {args.broker} broker; medians of each count. "
                f"The worker's CPU read from /proc as bench.pipeline does: {median(proc_cpu_rounds):.2f} ms "
                "per Order (perf's task-clock counts the same threads).",
                "The steps in-process: bench.inprocess in a child of its own, counted whole with every run "
                "and with one, the difference per run (start-up and warm-up fall out).",
                "A futex call is a thread waiting for a lock or waking one that waits: in one thread the "
                "steps make none, in a pool every wait hands the interpreter lock over.",
            ],
        )
        for name, label in perf.EVENTS + perf.TIMES:
            table.add(
                label,
                floor_task[name],
                floor_order[name],
                steps_one[name],
                steps_many[name],
                worker_order[name],
                worker_order[name] - limit_one[name],
                worker_order[name] - limit_many[name],
                f"{worker_order[name] / limit_one[name]:.3f}" if limit_one[name] else "",
                f"{worker_order[name] / limit_many[name]:.3f}" if limit_many[name] else "",
            )
        data: dict[str, Any] = {
            "orders": n,
            "rounds": args.rounds,
            "concurrency": threads,
            "tasks_per_order": tasks,
            "floor_per_task": floor_task,
            "steps_inprocess_one_thread": steps_one,
            "steps_inprocess_threads": steps_many,
            "worker_per_order": worker_order,
            "worker_cpu_ms_per_order_proc": median(proc_cpu_rounds),
            "rounds_detail": {
                "floor_per_task": floor_rounds,
                "worker_per_order": worker_rounds,
                "steps_inprocess_one_thread": inprocess_rounds[1],
                "steps_inprocess_threads": inprocess_rounds[threads],
            },
        }
        emit("contention", args, info, [table], data)
    return 0


if __name__ == "__main__":
    run_main(main)
