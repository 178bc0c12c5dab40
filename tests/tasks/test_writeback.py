"""The failure write-back's short schedule, for real: a worker process, the Salesforce simulator refusing.

A run fails (its WHMCS client has no pay method); the simulator refuses the PATCH that would show the
failure on the Order three times (503 SERVER_UNAVAILABLE, its admin API's forced faults), then accepts
it. No listener runs, so no reconciler: only the ``provisioning.write_failure_on_order`` task can get
the failure onto the Order, and with the production schedule (FAILURE_WRITEBACK_* defaults) it must
within a minute, writing it once.
"""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry

from provisioning.ledger import RunState
from provisioning.ops.exporter import LedgerCollector
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import seed_orders, wait_until

REFUSALS = 3


def _sf_order(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def _log_events(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in events if isinstance(e, dict)]


def test_a_failure_salesforce_refused_three_times_is_on_the_order_within_a_minute_without_the_reconciler(
    sandbox, stack_settings, services, workers
):
    # The production schedule: its cap is not shortened by the tests' short visibility timeout.
    settings = stack_settings.model_copy(update={"celery_visibility_timeout_s": 3600})
    assert settings.failure_writeback_tries == 6
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, without_pay_method=1)
    salesforce = sandbox.admin("salesforce")
    salesforce.post("/__admin/faults", {"force": {"order_patch": ["error"] * REFUSALS}})
    salesforce.post("/__admin/calls/reset", {})
    registry = CollectorRegistry()
    registry.register(LedgerCollector(services))
    worker = workers(settings, concurrency=2)

    started = time.monotonic()
    publish_run(make_publisher(settings), order.run_id)
    wait_until(lambda: "failure_writeback_retry" in worker.log_text(), timeout_s=60)
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Activating"
    assert registry.get_sample_value("provisioning_failure_writebacks_pending") == 1

    wait_until(lambda: _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Failed", timeout_s=60)
    took = time.monotonic() - started
    assert took < 60

    view = _sf_order(sandbox, order.order_id)
    assert view["Activation_Error__c"].startswith("validate_payment: no valid payment method")
    # Written once: four PATCHes reached Salesforce, three refused, one applied.
    assert [p["source"] for p in view["patches"]].count("api") == 1
    assert salesforce.get("/__admin/calls")["calls"]["order_patch"] == REFUSALS + 1
    run = services.ledger.runs.get(order.run_id)
    assert run is not None
    assert run.state is RunState.FAILED
    assert services.ledger.registries.pending_writebacks(0) == []

    events = _log_events(worker.log_text())
    retries = [e for e in events if e.get("event") == "failure_writeback_retry"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert all(0 <= e["countdown_s"] <= 2.0 * 2**i for i, e in enumerate(retries))
    written = [e for e in events if e.get("event") == "failure_writeback_written"]
    assert [e["attempt"] for e in written] == [REFUSALS + 1]
    assert not [e for e in events if e.get("event") == "order_writeback_failed"]

    assert registry.get_sample_value("provisioning_failure_writebacks_pending") == 0
    total = "provisioning_failure_writebacks_total"
    assert registry.get_sample_value(total, {"outcome": "retried"}) == REFUSALS
    assert registry.get_sample_value(total, {"outcome": "written"}) == 1
    assert registry.get_sample_value(total, {"outcome": "given_up"}) == 0
    assert registry.get_sample_value("provisioning_reconciler_actions_total", {"action": "writeback"}) == 0
    print(f"failure on the Order {took:.1f} s after the run was published, {REFUSALS} refusals")
