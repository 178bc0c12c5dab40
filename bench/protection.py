"""The external systems' protection under load: a global rate limit held, an outage survived.

    python -m bench.protection [--limit 20] [--orders 150] [--outage-s 60] [--outage-orders 200] [--json PATH]

Rate-limit adherence: a global limit of ``--limit`` calls/s on the SM-DP+ (low
enough that the limit, not CPU, binds), two worker processes of 20 threads, 100 ms
injected on every call: the achieved rate of SM-DP+ calls (full seconds between the
first and the last) as a share of the limit, and the busiest second, both from the
simulator's own per-second counts.

Breaker: WHMCS answers 503 to everything for ``--outage-s`` while ``--outage-orders``
Orders flow (published at a steady rate over the outage), once with the circuit
breakers and once without (``BREAKER_FAILURES`` too high to ever open): WHMCS calls
during the outage, the Orders Activated once afterwards, and the runs the outage
failed.
"""

from __future__ import annotations

import time
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
    run_main,
    workdir_for,
)
from bench.stack import Stack
from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, settled, wait_until

INJECTED_LATENCY_MS = 100
WORKERS = 2
THREADS = 20
# BREAKER_FAILURES for the run without breakers: never reached.
NO_BREAKER_FAILURES = 1_000_000
SETTLE_TIMEOUT_S = 900.0


def rate_limit(stack: Stack, limit: int, orders: int) -> dict[str, Any]:
    settings = stack.settings("rate", rate_limit_smdp=f"{limit}/s")
    services = stack.services(settings)
    seeded = stack.seed(services, orders, esim_share=1.0)
    procs = stack.start_workers(settings, count=WORKERS, concurrency=THREADS)
    stack.set_latency(INJECTED_LATENCY_MS)
    stack.reset_calls()
    publisher = make_publisher(settings)
    start = time.time()
    for order in seeded:
        publish_run(publisher, order.run_id)
    wait_until(
        settled(stack.sandbox, services.ledger, [o.order_id for o in seeded]), timeout_s=SETTLE_TIMEOUT_S
    )
    elapsed = time.time() - start
    calls = stack.sandbox.admin("smdp").get("/__admin/calls")
    per_second = {int(k): v for k, v in calls["per_second"].items()}
    seconds = sorted(per_second)
    # Full seconds only: the first and the last are partly outside the run.
    inner = seconds[1:-1]
    achieved = sum(per_second[s] for s in inner) / len(inner) if inner else float("nan")
    for proc in procs:
        proc.stop()
    stack.set_latency(0)
    done = sum(
        1 for r in services.ledger.runs.get_many([o.run_id for o in seeded]) if r.state is RunState.DONE
    )
    waits = services.ledger.metrics.parse(_counters(services)).counter("step_waits")
    return {
        "limit": limit,
        "orders": orders,
        "done": done,
        "elapsed_s": elapsed,
        "smdp_calls": calls["total"],
        "achieved_per_s": achieved,
        "share_of_limit": achieved / limit,
        "busiest_second": max(per_second.values()),
        "seconds_over_limit": sum(1 for v in per_second.values() if v > limit),
        "steps_turned_away": int(sum(waits.values())),
        "calls_per_second": [per_second[s] for s in seconds],
    }


def outage(stack: Stack, outage_s: float, orders: int, *, breakers: bool) -> dict[str, Any]:
    name = "breaker" if breakers else "nobreaker"
    overrides: dict[str, Any] = {} if breakers else {"breaker_failures": NO_BREAKER_FAILURES}
    settings = stack.settings(name, **overrides)
    services = stack.services(settings)
    seeded = stack.seed(services, orders)
    procs = stack.start_workers(settings, count=WORKERS, concurrency=THREADS)
    whmcs = stack.sandbox.admin("whmcs")
    before = count_effects(stack.sandbox).whmcs_orders
    stack.reset_calls()
    whmcs.post("/__admin/faults", {"error_rate": 1.0, "error_status": 503})
    publisher = make_publisher(settings)
    start = time.time()
    for i, order in enumerate(seeded):
        delay = start + i * outage_s / orders - time.time()
        if delay > 0:
            time.sleep(delay)
        publish_run(publisher, order.run_id)
    time.sleep(max(0.0, start + outage_s - time.time()))
    during = whmcs.get("/__admin/calls")["total"]
    whmcs.post("/__admin/faults", {})
    back = time.time()
    log(f"{name}: {during} WHMCS calls in the {outage_s:.0f} s outage")
    wait_until(
        settled(stack.sandbox, services.ledger, [o.order_id for o in seeded]), timeout_s=SETTLE_TIMEOUT_S
    )
    recovered_s = time.time() - back
    runs = services.ledger.runs.get_many([o.run_id for o in seeded])
    effects = count_effects(stack.sandbox)
    for proc in procs:
        proc.stop()
    return {
        "breakers": breakers,
        "orders": orders,
        "whmcs_calls_during_outage": during,
        "done": sum(1 for r in runs if r.state is RunState.DONE),
        "failed": sum(1 for r in runs if r.state is RunState.FAILED),
        "whmcs_orders": effects.whmcs_orders - before,
        "settled_after_outage_s": recovered_s,
    }


def _counters(services: Any) -> list[Any]:
    pipe = services.redis.pipeline()
    services.ledger.metrics.read_commands(pipe)
    return list(pipe.execute())


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--limit", type=int, default=20, help="The SM-DP+'s global limit, calls/s.")
    parser.add_argument("--orders", type=int, default=150, help="eSIM Orders of the rate-limit run.")
    parser.add_argument("--outage-s", type=float, default=60.0, help="How long WHMCS answers 503.")
    parser.add_argument("--outage-orders", type=int, default=200, help="Orders published during the outage.")
    parser.add_argument("--skip", default="", help="rate, outage: parts not to run.")
    args = parser.parse_args(argv)
    with Cleanup() as cleanup:
        workdir = workdir_for(args, "protection", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup))
        tables: list[Table] = []
        data: dict[str, Any] = {}
        if "rate" not in args.skip:
            r = rate_limit(stack, args.limit, args.orders)
            data["rate_limit"] = r
            table = Table(
                "A global rate limit on the SM-DP+, two workers of 20 threads, 100 ms per call",
                [
                    "limit/s",
                    "Orders",
                    "done",
                    "SM-DP+ calls",
                    "achieved/s",
                    "share of the limit",
                    "busiest second",
                    "seconds over the limit",
                    "steps turned away",
                ],
                notes=[
                    "From the SM-DP+ simulator's own per-second counts; achieved: the full seconds between "
                    "the first and the last call."
                ],
            )
            table.add(
                r["limit"],
                r["orders"],
                r["done"],
                r["smdp_calls"],
                r["achieved_per_s"],
                f"{100 * r['share_of_limit']:.0f}%",
                r["busiest_second"],
                r["seconds_over_limit"],
                r["steps_turned_away"],
            )
            tables.append(table)
        if "outage" not in args.skip:
            with_b = outage(stack, args.outage_s, args.outage_orders, breakers=True)
            without = outage(stack, args.outage_s, args.outage_orders, breakers=False)
            share = with_b["whmcs_calls_during_outage"] / max(without["whmcs_calls_during_outage"], 1)
            data["outage"] = {"with": with_b, "without": without, "calls_share": share}
            table = Table(
                f"WHMCS answering 503 for {args.outage_s:.0f} s while {args.outage_orders} Orders flow",
                [
                    "breakers",
                    "WHMCS calls in the outage",
                    "Orders done",
                    "runs failed",
                    "WHMCS orders",
                    "settled after the outage, s",
                ],
                notes=[f"Calls with breakers ÷ calls without: {100 * share:.1f}%."],
            )
            for row in (with_b, without):
                table.add(
                    "on" if row["breakers"] else "off",
                    row["whmcs_calls_during_outage"],
                    row["done"],
                    row["failed"],
                    row["whmcs_orders"],
                    row["settled_after_outage_s"],
                )
            tables.append(table)
        emit("protection", args, info, tables, data)
    return 0


if __name__ == "__main__":
    run_main(main)
