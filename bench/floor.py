"""The Celery floor: chains of five no-op tasks with our delivery settings, on a real worker process.

    python -m bench.floor [--chains 200] [--pools threads:8,prefork:2] [--json PATH]

What a chain costs before our code does anything: chains/s and the worker's
CPU seconds per chain (from /proc), with late acks, prefetch 1, task events,
JSON and our logging, on the same Redis broker and worker options as the
pipeline benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from celery import Celery
from celery.canvas import chain

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
    pythonpath_env,
    run_main,
    spread,
    unique,
    workdir_for,
)
from bench.floor_tasks import NOOP, NOOP_LAST, done_key, last_key
from provisioning.core.settings import Settings
from provisioning.runs.publishing import make_publisher
from provisioning.sandbox.processes import WORKER_READY_TIMEOUT_S, ManagedProcess, worker

TASKS_PER_CHAIN = 5
WAIT_TIMEOUT_S = 300.0
FLOOR_POLL_S = 0.02


def floor_worker(
    env: dict[str, str], log_dir: Path, *, name: str, pool: str, concurrency: int
) -> ManagedProcess:
    """``celery -A bench.floor_tasks worker`` with the options the pipeline's workers get."""
    return worker(env, log_dir, name=name, pool=pool, concurrency=concurrency, app="bench.floor_tasks")


def publish_chains(app: Celery, count: int) -> None:
    for i in range(count):
        run_id = f"floor-{i}"
        sigs = [
            app.signature(NOOP if n < TASKS_PER_CHAIN - 1 else NOOP_LAST, args=(run_id,), immutable=True).set(
                argsrepr=repr((run_id,))
            )
            for n in range(TASKS_PER_CHAIN)
        ]
        chain(*sigs).apply_async()


def wait_done(server: BenchRedis, settings: Settings, target: int) -> float:
    """Wait until ``target`` chains finished; when the last one did (the worker's clock)."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        done = server.client.get(done_key(settings))
        if done is not None and int(done) >= target:
            return float(server.client.get(last_key(settings)) or time.time())
        time.sleep(FLOOR_POLL_S)
    raise TimeoutError(f"the floor worker did not finish {target} chains in {WAIT_TIMEOUT_S:.0f}s")


class FloorRunner:
    """A floor worker on its own queue: warm it up, then measure rounds of chains.

    ``env`` is added to the worker's environment (``bench.floor_io`` sets the tasks' wait).
    """

    def __init__(
        self,
        server: BenchRedis,
        cleanup: Cleanup,
        log_dir: Path,
        *,
        pool: str,
        concurrency: int,
        broker: Broker | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        ns = unique("floor")
        self.server = server
        broker = broker or Broker("redis", server, cleanup)
        self.settings = Settings(
            _env_file=None,
            redis_url=server.url(0),
            celery_broker_url=broker.url(),
            ledger_prefix=ns,
            celery_queue=f"q-{ns}",
            log_format="json",
        )
        if not server.private:
            cleanup.add(f"keys of {ns}", functools.partial(server.forget, f"*{ns}*"))
        broker.own_queue(self.settings.celery_queue)
        worker_env = {**self.settings.to_env(), **pythonpath_env(), **(env or {})}
        self.proc = cleanup.process(
            floor_worker(
                worker_env, log_dir, name=f"floor-{pool}-{ns}", pool=pool, concurrency=concurrency
            ).start()
        )
        self.proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
        self.app = make_publisher(self.settings)
        self.done = 0

    def warm_up(self, chains: int) -> None:
        publish_chains(self.app, chains)
        self.done += chains
        wait_done(self.server, self.settings, self.done)

    def round(self, chains: int) -> tuple[float, dict[str, float]]:
        """chains/s and the CPU seconds used (worker, Redis, this process) by one round."""
        meter = CpuMeter({"worker": self.proc.pid}, self.server.client)
        meter.start()
        start = time.time()
        publish_chains(self.app, chains)
        self.done += chains
        last = wait_done(self.server, self.settings, self.done)
        cpu = meter.stop()
        return chains / (last - start), cpu

    def stop(self) -> None:
        self.proc.stop()


# The worker pools a floor can run on (Celery's --pool names that take a --concurrency).
POOLS = ("threads", "prefork", "solo")


def parse_pools(value: str) -> list[tuple[str, int]]:
    """``--pools``: ``threads:8,prefork:2`` -> [("threads", 8), ("prefork", 2)]."""
    configs = []
    for item in value.split(","):
        pool, _, concurrency = item.strip().partition(":")
        if pool not in POOLS or not concurrency.isdigit() or int(concurrency) < 1:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r}: expected pool:concurrency, comma-separated, with pool one of "
                f"{', '.join(POOLS)} and concurrency a whole number of at least 1 (e.g. threads:8,prefork:2)"
            )
        configs.append((pool, int(concurrency)))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--chains", type=int, default=200, help="Chains measured per configuration.")
    parser.add_argument("--warmup", type=int, default=20, help="Chains run before the clock starts.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds per configuration (median).")
    parser.add_argument(
        "--pools",
        type=parse_pools,
        default="threads:8,prefork:2",
        help="Worker configurations, pool:concurrency, comma-separated (the first is the pipeline's).",
    )
    args = parser.parse_args(argv)
    configs: list[tuple[str, int]] = args.pools

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "floor", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        table = Table(
            "Celery floor: a chain of five no-op tasks",
            [
                "pool",
                "concurrency",
                "chains",
                "chains/s",
                "chains/s range",
                "worker CPU ms/chain",
                "CPU range",
                "worker CPU ms/task",
                "Redis CPU ms/chain",
                "publisher CPU ms/chain",
            ],
            notes=[
                "One worker process; Redis broker; late acks, prefetch 1, task events on, JSON; our logging at INFO.",
                "CPU from /proc/<pid>/stat (user + system, the worker and its children); Redis from INFO cpu.",
                "All chains of a round are queued at once; the clock runs from the first publish to the last "
                "chain's end. Medians over the rounds (one worker), with their range.",
            ],
        )
        results = []
        for pool, concurrency in configs:
            runner = FloorRunner(
                server,
                cleanup,
                workdir / "logs",
                pool=pool,
                concurrency=concurrency,
                broker=Broker(args.broker, server, cleanup),
            )
            runner.warm_up(args.warmup)
            n = args.chains
            rounds = [runner.round(n) for _ in range(args.rounds)]
            runner.stop()
            rates = [r for r, _ in rounds]
            worker_ms = [c["worker"] * 1000 / n for _, c in rounds]
            row = {
                "pool": pool,
                "concurrency": concurrency,
                "chains": n,
                "rounds": args.rounds,
                "chains_per_s": median(rates),
                "chains_per_s_rounds": rates,
                "worker_cpu_ms_per_chain": median(worker_ms),
                "worker_cpu_ms_per_chain_rounds": worker_ms,
                "worker_cpu_ms_per_task": median(worker_ms) / TASKS_PER_CHAIN,
                "redis_cpu_ms_per_chain": median(
                    [c.get("redis", float("nan")) * 1000 / n for _, c in rounds]
                ),
                "publisher_cpu_ms_per_chain": median([c["driver"] * 1000 / n for _, c in rounds]),
            }
            results.append(row)
            log(f"floor {pool}:{concurrency}: {row['chains_per_s']:.1f} chains/s")
            table.add(
                pool,
                concurrency,
                f"{args.rounds} x {n}",
                row["chains_per_s"],
                spread(rates),
                row["worker_cpu_ms_per_chain"],
                spread(worker_ms),
                row["worker_cpu_ms_per_task"],
                row["redis_cpu_ms_per_chain"],
                row["publisher_cpu_ms_per_chain"],
            )
        emit("floor", args, info, [table], {"configs": results})
    return 0


if __name__ == "__main__":
    run_main(main)
