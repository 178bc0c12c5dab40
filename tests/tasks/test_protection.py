"""The external systems protected across real worker processes: one rate limit, one circuit breaker."""

from __future__ import annotations

import time

from provisioning.ledger import RunState
from provisioning.ledger.limits import BreakerState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, seed_orders, settled
from provisioning.sandbox.scenario import wait_until as wait_for

SMDP_LIMIT = 6  # calls per second, for both workers together


def _calls(sandbox, sim: str) -> dict:
    return sandbox.admin(sim).get("/__admin/calls")


def test_two_worker_processes_share_one_rate_limit_and_no_second_goes_over_it(
    sandbox, stack_settings, services, workers
):
    settings = stack_settings.model_copy(update={"rate_limit_smdp": f"{SMDP_LIMIT}/s"})
    orders = seed_orders(sandbox, services.inventory, count=24, esim_share=1.0, seed=41)
    sandbox.admin("smdp").post(
        "/__admin/faults", {"latency_ms": 100, "operations": ["downloadOrder", "confirmOrder"]}
    )
    sandbox.admin("smdp").post("/__admin/calls/reset")
    workers(settings, name="w1", concurrency=8)
    workers(settings, name="w2", concurrency=8)
    publisher = make_publisher(settings)
    for o in orders:
        publish_run(publisher, o.run_id)
    wait_for(settled(sandbox, services.ledger, [o.order_id for o in orders]), timeout_s=180)
    per_second = _calls(sandbox, "smdp")["per_second"]
    assert max(per_second.values()) <= SMDP_LIMIT, per_second
    # The limit bound the calls (48 of them, over 8 s at least), and every Order went through once.
    assert len(per_second) >= 48 // SMDP_LIMIT
    effects = count_effects(sandbox)
    assert effects.esim_confirmed == len(orders)
    assert all(services.ledger.runs.get(o.run_id).state is RunState.DONE for o in orders)


def test_a_whmcs_outage_opens_the_circuit_for_every_worker_and_no_run_fails_by_it(
    sandbox, stack_settings, services, workers
):
    settings = stack_settings.model_copy(
        update={"breaker_failures": 3, "breaker_cooldown_s": 2.0, "breaker_cooldown_max_s": 4.0}
    )
    orders = seed_orders(sandbox, services.inventory, count=16, esim_share=0.0, seed=42)
    workers(settings, name="w1", concurrency=4)
    workers(settings, name="w2", concurrency=4)
    # WHMCS answers 503 to everything for 10 s.
    sandbox.admin("whmcs").post("/__admin/faults", {"error_rate": 1.0, "error_status": 503})
    sandbox.admin("whmcs").post("/__admin/calls/reset")
    publisher = make_publisher(settings)
    for o in orders:
        publish_run(publisher, o.run_id)
    wait_for(lambda: services.ledger.limits.breakers(["whmcs"])[0].state is BreakerState.OPEN, timeout_s=30)
    time.sleep(10)
    during = _calls(sandbox, "whmcs")["total"]
    sandbox.admin("whmcs").post("/__admin/faults", {})
    wait_for(settled(sandbox, services.ledger, [o.order_id for o in orders]), timeout_s=180)
    # Without the breaker, 16 runs each retrying with TASK_RETRY_BACKOFF_S=0.2..2 s for 10 s would call
    # WHMCS about 16 x 8 times; with it, the failures that opened it (what was in flight), then a
    # probe every cool-down.
    assert during <= 3 + 8 + 10, during
    assert all(services.ledger.runs.get(o.run_id).state is RunState.DONE for o in orders)
    assert services.ledger.registries.failed() == []
    assert count_effects(sandbox).whmcs_orders == len(orders)
    assert services.ledger.limits.breakers(["whmcs"])[0].state is BreakerState.CLOSED
