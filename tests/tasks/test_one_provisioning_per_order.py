"""The Order is the unit of exactly-once: whatever the events, keys and workers, one provisioning per Order.

Real listener and worker processes on real Redis, against the sandbox; effects are
counted per Order from the simulators' own records.
"""

from __future__ import annotations

import pytest

from provisioning.ledger import RunState
from provisioning.sandbox.scenario import effects_by_order, publish_events_admin, seed_orders, settled
from provisioning.sandbox.scenario import wait_until as wait_for

PAIRS = {
    "two keys": ("approval-1", "approval-2"),
    "a key and no key": ("approval-1", None),
}


def _payload(order_id, key):
    return {"OrderId__c": order_id, **({"IdemKey__c": key} if key is not None else {})}


def _assert_provisioned_once(sandbox, orders):
    effects = effects_by_order(sandbox)
    problems = {o.order_id: effects[o.order_id].problems() for o in orders}
    assert all(not p for p in problems.values()), problems
    for o in orders:
        assert effects[o.order_id].esim_profiles == (1 if o.esim else 0)
    return effects


def _state(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run.state if run is not None else None


def _status(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")["Activation_Status__c"]


def _runs(services, order_id):
    return [services.ledger.runs.get(r) for r in services.ledger.orders.runs(order_id)]


def _ended(runs, count):
    return len(runs) == count and all(r is not None and not r.state.unfinished for r in runs)


@pytest.mark.parametrize("worker_count", [1, 2], ids=["one worker", "two workers"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_two_events_of_one_order_published_together_provision_it_once(
    sandbox, stack_settings, services, workers, listeners, pair, worker_count
):
    orders = seed_orders(sandbox, services.inventory, count=4, esim_share=0.5, seed=21)
    for n in range(worker_count):
        workers(name=f"w{n + 1}", concurrency=4)
    listeners(stack_settings.model_copy(update={"listener_health_port": 0}))
    first, second = PAIRS[pair]
    publish_events_admin(
        sandbox, [p for o in orders for p in (_payload(o.order_id, first), _payload(o.order_id, second))]
    )

    wait_for(settled(sandbox, services.ledger, [o.order_id for o in orders]))
    # The second event's run may be recorded after the first run settled (another batch): wait for
    # both runs of every Order, and for both to have ended.
    wait_for(lambda: all(_ended(_runs(services, o.order_id), 2) for o in orders))
    _assert_provisioned_once(sandbox, orders)
    for o in orders:
        runs = _runs(services, o.order_id)
        states = sorted(r.state.value for r in runs)
        # The second run joined the first while it worked, or found the Order already Activated.
        assert states in (["done", "joined"], ["done", "skipped"]), states
        other = next(r for r in runs if r.state is not RunState.DONE)
        assert other.note is not None
        assert "joined run" in other.note or "'Activated', not 'Activating'" in other.note


def test_a_re_approval_after_activated_writes_the_order_back_with_the_same_effects(
    sandbox, stack_settings, services, workers, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=2, esim_share=0.5, seed=22)
    workers(concurrency=4)
    listeners(stack_settings.model_copy(update={"listener_health_port": 0}))
    publish_events_admin(sandbox, [_payload(o.order_id, "approval-1") for o in orders])
    ids = [o.order_id for o in orders]
    wait_for(settled(sandbox, services.ledger, ids))
    before = _assert_provisioned_once(sandbox, orders)

    salesforce = sandbox.admin("salesforce")
    for o in orders:
        salesforce.patch(f"/__admin/orders/{o.order_id}", {"activation_status": "Activating"})
    publish_events_admin(sandbox, [_payload(o.order_id, "approval-2") for o in orders])
    wait_for(lambda: all(len(_runs(services, oid)) == 2 for oid in ids))
    wait_for(settled(sandbox, services.ledger, ids))

    after = _assert_provisioned_once(sandbox, orders)
    for o in orders:
        assert after[o.order_id].whmcs_orders == before[o.order_id].whmcs_orders
        assert after[o.order_id].message_ids == before[o.order_id].message_ids
        assert after[o.order_id].emails == 1
        # Two write-backs, each Activated with the same ids and the same activation time.
        activated = [p for p in after[o.order_id].patches if p.get("Activation_Status__c") == "Activated"]
        assert len(activated) == 2
        assert activated[0] == activated[1]
        second = services.ledger.runs.get(f"{o.order_id}:approval-2")
        assert second.state is RunState.DONE
        assert "no effect is made twice" in second.note


def test_a_re_approval_after_a_failed_run_continues_where_it_stopped(
    sandbox, stack_settings, services, workers, listeners
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=23)
    # No retries: one refused write of the Order ends the first run failed at update_salesforce,
    # after the WHMCS order and the eSIM exist.
    strict = stack_settings.model_copy(update={"task_max_retries": 0, "listener_health_port": 0})
    sandbox.admin("salesforce").post("/__admin/faults", {"force": {"order_patch": ["error"]}})
    workers(strict, concurrency=4)
    listeners(strict)
    publish_events_admin(sandbox, [_payload(order.order_id, "approval-1")])
    wait_for(lambda: _state(services, order.run_id) is RunState.FAILED)
    assert services.ledger.runs.get(order.run_id).failed_step == "update_salesforce"
    wait_for(lambda: _status(sandbox, order.order_id) == "Failed")

    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{order.order_id}", {"activation_status": "Activating"}
    )
    publish_events_admin(sandbox, [_payload(order.order_id, "approval-2")])
    wait_for(lambda: len(_runs(services, order.order_id)) == 2)
    wait_for(settled(sandbox, services.ledger, [order.order_id]))

    _assert_provisioned_once(sandbox, [order])
    assert sandbox.admin("whmcs").get("/__admin/calls")["calls"].get("AddOrder") == 1
    assert sandbox.admin("smdp").get("/__admin/calls")["calls"].get("downloadOrder") == 1
    first = services.ledger.runs.get(order.run_id)
    assert first.state is RunState.SUPERSEDED
    assert first.superseded_by == f"{order.order_id}:approval-2"
    assert services.ledger.registries.failed() == []
    second = services.ledger.runs.get(f"{order.order_id}:approval-2")
    assert second.state is RunState.DONE
    # It did only what was missing (the write-back and the e-mail): no second payment check either.
    assert second.own_steps["update_salesforce"].attempts == 1
    assert sandbox.admin("whmcs").get("/__admin/calls")["calls"].get("GetPayMethods") == 1
