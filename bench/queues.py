"""Broker throughput: Redis, RabbitMQ classic queues and RabbitMQ quorum queues, side by side.

    python -m bench.queues [--chains 200] [--publishes 1000] [--rounds 3] [--brokers redis,classic,quorum]

For each broker, with our delivery settings (late acks, prefetch 1, task events, JSON;
publisher confirms on RabbitMQ, which quorum queues require):

- publishing: run messages (a five-step chain each, as the listener sends them) into a
  queue nobody consumes yet: messages/s and the publisher's CPU per message, which is
  what the listener pays per run;
- the Celery floor: chains of five no-op tasks through one worker (threads, 8), as
  ``bench.floor`` measures it: chains/s, the worker's CPU per chain and the broker's
  (Redis: INFO cpu; RabbitMQ: the node's process tree from /proc).

RabbitMQ is a node of the benchmark's own (free ports, its own data; never the shared
one on 5672), one node for both queue types; Redis a private server (the ledger's
counters live there too, on db 0, as in the floor benchmark). Countdown retries are
not exercised: on quorum queues they go through native delayed delivery, which no
no-op chain uses.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.connection import Connection

from bench.common import (
    BenchRedis,
    Cleanup,
    CpuMeter,
    Table,
    base_parser,
    cpu_seconds,
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
from bench.floor import TASKS_PER_CHAIN, floor_worker, publish_chains, wait_done
from provisioning.core.settings import Settings
from provisioning.runs.publishing import make_publisher
from provisioning.sandbox.processes import WORKER_READY_TIMEOUT_S
from provisioning.sandbox.rabbitmq_server import RabbitServer

BROKERS = ("redis", "classic", "quorum")
WORKER_POOL = "threads"
WORKER_CONCURRENCY = 8


def broker_settings(kind: str, redis: BenchRedis, rabbit: RabbitServer | None) -> Settings:
    ns = unique(kind)
    values: dict[str, Any] = {
        "redis_url": redis.url(0),
        "ledger_prefix": ns,
        "celery_queue": f"q-{ns}",
        "log_format": "json",
    }
    if kind == "redis":
        values["celery_broker_url"] = redis.url(1)
    else:
        assert rabbit is not None
        values.update(celery_broker_url=rabbit.url, celery_queue_type=kind)
    return Settings(_env_file=None, **values)


def measure_publishing(settings: Settings, count: int) -> tuple[float, float]:
    """(messages/s, publisher CPU ms per message) for ``count`` chain messages, nobody consuming."""
    app = make_publisher(settings)
    with app.producer_or_acquire() as producer:
        # Declare the queue first (the first publish would), outside the clock.
        producer.publish({}, exchange="", routing_key=settings.celery_queue, declare=app.amqp.queues.values())
    started, cpu = time.monotonic(), time.process_time()
    publish_chains(app, count)
    elapsed, used = time.monotonic() - started, time.process_time() - cpu
    options = app.conf.broker_transport_options
    with Connection(settings.celery_broker_url, transport_options=options) as conn:  # type: ignore[no-untyped-call]
        conn.default_channel.queue_purge(settings.celery_queue)
    return count / elapsed, used * 1000 / count


def broker_cpu(kind: str, redis: BenchRedis, rabbit: RabbitServer | None) -> float:
    if kind == "redis" or rabbit is None or rabbit.proc is None:
        return float("nan")  # CpuMeter reads Redis itself
    return cpu_seconds(rabbit.proc.pid)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--chains", type=int, default=200, help="Chains per floor round.")
    parser.add_argument("--publishes", type=int, default=1000, help="Run messages per publishing round.")
    parser.add_argument("--warmup", type=int, default=20, help="Chains run before the clock starts.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds per broker (median).")
    parser.add_argument(
        "--brokers", default=",".join(BROKERS), help=f"Comma-separated, of {', '.join(BROKERS)}."
    )
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    unknown = set(kinds) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(sorted(unknown))}: choose from {', '.join(BROKERS)}")

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "queues", cleanup)
        redis = BenchRedis(args.redis_url, workdir, cleanup)
        rabbit: RabbitServer | None = None
        if any(k != "redis" for k in kinds):
            rabbit = RabbitServer(workdir / "rabbitmq")
            cleanup.add("rabbitmq", rabbit.stop)
            log("starting a private RabbitMQ node")
            rabbit.start()
        info = machine_info(redis.client)
        table = Table(
            "Brokers: Redis, RabbitMQ classic and quorum queues",
            [
                "broker",
                "publish msgs/s",
                "publish range",
                "publisher CPU ms/msg",
                "floor chains/s",
                "floor range",
                "worker CPU ms/chain",
                "broker CPU ms/chain",
            ],
            notes=[
                "Publishing: one run message (a five-step chain) per run, as the listener sends it, into a queue "
                "nobody consumes; RabbitMQ with publisher confirms (each publish waits for its confirm).",
                f"Floor: chains of {TASKS_PER_CHAIN} no-op tasks, one worker ({WORKER_POOL}, "
                f"{WORKER_CONCURRENCY}), late acks, prefetch 1, task events on; medians over the rounds.",
                "Broker CPU: Redis INFO cpu, or the RabbitMQ node's process tree (/proc); a single local node, "
                "so a quorum queue's replication to other nodes is not in these numbers.",
            ],
        )
        results = []
        for kind in kinds:
            settings = broker_settings(kind, redis, rabbit)
            publishes = [measure_publishing(settings, args.publishes) for _ in range(args.rounds)]
            env = {**settings.to_env(), **pythonpath_env()}
            proc = cleanup.process(
                floor_worker(
                    env,
                    workdir / "logs",
                    name=f"queues-{kind}",
                    pool=WORKER_POOL,
                    concurrency=WORKER_CONCURRENCY,
                ).start()
            )
            proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
            app = make_publisher(settings)
            done = args.warmup
            publish_chains(app, args.warmup)
            wait_done(redis, settings, done)
            rates, worker_ms, broker_ms = [], [], []
            for _ in range(args.rounds):
                meter = CpuMeter({"worker": proc.pid}, redis.client if kind == "redis" else None)
                rabbit_before = broker_cpu(kind, redis, rabbit)
                meter.start()
                start = time.time()
                publish_chains(app, args.chains)
                done += args.chains
                last = wait_done(redis, settings, done)
                used = meter.stop()
                rates.append(args.chains / (last - start))
                worker_ms.append(used["worker"] * 1000 / args.chains)
                spent = used.get("redis", broker_cpu(kind, redis, rabbit) - rabbit_before)
                broker_ms.append(spent * 1000 / args.chains)
            proc.stop()
            row = {
                "broker": kind,
                "publish_msgs_per_s": median([r for r, _ in publishes]),
                "publish_msgs_per_s_rounds": [r for r, _ in publishes],
                "publisher_cpu_ms_per_msg": median([c for _, c in publishes]),
                "chains_per_s": median(rates),
                "chains_per_s_rounds": rates,
                "worker_cpu_ms_per_chain": median(worker_ms),
                "broker_cpu_ms_per_chain": median(broker_ms),
            }
            results.append(row)
            log(
                f"{kind}: publish {row['publish_msgs_per_s']:.0f}/s, floor {row['chains_per_s']:.1f} chains/s"
            )
            table.add(
                kind,
                row["publish_msgs_per_s"],
                spread(row["publish_msgs_per_s_rounds"]),
                row["publisher_cpu_ms_per_msg"],
                row["chains_per_s"],
                spread(rates),
                row["worker_cpu_ms_per_chain"],
                row["broker_cpu_ms_per_chain"],
            )
        emit("queues", args, info, [table], {"brokers": results})
    return 0


if __name__ == "__main__":
    run_main(main)
