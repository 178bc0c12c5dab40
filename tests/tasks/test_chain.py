"""The provisioning chain end to end: real Redis, real worker processes, the sandbox simulators."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter

from provisioning.esim.client import matching_id_for
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, seed_orders, settled
from provisioning.sandbox.scenario import wait_until as wait_for


def _order(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def _finished(sandbox, services, order_ids):
    return settled(sandbox, services.ledger, order_ids)


def _run_esim_and_physical(sandbox, stack_settings, services, workers, *, count, seed):
    """Seed ``count`` Orders of both kinds, run them on one worker, wait until every one settled."""
    orders = seed_orders(sandbox, services.inventory, count=count, esim_share=0.5, seed=seed)
    assert {o.esim for o in orders} == {True, False}
    worker = workers(concurrency=count)
    app = make_publisher(stack_settings)
    for o in orders:
        publish_run(app, o.run_id)
    wait_for(_finished(sandbox, services, [o.order_id for o in orders]))
    return orders, worker


def test_esim_and_physical_orders_end_activated_with_one_effect_each(
    sandbox, stack_settings, services, workers
):
    orders, worker = _run_esim_and_physical(sandbox, stack_settings, services, workers, count=4, seed=3)

    for o in orders:
        record = _order(sandbox, o.order_id)
        assert record["Activation_Status__c"] == "Activated", record
        assert record["WHMCS_Order_ID__c"]
        assert bool(record["ESIM_ICCID__c"]) == o.esim
        run = services.ledger.runs.get(o.run_id)
        assert run is not None
        assert run.state is RunState.DONE
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == effects.whmcs_accepted == 4
    assert set(effects.whmcs_orders_per_order) == {o.order_id for o in orders}
    assert effects.duplicate_whmcs_orders == 0
    assert effects.emails == effects.distinct_message_ids == 4
    assert effects.esim_confirmed == sum(o.esim for o in orders)
    assert effects.esim_reserved_unconfirmed == 0
    # Each eSIM customer's e-mail carries the activation code of the profile confirmed for the run.
    smtp = sandbox.admin("smtp")
    raw = [
        smtp.session.get(f"{smtp.base_url}/__admin/messages/{m['id']}", timeout=10).text
        for m in smtp.get("/__admin/messages")["messages"]
    ]
    for o in orders:
        code = f"LPA:1$smdp.sandbox.local${matching_id_for(o.order_id)}"
        assert sum(code in text for text in raw) == (1 if o.esim else 0)
    # The worker's log names runs and Orders, never the customer, a secret or an activation code.
    log = worker.log_text()
    assert all(o.run_id in log for o in orders)
    secrets = [
        stack_settings.whmcs_secret.get_secret_value(),
        stack_settings.whmcs_identifier.get_secret_value(),
    ]
    for forbidden in ["@example.test", "Customer0", "LPA:1$", *secrets]:
        assert forbidden not in log


def test_a_successful_run_costs_exactly_two_salesforce_api_calls(sandbox, stack_settings, services, workers):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
    sandbox.admin("salesforce").post("/__admin/calls/reset")
    workers(concurrency=2)
    publish_run(make_publisher(stack_settings), order.run_id)
    wait_for(_finished(sandbox, services, [order.order_id]))
    calls = sandbox.admin("salesforce").get("/__admin/calls")["calls"]
    api_calls = {k: v for k, v in calls.items() if k != "token"}
    assert sum(api_calls.values()) == 2, calls


def test_a_run_is_a_chain_of_step_tasks_and_a_physical_sims_run_sends_no_esim_task(
    sandbox, stack_settings, services, workers
):
    orders, worker = _run_esim_and_physical(sandbox, stack_settings, services, workers, count=2, seed=8)

    received = re.findall(r"Task (provisioning\.\w+)\[[^\]]+\] received", worker.log_text())
    # One task per step, named after it: the eSIM Order's five, the physical SIM's four.
    assert Counter(received) == {
        "provisioning.validate_payment": 2,
        "provisioning.activate_esim": 1,
        "provisioning.create_whmcs_order": 2,
        "provisioning.update_salesforce": 2,
        "provisioning.send_email": 2,
    }
    for o in orders:
        run = services.ledger.runs.get(o.run_id)
        assert run is not None
        assert run.state is RunState.DONE
        provisioning = services.ledger.orders.provisioning(o.order_id)
        assert all(CHAIN.record(run, provisioning, spec).done for spec in CHAIN)


def test_the_same_run_submitted_three_times_at_once_has_each_effect_once(
    sandbox, stack_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
    workers(concurrency=8)
    app = make_publisher(stack_settings)
    threads = [threading.Thread(target=publish_run, args=(app, order.run_id)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(_finished(sandbox, services, [order.order_id]))
    wait_for(lambda: services.ledger.runs.get(order.run_id).state is RunState.DONE)
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == 1
    assert effects.esim_confirmed == 1
    assert effects.emails == 1


def test_a_client_without_a_pay_method_fails_the_order_with_a_reason_and_nothing_after_runs(
    sandbox, stack_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, without_pay_method=1)
    worker = workers(concurrency=2)
    publish_run(make_publisher(stack_settings), order.run_id)
    wait_for(_finished(sandbox, services, [order.order_id]))
    # An expected end: one structured warning line with the run, the Order, the step and the reason;
    # Celery's own line says "raised expected", and no traceback is logged.
    wait_for(lambda: "raised expected" in worker.log_text())
    failed_lines = [line for line in worker.log_text().splitlines() if '"run_failed"' in line]
    assert len(failed_lines) == 1
    line = json.loads(failed_lines[0])
    assert line["level"] == "warning"
    assert (line["run_id"], line["order_id"], line["step"]) == (
        order.run_id,
        order.order_id,
        "validate_payment",
    )
    assert "no valid payment method" in line["reason"]
    assert "Traceback" not in worker.log_text()
    record = _order(sandbox, order.order_id)
    assert record["Activation_Status__c"] == "Failed"
    assert "no valid payment method" in record["Activation_Error__c"]
    run = services.ledger.runs.get(order.run_id)
    assert run.state is RunState.FAILED
    assert run.failed_step == "validate_payment"
    assert [str(r.run_id) for r in services.ledger.registries.failed()] == [order.run_id]
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == 0
    assert effects.esim_confirmed == 0
    assert effects.emails == 0


def test_an_order_that_is_not_activating_is_left_alone_and_the_log_says_why(
    sandbox, stack_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1)
    sandbox.admin("salesforce").patch(f"/__admin/orders/{order.order_id}", {"activation_status": "Activated"})
    worker = workers(concurrency=2)
    publish_run(make_publisher(stack_settings), order.run_id)
    wait_for(lambda: services.ledger.runs.get(order.run_id) is not None)
    run = services.ledger.runs.get(order.run_id)
    assert run.state is RunState.SKIPPED
    assert "not 'Activating'" in run.note
    wait_for(lambda: "order_not_activating" in worker.log_text())
    assert count_effects(sandbox).whmcs_orders == 0
