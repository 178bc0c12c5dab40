"""What waiting costs a Celery worker: the floor's no-op tasks made to wait, against the same waits in-process.

    python -m bench.floor_io [--chains 200] [--rounds 3] [--round-trips 6] [--sleep-ms 10] [--pools threads:8,threads:1,prefork:2] [--json PATH]

The overhead goal's limit (``bench.pipeline``) is the floor of no-op tasks plus the
steps' own CPU measured in-process, in one thread of a process of their own. A step
is not a no-op: it waits, on Redis, HTTP and SMTP, about thirty times per Order. This
measures what a worker pays for a task that waits, beyond what the waits cost
in-process. Each worker runs the floor's chains three ways: as they are; with every
task making ``--round-trips`` Redis round trips (PING, on the ledger's server); with
every task sleeping ``--sleep-ms``. The excess of a waiting task is its CPU less the
no-op task's, less the waits' own CPU in-process (the same PINGs in one thread of a
process of its own; a sleep costs nothing there).

Nothing here runs our task layer: what it shows is Celery's and the interpreter's.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from bench.common import (
    BenchRedis,
    Broker,
    Cleanup,
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
from bench.floor import TASKS_PER_CHAIN, FloorRunner, parse_pools
from bench.floor_tasks import WAIT_ENV

# Round trips measured in-process for the PINGs' own CPU, after a warm-up.
INPROCESS_PINGS = 20_000
INPROCESS_WARMUP = 500

_PING_CPU = f"""
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
for _ in range({INPROCESS_WARMUP}):
    client.ping()
start = time.thread_time()
for _ in range({INPROCESS_PINGS}):
    client.ping()
print((time.thread_time() - start) / {INPROCESS_PINGS})
"""


def ping_cpu_s(url: str) -> float:
    """One Redis round trip's CPU in one thread of a process of its own (seconds)."""
    done = subprocess.run([sys.executable, "-c", _PING_CPU, url], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--chains", type=int, default=200, help="Chains measured per round.")
    parser.add_argument("--warmup", type=int, default=20, help="Chains run before the clock starts.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds per configuration (median).")
    parser.add_argument("--round-trips", type=int, default=6, help="Redis round trips per waiting task.")
    parser.add_argument("--sleep-ms", type=float, default=10.0, help="Sleep per sleeping task (ms).")
    parser.add_argument(
        "--pools",
        type=parse_pools,
        default="threads:8,threads:1,prefork:2",
        help="Worker configurations, pool:concurrency, comma-separated.",
    )
    args = parser.parse_args(argv)
    configs: list[tuple[str, int]] = args.pools
    waits = [("none", ""), (f"{args.round_trips} round trips", f"ping:{args.round_trips}")]
    if args.sleep_ms > 0:
        waits.append((f"sleep {args.sleep_ms:g} ms", f"sleep:{args.sleep_ms / 1000}"))

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "floor_io", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        ping_ms = ping_cpu_s(server.url(0)) * 1000
        log(f"a Redis round trip in-process: {ping_ms * 1000:.1f} us CPU")
        table = Table(
            "What waiting costs a worker: no-op tasks that wait, against the same waits in-process",
            [
                "pool",
                "concurrency",
                "wait per task",
                "worker CPU us/task",
                "CPU range, us",
                "the waits' CPU in-process, us/task",
                "excess over no-op + in-process, us/task",
                "excess per round trip or per sleep, us",
                "CPU ÷ (no-op + in-process)",
            ],
            notes=[
                f"The floor's chains of {TASKS_PER_CHAIN} tasks ({args.rounds} x {args.chains} per row, all "
                "queued at once), one worker per row, with our delivery settings; medians over the rounds.",
                f"A round trip is a PING to the ledger's Redis; in-process it costs {ping_ms * 1000:.1f} us "
                f"of CPU (one thread, {INPROCESS_PINGS} PINGs, a process of its own). A sleep costs none there.",
                "The excess is what the worker pays because its task waits, beyond the wait's own CPU: the "
                "interpreter lock changing hands between the pool's threads and the event loop around every "
                "wait, and less batching of deliveries, acks and events than no-op tasks get (a no-op floor "
                "is the best case, and a waiting task loses it).",
            ],
        )
        results: list[dict[str, Any]] = []
        for pool, concurrency in configs:
            base_ms: float | None = None
            for label, wait in waits:
                runner = FloorRunner(
                    server,
                    cleanup,
                    workdir / "logs",
                    pool=pool,
                    concurrency=concurrency,
                    broker=Broker(args.broker, server, cleanup),
                    env={WAIT_ENV: wait},
                )
                runner.warm_up(args.warmup)
                rounds = [runner.round(args.chains) for _ in range(args.rounds)]
                runner.stop()
                per_task = [c["worker"] * 1000 / (args.chains * TASKS_PER_CHAIN) for _, c in rounds]
                cpu_ms = median(per_task)
                if base_ms is None:
                    base_ms = cpu_ms
                inprocess_ms = args.round_trips * ping_ms if wait.startswith("ping:") else 0.0
                excess_ms = cpu_ms - base_ms - inprocess_ms
                waits_per_task = args.round_trips if wait.startswith("ping:") else (1 if wait else 0)
                row = {
                    "pool": pool,
                    "concurrency": concurrency,
                    "wait": label,
                    "worker_cpu_ms_per_task": cpu_ms,
                    "worker_cpu_ms_per_task_rounds": per_task,
                    "inprocess_ms_per_task": inprocess_ms,
                    "excess_ms_per_task": excess_ms,
                    "excess_us_per_wait": excess_ms * 1000 / waits_per_task if waits_per_task else 0.0,
                    "ratio": cpu_ms / (base_ms + inprocess_ms),
                }
                results.append(row)
                log(f"{pool}:{concurrency}, {label}: {cpu_ms:.3f} ms CPU per task")
                table.add(
                    pool,
                    concurrency,
                    label,
                    cpu_ms * 1000,
                    spread([t * 1000 for t in per_task]),
                    inprocess_ms * 1000,
                    excess_ms * 1000 if wait else "",
                    row["excess_us_per_wait"] if wait else "",
                    f"{row['ratio']:.3f}",
                )
        emit("floor_io", args, info, [table], {"ping_cpu_ms": ping_ms, "configs": results})
    return 0


if __name__ == "__main__":
    run_main(main)
