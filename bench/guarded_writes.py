"""What confirming a ledger write by a replica costs: the write alone against the write with WAIT.

    python -m bench.guarded_writes [--writes 2000] [--rounds 3]

A private primary (AOF, appendfsync everysec) with one replica, both on loopback, and
the same primary without its replica; one client thread doing what a step does before
an effect (``ReplicaWait.write``: HSET, plus ``WAIT 1 <timeout>`` in the same round trip
when there are replicas). Latency percentiles per write and writes/s for one thread.
Loopback is the best case: across hosts, add the round trip to the replica.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from bench.common import (
    Cleanup,
    Table,
    base_parser,
    emit,
    latency_summary,
    log,
    machine_info,
    median,
    run_main,
    workdir_for,
)
from provisioning.core.replication import ReplicaWait, online_replicas
from provisioning.sandbox.redis_server import REPLICATION_OPTIONS, RedisServer
from provisioning.sandbox.scenario import wait_until

WAIT_TIMEOUT_MS = 1000
REPLICA_READY_TIMEOUT_S = 30.0


def measure(confirm: ReplicaWait, writes: int) -> list[float]:
    latencies = []
    for n in range(writes):
        started = time.perf_counter()
        confirm.write(functools.partial(_marker, n))
        latencies.append(time.perf_counter() - started)
    return latencies


def _marker(n: int, pipe: Any) -> object:
    return pipe.hset("bench:order", f"x:marker{n % 50}", str(n))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--writes", type=int, default=2000, help="Guarded writes per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per configuration (median).")
    args = parser.parse_args(argv)
    with Cleanup() as cleanup:
        workdir = workdir_for(args, "guarded", cleanup)
        primary = RedisServer(
            workdir / "primary", appendonly=True, appendfsync="everysec", options=REPLICATION_OPTIONS
        )
        cleanup.add("primary", primary.stop)
        primary.start()
        client = primary.client()
        cleanup.add("client", client.close)
        info = machine_info(client)
        table = Table(
            "Guarded ledger writes: HSET alone, and HSET + WAIT 1 with one replica",
            ["replicas", "writes", "writes/s (1 thread)", "p50 µs", "p95 µs", "p99 µs"],
            notes=[
                "One client thread, loopback, AOF everysec on both servers; medians over the rounds.",
                "With a replica, each write returns once the replica acknowledged it (ReplicaWait.write: one "
                "round trip, the WAIT pipelined behind the write).",
            ],
        )
        results = {}
        for replicas in (0, 1):
            if replicas:
                replica = RedisServer(
                    workdir / "replica", appendonly=True, appendfsync="everysec", replica_of=primary.address
                )
                cleanup.add("replica", replica.stop)
                replica.start()
                wait_until(
                    lambda: online_replicas(client.info("replication")) == 1,
                    timeout_s=REPLICA_READY_TIMEOUT_S,
                )
            confirm = ReplicaWait(redis=client, timeout_ms=WAIT_TIMEOUT_MS)
            assert confirm.replicas() == replicas
            measure(confirm, min(200, args.writes))  # warm up
            rounds = [measure(confirm, args.writes) for _ in range(args.rounds)]
            rates = [len(r) / sum(r) for r in rounds]
            summaries = [latency_summary(r) for r in rounds]
            row = {
                "replicas": replicas,
                "writes_per_s": median(rates),
                **{k: median([s[k] for s in summaries]) for k in ("p50_ms", "p95_ms", "p99_ms")},
            }
            results[str(replicas)] = row
            log(f"{replicas} replica(s): {row['writes_per_s']:.0f} writes/s, p50 {row['p50_ms']:.3f} ms")
            table.add(
                replicas,
                f"{args.rounds} x {args.writes}",
                row["writes_per_s"],
                row["p50_ms"] * 1000,
                row["p95_ms"] * 1000,
                row["p99_ms"] * 1000,
            )
        emit("guarded_writes", args, info, [table], results)
    return 0


if __name__ == "__main__":
    run_main(main)
