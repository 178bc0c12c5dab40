"""Listener catch-up: events waiting on the bus, then ``provisioning listen`` from EARLIEST.

    python -m bench.listener_catchup [--events 10000] [--profile] [--json PATH]

Events/s into the broker, from the listener's checkpoint in Redis (written
after each publish is accepted) and the broker queue's length. No worker runs,
so the tasks stay queued; the Order ids are valid Salesforce Ids of Orders that
need not exist (the listener never reads the Order).
"""

from __future__ import annotations

import random
import time

import redis

from bench.common import (
    BenchRedis,
    Cleanup,
    CpuMeter,
    Table,
    base_parser,
    emit,
    log,
    machine_info,
    run_main,
    workdir_for,
)
from bench.profile import Profiler, summarise
from bench.stack import Stack
from provisioning.sandbox.processes import listener
from provisioning.sandbox.salesforce.ids import PREFIX_ORDER, IdFactory
from provisioning.sandbox.scenario import publish_events_admin

CHUNK = 1000
CATCHUP_TIMEOUT_S = 300.0
CHECKPOINT_POLL_S = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=10_000, help="Events waiting on the bus.")
    parser.add_argument(
        "--profile", action="store_true", help="Sample the listener with py-spy (if installed)."
    )
    args = parser.parse_args(argv)
    n = args.events

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "listener", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup)
        settings = stack.settings("listen", sf_events_replay="EARLIEST")
        services = stack.services(settings)
        broker = redis.Redis.from_url(settings.celery_broker_url)
        cleanup.add("broker client", broker.close)

        factory = IdFactory(random.Random(7))
        payloads = [{"OrderId__c": factory.new(PREFIX_ORDER), "IdemKey__c": "catchup"} for _ in range(n)]
        t = time.time()
        replay_ids: list[int] = []
        for start in range(0, n, CHUNK):
            replay_ids += publish_events_admin(stack.sandbox, payloads[start : start + CHUNK])
        log(f"{n} events on the bus in {time.time() - t:.1f}s")
        last_id = replay_ids[-1]
        checkpoint_key = services.ledger.listener_key(settings.sf_provision_event_channel, "checkpoint")

        started = time.time()
        proc = cleanup.process(
            listener(
                settings.to_env(),
                workdir / "logs",
                name=f"listener-{settings.ledger_prefix}",
                extra=["--health-port", "0"],
            ).start()
        )
        meter = CpuMeter({"listener": proc.pid}, server.client)
        profiler = (
            Profiler(proc.pid, workdir / "listener-profile.txt", extra=["--gil"]) if args.profile else None
        )
        first_at: float | None = None
        first_depth = 0
        deadline = time.monotonic() + CATCHUP_TIMEOUT_S
        while True:
            raw = server.client.get(checkpoint_key)
            if raw is not None and first_at is None:
                first_at = time.time()
                first_depth = int(broker.llen(settings.celery_queue))
                meter.start()
                if profiler is not None:
                    profiler.start()
            if raw is not None and int(raw) >= last_id:
                break
            if not proc.alive():
                raise RuntimeError(f"the listener exited:\n{proc.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the listener did not catch up within {CATCHUP_TIMEOUT_S:.0f}s")
            time.sleep(CHECKPOINT_POLL_S)
        finished = time.time()
        cpu = meter.stop()
        raw_profile = profiler.stop() if profiler is not None else None
        queued = int(broker.llen(settings.celery_queue))
        proc.stop()
        broker.delete(settings.celery_queue)
        assert first_at is not None
        steady = (queued - first_depth) / (finished - first_at)
        overall = n / (finished - started)
        log(
            f"listener: {steady:.0f} events/s after the first checkpoint, {overall:.0f} events/s from process start"
        )

        table = Table(
            f"Listener catch-up: {n:,} events waiting, SF_EVENTS_REPLAY=EARLIEST",
            [
                "events",
                "tasks queued",
                "events/s (first checkpoint to last)",
                "events/s (from process start)",
                "start to first checkpoint s",
                "listener CPU µs/event",
                "Redis CPU µs/event",
            ],
            notes=[
                "Each event: validate, record the run as queued in the ledger (Ledger.enqueue, one script), "
                "publish the run's chain (broker accepted), SET the checkpoint, acknowledge; CometD delivers "
                "up to 500 events per /meta/connect.",
                "Redis: one server holds the ledger (db 0) and the broker (db 1); no worker runs.",
                "CPU per event is counted from the first checkpoint on (the start-up's imports and login are left out).",
            ],
        )
        table.add(
            n,
            queued,
            steady,
            overall,
            first_at - started,
            cpu["listener"] * 1e6 / (queued - first_depth),
            cpu.get("redis", float("nan")) * 1e6 / (queued - first_depth),
        )
        tables = [table]
        if raw_profile is not None:
            tables += summarise(raw_profile, "Listener profile during catch-up")
        data = {
            "events": n,
            "queued": queued,
            "events_per_s_steady": steady,
            "events_per_s_overall": overall,
            "startup_s": first_at - started,
            "cpu_s": cpu,
            "profile": str(raw_profile) if raw_profile else None,
        }
        emit("listener_catchup", args, info, tables, data)
    return 0


if __name__ == "__main__":
    run_main(main)
