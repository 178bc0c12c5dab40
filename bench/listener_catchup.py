"""Listener catch-up: events waiting on the bus, then ``provisioning listen`` from EARLIEST, per transport.

    python -m bench.listener_catchup [--events 10000] [--transport pubsub|cometd|both] [--profile] [--json PATH]

Events/s into the broker, from the broker queue's length (a run's chain is one
message, published before its batch is checkpointed). No worker runs, so the
messages stay queued; the Order ids are valid Salesforce Ids of Orders that need
not exist (the listener never reads the Order).
"""

from __future__ import annotations

import random
import time
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
POLL_S = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=10_000, help="Events waiting on the bus.")
    parser.add_argument(
        "--transport",
        choices=("pubsub", "cometd", "both"),
        default="both",
        help="The event source (SF_EVENTS_TRANSPORT) to measure; both: one after the other.",
    )
    parser.add_argument(
        "--profile", action="store_true", help="Sample the listener with py-spy (if installed)."
    )
    args = parser.parse_args(argv)
    transports = ("pubsub", "cometd") if args.transport == "both" else (args.transport,)

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "listener", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup))
        table = Table(
            f"Listener catch-up: {args.events:,} events waiting, SF_EVENTS_REPLAY=EARLIEST",
            [
                "transport",
                "events",
                "runs queued",
                "events/s (first batch to last)",
                "events/s (from process start)",
                "start to first batch s",
                "listener CPU µs/event",
                "Redis CPU µs/event",
            ],
            notes=[
                "Per batch (a Pub/Sub fetch of up to SF_PUBSUB_BATCH_SIZE=100 events; a CometD connect reply): "
                "validate every event, record the runs as queued in one pipeline, publish every run's chain "
                "through one producer (broker accepted), then one checkpoint SET and the ack.",
                "Redis: one server holds the ledger (db 0) and the broker (db 1); no worker runs.",
                "CPU per event is counted from the first batch on (the start-up's imports and login are left out).",
            ],
        )
        tables = [table]
        data: dict[str, object] = {"events": args.events}
        for transport in transports:
            row, raw_profile = _catch_up(args, stack, server, workdir, cleanup, transport)
            table.add(transport, *row.values())
            data[transport] = {**row, "profile": str(raw_profile) if raw_profile else None}
            if raw_profile is not None:
                tables += summarise(raw_profile, f"Listener profile during catch-up ({transport})")
        emit("listener_catchup", args, info, tables, data)
    return 0


def _catch_up(
    args: Any, stack: Stack, server: BenchRedis, workdir: Path, cleanup: Cleanup, transport: str
) -> tuple[dict[str, float], Path | None]:
    n = args.events
    settings = stack.settings(
        f"listen-{transport}", sf_events_replay="EARLIEST", sf_events_transport=transport
    )
    factory = IdFactory(random.Random(7))
    payloads = [
        {"OrderId__c": factory.new(PREFIX_ORDER), "IdemKey__c": f"catchup-{transport}"} for _ in range(n)
    ]
    # A bus of this transport's own: the sandbox's retained events of another run would be replayed too.
    stack.sandbox.admin("salesforce").post("/__admin/reset")
    t = time.time()
    for start in range(0, n, CHUNK):
        publish_events_admin(stack.sandbox, payloads[start : start + CHUNK])
    log(f"{transport}: {n} events on the bus in {time.time() - t:.1f}s")

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
        Profiler(proc.pid, workdir / f"listener-{transport}-profile.txt", extra=["--gil"])
        if args.profile
        else None
    )
    first_at: float | None = None
    first_depth = 0
    deadline = time.monotonic() + CATCHUP_TIMEOUT_S
    while True:
        depth = stack.broker.depth(settings.celery_queue)
        if depth and first_at is None:
            first_at, first_depth = time.time(), depth
            meter.start()
            if profiler is not None:
                profiler.start()
        if depth >= n:
            break
        if not proc.alive():
            raise RuntimeError(f"the listener exited:\n{proc.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the listener did not catch up within {CATCHUP_TIMEOUT_S:.0f}s ({depth} of {n})"
            )
        time.sleep(POLL_S)
    finished = time.time()
    cpu = meter.stop()
    raw_profile = profiler.stop() if profiler is not None else None
    proc.stop()
    stack.broker.purge(settings.celery_queue)
    assert first_at is not None
    counted = n - first_depth
    steady = counted / (finished - first_at)
    overall = n / (finished - started)
    log(
        f"listener ({transport}): {steady:.0f} events/s after the first batch, {overall:.0f} events/s from start"
    )
    row = {
        "events": float(n),
        "queued": float(n),
        "events_per_s_steady": steady,
        "events_per_s_overall": overall,
        "startup_s": first_at - started,
        "cpu_us_per_event": cpu["listener"] * 1e6 / counted,
        "redis_cpu_us_per_event": cpu.get("redis", float("nan")) * 1e6 / counted,
    }
    return row, raw_profile


if __name__ == "__main__":
    run_main(main)
