"""Broker messages lost on their way, as the chaos run found them: each run still ends done, once.

On a Redis broker, a worker killed between its BRPOP and the write of its unacked
record loses the message it just popped (kombu does the two in separate calls);
the visibility timeout cannot bring it back. Deleting the queue stands in for that.
"""

from __future__ import annotations

import redis

from provisioning.ledger import RunState
from provisioning.sandbox.scenario import count_effects, event_payload, publish_events_admin, seed_orders
from provisioning.sandbox.scenario import wait_until as wait_for


def _state(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run.state if run is not None else None


def test_a_runs_chain_lost_after_the_listener_published_it_is_republished_by_the_reconciler(
    sandbox, stack_settings, services, workers, listeners
):
    settings = stack_settings.model_copy(
        update={"listener_lock_ttl_s": 3, "reconcile_interval_s": 1, "reconcile_idle_s": 3}
    )
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
    listener = listeners(settings)
    publish_events_admin(sandbox, [event_payload(order)])
    # The batch is handled: its run published, then the checkpoint written (the log line comes last).
    listener.wait_for_log(order.run_id, 30)
    broker = redis.Redis.from_url(settings.celery_broker_url)
    try:
        # The run's only message (its chain) is gone; the event is already checkpointed.
        assert broker.delete(settings.celery_queue) == 1
    finally:
        broker.close()
    assert _state(services, order.run_id) is RunState.QUEUED

    workers(settings, concurrency=2)
    wait_for(lambda: _state(services, order.run_id) is RunState.DONE, timeout_s=60)
    effects = count_effects(sandbox)
    assert effects.activated == 1
    assert effects.whmcs_orders == 1
    assert effects.emails == 1
    assert services.ledger.registries.unfinished() == 0


def test_a_run_skipped_because_its_order_is_not_activating_leaves_nothing_for_the_reconciler(
    sandbox, stack_settings, services, workers, listeners
):
    settings = stack_settings.model_copy(
        update={"listener_lock_ttl_s": 3, "reconcile_interval_s": 1, "reconcile_idle_s": 3}
    )
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0)
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{order.order_id}", {"Activation_Status__c": "Activated"}
    )
    workers(settings, concurrency=2)
    listeners(settings)
    publish_events_admin(sandbox, [event_payload(order)])
    wait_for(lambda: _state(services, order.run_id) is RunState.SKIPPED, timeout_s=30)
    assert services.ledger.registries.unfinished() == 0
    assert count_effects(sandbox).whmcs_orders == 0


def test_an_event_whose_run_is_still_queued_is_published_again_without_waiting_for_the_reconciler(
    sandbox, stack_settings, services, workers, listeners
):
    settings = stack_settings.model_copy(update={"listener_lock_ttl_s": 3, "reconcile_idle_s": 3600})
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0)
    # A listener died after recording the run as queued and before publishing its task.
    assert services.ledger.runs.enqueue(order.run_id)
    workers(settings, concurrency=2)
    listeners(settings)
    publish_events_admin(sandbox, [event_payload(order)])
    wait_for(lambda: _state(services, order.run_id) is RunState.DONE, timeout_s=60)
    assert count_effects(sandbox).whmcs_orders == 1
