"""The reconciler's backfill: Orders left in Activating with no event are provisioned, once."""

from __future__ import annotations

import time

from provisioning.ledger import Origin, RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import effects_by_order, seed_orders, settled
from provisioning.sandbox.scenario import wait_until as wait_for


def test_orders_left_activating_without_an_event_are_provisioned_once_by_the_backfill(
    sandbox, stack_settings, services, workers, listeners
):
    fast = stack_settings.model_copy(
        update={
            "listener_health_port": 0,
            "listener_lock_ttl_s": 3,
            "reconcile_interval_s": 1,
            "reconcile_orders_interval_s": 2,
            "reconcile_orders_grace_s": 1,
        }
    )
    workers(fast, concurrency=4)
    # One Order provisioned by its event, then set back to Activating with no event: repaired.
    (repaired,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=51)
    publish_run(make_publisher(fast), repaired.run_id)
    wait_for(settled(sandbox, services.ledger, [repaired.order_id]))
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{repaired.order_id}", {"activation_status": "Activating"}
    )
    # And Orders whose event never came.
    orphans = seed_orders(sandbox, services.inventory, count=3, esim_share=0.5, seed=52)
    ids = [o.order_id for o in [repaired, *orphans]]

    started = time.monotonic()
    listeners(fast)
    listeners(fast, wait="standby")  # a second replica must not double anything
    wait_for(lambda: all(services.ledger.orders.runs(o.order_id) for o in orphans))
    wait_for(settled(sandbox, services.ledger, ids))
    waited_s = time.monotonic() - started
    print(
        f"backfill: {len(orphans)} Orders with no event Activated {waited_s:.1f} s after the listener started"
    )
    # Within the interval plus the grace period (and the time to run the chain), with margin for CI.
    assert waited_s < 60

    effects = effects_by_order(sandbox)
    assert all(not effects[oid].problems() for oid in ids), {oid: effects[oid].problems() for oid in ids}
    for o in orphans:
        (run_id,) = services.ledger.orders.runs(o.order_id)
        run = services.ledger.runs.get(run_id)
        assert run.origin is Origin.RECONCILER
        assert run.state is RunState.DONE
        assert run_id.idem_key.startswith("backfill-")
    runs = [services.ledger.runs.get(r) for r in services.ledger.orders.runs(repaired.order_id)]
    assert [r.origin for r in runs] == [Origin.EVENT, Origin.RECONCILER]
    assert runs[1].state is RunState.DONE
    assert "no effect is made twice" in runs[1].note
    assert effects[repaired.order_id].emails == 1
    # Further sweeps find nothing to do: still one run per orphan.
    time.sleep(3)
    assert all(len(services.ledger.orders.runs(o.order_id)) == 1 for o in orphans)


def test_the_backfill_skips_its_query_while_the_orgs_api_allowance_is_nearly_spent(sandbox, services):
    from provisioning.runs.reconciler import backfill_orders

    orphans = seed_orders(sandbox, services.inventory, count=2, esim_share=0.0, seed=53)
    app = make_publisher(services.settings)
    sandbox.admin("salesforce").post("/__admin/calls/reset")
    services.ledger.limits.record_api_usage(14_000, 15_000)  # 93 %: past SF_API_BACKFILL_MAX_SHARE=0.9
    assert backfill_orders(services, app, grace_s=0) == []
    assert sandbox.admin("salesforce").get("/__admin/calls")["calls"].get("query", 0) == 0
    counters = services.ledger.metrics.parse(_read_counters(services)).counter("reconciler_actions")
    assert counters[(("action", "backfill_skipped"),)] == 1
    # Below it again, the sweep asks Salesforce and starts their runs.
    services.ledger.limits.record_api_usage(10_000, 15_000)
    started = backfill_orders(services, app, grace_s=-60)  # any Order modified before a minute from now
    assert {r.order_id for r in started} == {o.order_id for o in orphans}


def _read_counters(services):
    pipe = services.redis.pipeline()
    services.ledger.metrics.read_commands(pipe)
    return pipe.execute()
