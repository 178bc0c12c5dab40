"""A worker given a cluster's URLs with one node down sets up the delayed delivery on a live node at once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from provisioning.core.settings import Settings
from provisioning.core.worker_consumer import nearest_first
from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.runs.services import Services
from provisioning.sandbox.processes import ManagedProcess
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import count_effects, seed_orders, wait_until

# Nothing listens there: a node of the list that is down (connections refused at once).
DEAD_NODE = "amqp://guest:guest@127.0.0.1:1//"


@pytest.mark.rabbitmq
def test_with_a_dead_node_first_in_the_list_a_countdown_retry_goes_through_the_delayed_delivery_of_a_live_one(
    sandbox: Sandbox,
    rabbit_settings: Settings,
    services: Services,
    workers: Callable[..., ManagedProcess],
) -> None:
    settings = rabbit_settings.model_copy(
        update={"celery_broker_url": f"{DEAD_NODE};{rabbit_settings.celery_broker_url}"}
    )
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, seed=3)
    # The payment check fails once: its retry is a countdown, sent through the delayed delivery.
    sandbox.admin("whmcs").post("/__admin/faults", {"force": {"GetPayMethods": ["error"]}})
    worker = workers(settings, concurrency=2)
    publish_run(make_publisher(settings), order.run_id)

    def done() -> bool:
        run = services.ledger.runs.get(order.run_id)
        return run is not None and run.state is RunState.DONE

    wait_until(done, timeout_s=120)
    assert count_effects(sandbox).whmcs_orders == 1
    log = worker.log_text()
    assert log.count('"step_retry"') == 1
    # Set up on the live node; Celery's own step tried the dead one three times, seconds apart.
    assert "Retrying delayed delivery setup" not in log
    assert "No node of the cluster set up the delayed delivery" not in log


class _Connected:
    hostname = "10.0.0.11"
    port = 5672


def test_the_node_the_consumer_is_connected_to_is_tried_first_then_the_others_in_order() -> None:
    urls = "amqp://u:p@10.0.0.10:5672//;amqp://u:p@10.0.0.11:5672//;amqp://u:p@10.0.0.12:5672//"
    assert nearest_first(urls, _Connected()) == [
        "amqp://u:p@10.0.0.11:5672//",
        "amqp://u:p@10.0.0.10:5672//",
        "amqp://u:p@10.0.0.12:5672//",
    ]
    assert nearest_first(urls, None) == urls.split(";")
