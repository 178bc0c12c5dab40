"""A failed run whose "Failed" never reached the Order, as the chaos run found it: the reconciler writes it."""

from __future__ import annotations

from provisioning.ledger import RunState
from provisioning.sandbox.scenario import event_payload, publish_events_admin, seed_orders
from provisioning.sandbox.scenario import wait_until as wait_for


def _status(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def test_a_failure_salesforce_refused_to_record_is_written_on_the_order_by_the_reconciler(
    sandbox, stack_settings, services, workers, listeners
):
    # The worker's short schedule (two tries here) gives up first; then the reconciler has the run.
    settings = stack_settings.model_copy(
        update={
            "listener_lock_ttl_s": 3,
            "reconcile_interval_s": 1,
            "reconcile_idle_s": 2,
            "failure_writeback_tries": 2,
            "failure_writeback_backoff_s": 0.2,
        }
    )
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, without_pay_method=1)
    # Every PATCH of the Order fails while the run fails: its write-back's schedule gives up.
    sandbox.admin("salesforce").post("/__admin/faults", {"error_rate": 1.0, "operations": ["order_patch"]})
    worker = workers(settings, concurrency=2)
    listeners(settings)
    publish_events_admin(sandbox, [event_payload(order)])
    wait_for(lambda: "order_writeback_failed" in worker.log_text(), timeout_s=60)
    run = services.ledger.runs.get(order.run_id)
    assert run is not None
    assert run.state is RunState.FAILED
    assert _status(sandbox, order.order_id)["Activation_Status__c"] == "Activating"

    sandbox.admin("salesforce").post("/__admin/faults", {})
    wait_for(lambda: _status(sandbox, order.order_id)["Activation_Status__c"] == "Failed", timeout_s=30)
    record = _status(sandbox, order.order_id)
    assert record["Activation_Error__c"].startswith("validate_payment: no valid payment method")
    assert services.ledger.registries.pending_writebacks(0) == []
