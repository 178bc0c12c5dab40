"""Per-run cost: Salesforce API calls, Redis commands, broker messages and bytes, Redis memory per run.

    python -m bench.cost [--orders 50] [--json PATH]

The production path: events on the bus, ``provisioning listen`` publishing
them, one worker. The ledger and the broker each get their own private
redis-server, so ``INFO commandstats`` tells them apart (INFO is per server);
with ``--redis-url`` both share that server and only totals are meaningful.
Background commands (BRPOP timeouts, heartbeats, lock renewals, reconciler
sweeps) are measured while idle first and subtracted.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import redis

from bench.common import (
    BenchRedis,
    Cleanup,
    Table,
    base_parser,
    emit,
    log,
    machine_info,
    run_main,
    unique,
    workdir_for,
)
from bench.stack import Batch, Stack
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import make_publisher, publish_step
from provisioning.sandbox.processes import listener
from provisioning.sandbox.scenario import event_payload, publish_events_admin, wait_until

# Background commands are sampled for this long with everything running and nothing to do.
IDLE_S = 5.0
# After the last e-mail: the last step records itself, finishes the run and acks its message.
SETTLE_S = 1.0
RUN_TIMEOUT_S = 300.0
# Commands our own measuring sends (INFO, CONFIG RESETSTAT, MEMORY USAGE, ...), left out.
OWN_COMMANDS = {
    "info",
    "config",
    "memory",
    "ping",
    "hello",
    "client",
    "scan",
    "ttl",
    "psubscribe",
    "punsubscribe",
}


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def net_bytes(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


# How long the event tap waits for a message before it looks whether it should stop.
TAP_POLL_S = 0.5


class EventTap:
    """Counts the Celery event messages (PUBLISH on the broker) and their bytes, by event type."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.recording = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.pubsub.psubscribe("*")
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.pubsub.get_message(timeout=TAP_POLL_S)
            except (redis.ConnectionError, ValueError, AttributeError):
                return
            if message is None or not self.recording:
                continue
            channel = message["channel"].decode()
            kind = channel.rsplit("/", 1)[-1] or channel
            self.counts[kind] += 1
            self.bytes[kind] += len(message["data"])

    def stop(self) -> None:
        # The reader first: closing the connection under a read in progress makes it raise.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(TAP_POLL_S * 4)
        self.pubsub.close()


def message_sizes(settings: Settings, server: BenchRedis, run_id: str) -> list[tuple[str, int, int]]:
    """(task, bytes in the broker list, body bytes) of each message a run sends, from an unconsumed queue."""
    ns = unique("msg")
    probe = Settings(_env_file=None, **{**settings.model_dump(), "celery_queue": f"q-{ns}"})
    app = make_publisher(probe)
    broker = redis.Redis.from_url(probe.celery_broker_url)
    sizes = []
    try:
        queue = probe.celery_queue
        for spec in CHAIN:
            broker.delete(queue)
            # The listener sends the first; each step's task sends the next.
            publish_step(app, run_id, spec)
            (raw,) = broker.lrange(queue, 0, -1)
            payload = json.loads(raw)
            sizes.append((spec.task_name, len(raw), len(payload.get("body", ""))))
        broker.delete(queue)
    finally:
        broker.close()
        if not server.private:
            server.forget(f"*{ns}*")
    return sizes


def per_run(
    after: dict[str, int], before: dict[str, int], idle: dict[str, float], elapsed: float, n: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in set(after) | set(before):
        if name in OWN_COMMANDS:
            continue
        count = after.get(name, 0) - before.get(name, 0) - idle.get(name, 0.0) * elapsed
        if count > 0.5:
            out[name] = count / n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--orders", type=int, default=50, help="Runs measured.")
    parser.add_argument("--warmup", type=int, default=5, help="Runs before measuring (logins, connections).")
    args = parser.parse_args(argv)
    n = args.orders

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "cost", cleanup)
        ledger_server = BenchRedis(args.redis_url, workdir, cleanup, name="redis-ledger")
        split = ledger_server.private
        broker_server = (
            BenchRedis(args.redis_url, workdir, cleanup, name="redis-broker") if split else ledger_server
        )
        info = machine_info(ledger_server.client)
        stack = Stack(workdir, ledger_server, cleanup)
        settings = stack.settings("cost", celery_broker_url=broker_server.url(1), sf_events_replay="EARLIEST")
        services = stack.services(settings)
        broker_client = redis.Redis.from_url(broker_server.url(1))
        cleanup.add("broker client", broker_client.close)
        orders = stack.seed(services, args.warmup + n)
        warm, measured = orders[: args.warmup], orders[args.warmup :]

        stack.start_workers(settings, concurrency=8)
        env = settings.to_env()
        cleanup.process(
            listener(
                env, workdir / "logs", name=f"listener-{settings.ledger_prefix}", extra=["--health-port", "0"]
            ).start()
        )
        publish_events_admin(stack.sandbox, [event_payload(o) for o in warm])
        Batch(stack, settings, services).wait([o.run_id for o in warm], what="warm-up")
        smtp = stack.sandbox.admin("smtp")

        # Idle: what the processes send with nothing to do.
        servers = (
            {"ledger": ledger_server.client, "broker": broker_client}
            if split
            else {"all": ledger_server.client}
        )
        for client in servers.values():
            client.config_resetstat()
        time.sleep(IDLE_S)
        idle = {name: {k: v / IDLE_S for k, v in commandstats(c).items()} for name, c in servers.items()}

        tap = EventTap(broker_client)
        tap.start()
        cleanup.add("event tap", tap.stop)
        memory_before = int(ledger_server.client.info("memory")["used_memory"])
        for client in servers.values():
            client.config_resetstat()
        net_before = {name: net_bytes(c) for name, c in servers.items()}
        stack.reset_calls()
        tap.recording = True
        start = time.time()
        publish_events_admin(stack.sandbox, [event_payload(o) for o in measured])
        target = len(warm) + n
        wait_until(
            lambda: smtp.get("/__admin/messages/summary")["count"] >= target,
            timeout_s=RUN_TIMEOUT_S,
            poll_s=0.2,
        )
        time.sleep(SETTLE_S)
        elapsed = time.time() - start
        tap.recording = False
        after = {name: commandstats(c) for name, c in servers.items()}
        net_after = {name: net_bytes(c) for name, c in servers.items()}
        calls = stack.calls()
        log(f"cost: {n} runs in {elapsed:.1f}s")

        states = Counter(r.state.value for r in services.ledger.runs.get_many([o.run_id for o in measured]))
        commands = {name: per_run(after[name], {}, idle[name], elapsed, n) for name in servers}

        # -- memory of finished runs ------------------------------------------------------
        ledger = services.ledger
        footprints = [ledger.footprint(RunId.parse(o.run_id)) for o in measured]
        run_bytes = [f.run_bytes + f.order_bytes for f in footprints]
        order_set_bytes = [f.order_runs_bytes for f in footprints]
        ttls = [f.run_ttl_s for f in footprints]
        leftovers = {
            "order snapshots": sum(f.snapshot_left for f in footprints),
            "leases": sum(f.lease_left for f in footprints),
            "active runs": ledger.registries.unfinished(),
            "failed runs": len(ledger.registries.failed()),
        }
        esim_keys = ledger.inventory.footprint()
        memory_after = int(ledger_server.client.info("memory")["used_memory"])
        sizes = message_sizes(settings, broker_server, measured[0].run_id)

        # -- tables -----------------------------------------------------------------------
        # REST calls; the OAuth token and the listener's Streaming API polls are not per run.
        sf_api = {
            op: c for op, c in calls["salesforce"].items() if op != "token" and not op.startswith("cometd")
        }
        sf_other = {op: c for op, c in calls["salesforce"].items() if op not in sf_api}
        done = states.get("done", 0)
        summary = Table(
            "Per-run cost (the listener, one worker, production path)",
            ["what", "per run", "note"],
            notes=[
                f"{n} runs measured ({done} done: {dict(states)}), after {len(warm)} warm-up runs; "
                f"{sum(o.esim for o in measured)} eSIM, {sum(not o.esim for o in measured)} physical.",
                f"Idle background commands were measured for {IDLE_S:.0f}s and subtracted "
                f"(over the {elapsed:.1f}s run).",
            ],
        )
        summary.add(
            "Salesforce REST API calls",
            sum(sf_api.values()) / max(done, 1),
            ", ".join(f"{k} {v}" for k, v in sorted(sf_api.items()))
            + "; not per run: "
            + (", ".join(f"{k} {v}" for k, v in sorted(sf_other.items())) or "none"),
        )
        for sim in ("whmcs", "smdp", "smtp"):
            summary.add(
                f"{sim} calls",
                sum(calls[sim].values()) / n,
                ", ".join(f"{k} {v}" for k, v in sorted(calls[sim].items())),
            )
        for name, per in commands.items():
            summary.add(
                f"Redis commands ({name} server)",
                sum(per.values()),
                "INFO commandstats delta, idle subtracted",
            )
            sent = (net_after[name][0] - net_before[name][0]) / n
            received = (net_after[name][1] - net_before[name][1]) / n
            summary.add(
                f"Redis bytes in / out ({name} server)",
                f"{sent:,.0f} / {received:,.0f}",
                "INFO stats total_net_*_bytes (idle included)",
            )
        broker_cmds = commands.get("broker", commands.get("all", {}))
        summary.add(
            "broker task messages",
            broker_cmds.get("lpush", 0.0),
            "LPUSH: one per step task (5 for an eSIM run, 4 for a physical one); a retry sends one more (none expected here)",
        )
        summary.add(
            "broker event messages",
            sum(tap.counts.values()) / n,
            "PUBLISH of Celery events (Flower): "
            + ", ".join(f"{k} {v / n:.1f}" for k, v in tap.counts.most_common()),
        )
        summary.add("event bytes", sum(tap.bytes.values()) / n, "payload bytes of those PUBLISHes")
        summary.add(
            "ledger used_memory delta", (memory_after - memory_before) / n, "INFO memory, whole ledger server"
        )

        cmd_tables = []
        for name, per in commands.items():
            t = Table(f"Redis commands per run, {name} server", ["command", "per run"])
            for cmd, count in per.items():
                t.add(cmd.upper(), count)
            cmd_tables.append(t)

        msg_table = Table(
            "Bytes per task message (as stored in the Redis broker list)",
            ["task", "message bytes", "body bytes (base64)"],
            notes=[
                "Each message carries the run id only. The listener sends the first step's; each step sends "
                "the next one's when it ends, a step that must wait sends its own again (a retry with a "
                "countdown), and an operator's requeue sends the failed step's."
            ],
        )
        for task, raw, body in sizes:
            msg_table.add(task, raw, body)

        mem = Table(
            "Redis memory per finished run (MEMORY USAGE)",
            ["key", "bytes per run", "note"],
            notes=[
                f"Retention: run keys expire after RUN_RETENTION_DAYS={settings.run_retention_days} "
                f"(TTL seen: {min(ttls) / 86400:.2f} to {max(ttls) / 86400:.2f} days); failed runs stay until requeued.",
                "Left after the runs: " + ", ".join(f"{k} {v}" for k, v in leftovers.items()) + ".",
            ],
        )
        mem.add(
            f"{settings.ledger_prefix}:run:{{run_id}} (hash)",
            sum(run_bytes) / n,
            "state, steps' results, markers",
        )
        mem.add(
            f"{settings.ledger_prefix}:order:{{order_id}} (set)",
            sum(order_set_bytes) / n,
            "run ids of the Order",
        )
        esim_runs = max(sum(o.esim for o in orders), 1)
        claims_n, claims_b = esim_keys["claims"]
        used_n, used_b = esim_keys["used"]
        mem.add(
            "eSIM claims + used (per eSIM run)",
            (claims_b + used_b) / esim_runs,
            f"{claims_n} claims, {used_n} used (not expired: the inventory's record)",
        )
        mem.add(
            "total per run (the two run keys)",
            (sum(run_bytes) + sum(order_set_bytes)) / n,
            "what expires with retention",
        )

        tables = [summary, *cmd_tables, msg_table, mem]
        data: dict[str, Any] = {
            "orders": n,
            "elapsed_s": elapsed,
            "states": dict(states),
            "salesforce_api_calls_per_run": sum(sf_api.values()) / max(done, 1),
            "calls": calls,
            "redis_commands_per_run": commands,
            "redis_idle_per_s": idle,
            "events": {"counts": dict(tap.counts), "bytes": dict(tap.bytes)},
            "message_sizes": sizes,
            "memory": {
                "run_hash_bytes": sum(run_bytes) / n,
                "order_set_bytes": sum(order_set_bytes) / n,
                "esim_keys": esim_keys,
                "used_memory_delta_per_run": (memory_after - memory_before) / n,
                "ttl_days": [min(ttls) / 86400, max(ttls) / 86400],
                "leftovers": leftovers,
            },
        }
        emit("cost", args, info, tables, data)
    return 0


if __name__ == "__main__":
    run_main(main)
