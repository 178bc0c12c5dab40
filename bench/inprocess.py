"""The steps of seeded runs in a process of their own, without Celery: the in-process term of the overhead goal.

    python -m bench.inprocess [--threads N] < run-ids    (settings from the environment, as a worker's)

Each run's steps one after the other (the lifecycle, the ledger, the clients: what a
worker's task does, minus Celery), in ``--threads`` threads sharing the runs as a
threads pool's would. It runs apart from the benchmark, whose process also serves
the simulators: their threads would contend for the interpreter lock with these and
count in neither term. With ``WORKER_CPUS`` it runs on those CPUs, as the worker
does. Prints one JSON object: the steps' threads' own CPU seconds (``cpu_s``), the
step tasks the runs would have sent (``tasks``), the runs (``runs``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import pythonpath_env
from provisioning.core.cpus import parse_cpu_list, pin_process
from provisioning.core.logs import configure_logging
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings, load_settings
from provisioning.runs.lifecycle import run_step
from provisioning.runs.services import Services


def measure(
    settings: Settings, run_ids: list[str], threads: int = 1, wrap: Sequence[str] = ()
) -> tuple[float, float]:
    """Run ``run_ids``' steps in a child process with ``threads`` threads: per run measured (the
    first warms the connections up), its CPU milliseconds and the step tasks it would have sent.

    ``wrap`` is a command the child runs under (``bench.perf.wrapped``: counted by perf).
    """
    done = subprocess.run(
        [*wrap, sys.executable, "-m", "bench.inprocess", "--threads", str(threads)],
        input="\n".join(run_ids),
        capture_output=True,
        text=True,
        env={**settings.to_env(), **pythonpath_env()},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.inprocess exited {done.returncode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    runs = int(result["runs"])
    return float(result["cpu_s"]) * 1000 / runs, float(result["tasks"]) / runs


def run_steps(services: Services, run_ids: list[str], threads: int) -> tuple[float, int]:
    """Every run's steps, the runs shared among ``threads`` threads: (their CPU seconds, tasks)."""
    shares = [run_ids[i::threads] for i in range(threads)]
    results: list[tuple[float, int]] = [(0.0, 0)] * threads
    errors: list[BaseException] = []

    def run_share(index: int) -> None:
        try:
            results[index] = _one_thread(services, shares[index])
        except BaseException as exc:  # re-raised below, in the main thread
            errors.append(exc)

    pool = [threading.Thread(target=run_share, args=(i,), name=f"steps-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return sum(cpu for cpu, _ in results), sum(tasks for _, tasks in results)


def _one_thread(services: Services, run_ids: list[str]) -> tuple[float, int]:
    tasks = 0
    start = time.thread_time()
    for text in run_ids:
        run_id = RunId.parse(text)
        spec: Any = services.chain.first
        while spec is not None:
            try:
                done = run_step(services, run_id, spec)
            except Wait:
                continue  # the sandbox here injects no fault: a lease or a limit, just go again
            tasks += 1
            spec = done.next_step
    return time.thread_time() - start, tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--threads", type=int, default=1, help="Threads sharing the runs (default 1).")
    args = parser.parse_args(argv)
    run_ids = [line.strip() for line in sys.stdin if line.strip()]
    settings = load_settings()
    configure_logging(settings)  # as a worker logs (its level, its format)
    if settings.worker_cpus:  # on the worker's CPUs, as it is (WORKER_CPUS)
        pin_process(parse_cpu_list(settings.worker_cpus))
    services = Services(settings)
    # Connections and clients warm, as a worker's are after its first runs: one run first, not counted.
    warm, measured = run_ids[:1], run_ids[1:]
    run_steps(services, warm, 1)
    cpu_s, tasks = run_steps(services, measured, max(1, args.threads))
    print(json.dumps({"cpu_s": cpu_s, "tasks": tasks, "runs": len(measured)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
