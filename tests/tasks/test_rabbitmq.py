"""The same chain with RabbitMQ as the broker: the broker URL decides, nothing else changes."""

from __future__ import annotations

import pytest
from amqp.exceptions import PreconditionFailed
from kombu.connection import Connection

from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, seed_orders
from provisioning.sandbox.scenario import wait_until as wait_for

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"

pytestmark = pytest.mark.rabbitmq


def _done(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run is not None and run.state is RunState.DONE


def test_the_happy_path_runs_on_a_quorum_queue_with_countdown_retries_of_the_first_step_and_a_later_one(
    sandbox, rabbit_settings, services, workers
):
    orders = seed_orders(sandbox, services.inventory, count=3, esim_share=0.5, seed=5)
    # Each Order's first payment check fails transiently: its retry is a countdown, which a quorum
    # queue delivers through RabbitMQ's native delayed delivery. Each Order's AddOrder fails once
    # too: that later step is sent as a task of its own, with its countdown, the same way.
    sandbox.admin("whmcs").post(
        "/__admin/faults", {"force": {"GetPayMethods": ["error"] * 3, "AddOrder": ["error"] * 3}}
    )
    worker = workers(rabbit_settings, concurrency=4)
    app = make_publisher(rabbit_settings)
    assert app.conf.broker_transport_options["confirm_publish"] is True
    for o in orders:
        publish_run(app, o.run_id)
    wait_for(lambda: all(_done(services, o.run_id) for o in orders))
    effects = count_effects(sandbox)
    assert effects.activated == effects.whmcs_orders == effects.emails == 3
    assert sandbox.admin("whmcs").get("/__admin/calls")["injected"] == {
        "GetPayMethods:error": 3,
        "AddOrder:error": 3,
    }
    log = worker.log_text()
    assert log.count('"step_retry"') == 6
    assert log.count("Task provisioning.create_whmcs_order[") >= 3
    assert "Direct exchanges are not supported" not in log
    # The queue is a quorum queue: declaring it as a classic one is refused.
    with Connection(RABBITMQ_URL) as conn, pytest.raises(PreconditionFailed, match="x-queue-type"):
        conn.channel().queue_declare(rabbit_settings.celery_queue, durable=True, auto_delete=False)


def test_a_worker_killed_mid_step_on_rabbitmq_is_redelivered_and_completes_once(
    sandbox, rabbit_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
    sandbox.admin("whmcs").post("/__admin/faults", {"latency_ms": 1500, "operations": ["AddOrder"]})
    victim = workers(rabbit_settings, name="victim", concurrency=2)
    publish_run(make_publisher(rabbit_settings), order.run_id)
    wait_for(
        lambda: sandbox.admin("whmcs").get("/__admin/calls")["calls"].get("AddOrder", 0) >= 1, timeout_s=60
    )
    victim.kill()
    sandbox.admin("whmcs").post("/__admin/faults", {})
    workers(rabbit_settings, name="rescuer", concurrency=2)
    wait_for(lambda: _done(services, order.run_id), timeout_s=120)
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == 1
    assert effects.esim_confirmed == 1
    assert effects.emails == 1
