"""The worker's consumer on RabbitMQ: two of Celery's bootsteps made for a cluster.

The remote-control queue is declared again while the cluster still holds the one of a
dead node's connection (``provisioning.core.remote_control``), and the delayed delivery
is set up once per cluster, as follows.

On quorum queues a countdown (a step's retry) goes through RabbitMQ's native delayed
delivery: exchanges and queues Celery's ``DelayedDelivery`` bootstep declares each time
the worker's consumer (re)connects. It does so on every URL of ``broker_url``, taking each
for a broker of its own, with three tries per URL, 1, 3 and 5 s apart. Our URL lists the
nodes of one cluster (docs/deployment.md), where what one node declares every node has:
with one node down, each reconnect spent about 17 s on the dead node before the worker
consumed again, and a worker started then waited as long (``tests/ha/test_rabbitmq_cluster.py``).
Here the setup is done once, on the node the consumer is connected to, or else on the
next node of the list that takes it; it waits and tries again only when no node does.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery

log = get_logger(__name__)

# Rounds over the cluster's nodes before the worker goes on without delayed delivery, and the
# wait between two rounds (no node took the setup: the cluster is down or has no quorum).
SETUP_ROUNDS = 3
ROUND_INTERVAL_S = 2.0
# Celery's steps and ours in their place.
OUR_STEPS = {
    "celery.worker.consumer.delayed_delivery:DelayedDelivery": (
        "provisioning.core.worker_consumer:ClusterDelayedDelivery"
    ),
    "celery.worker.consumer.control:Control": "provisioning.core.remote_control:PatientControl",
}


class ClusterDelayedDelivery(DelayedDelivery):  # type: ignore[misc]
    """Celery's bootstep, done on one node of the cluster instead of on each (module docstring)."""

    def start(self, c: Any) -> None:
        app = c.app
        try:
            self._validate_configuration(app)
        except ValueError as exc:
            log.critical("Configuration validation failed: %s", exc)
            raise
        urls = nearest_first(str(app.conf.broker_url), c.connection)
        for round_ in range(SETUP_ROUNDS):
            if round_:
                time.sleep(ROUND_INTERVAL_S)
            for url in urls:
                try:
                    self._setup_delayed_delivery(c, url)
                except Exception as exc:  # this node cannot take it now: the next one may
                    log.warning("Delayed delivery not set up through %s: %s", _where(url), exc)
                else:
                    return
        log.critical(
            "No node of the cluster set up the delayed delivery: a countdown retry cannot be sent until "
            "the worker reconnects"
        )


def nearest_first(broker_url: str, connection: Any) -> list[str]:
    """The broker's URLs in their order, the one ``connection`` is connected to first."""
    urls = [url for url in broker_url.split(";") if url.strip()]
    here = (getattr(connection, "hostname", None), getattr(connection, "port", None))
    current = [url for url in urls if (urlsplit(url).hostname, urlsplit(url).port) == here]
    return current[:1] + [url for url in urls if url not in current[:1]]


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with ``ClusterDelayedDelivery`` and ``PatientControl`` in place of Celery's steps."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [OUR_STEPS.get(step, step) for step in CeleryConsumer.Blueprint.default_steps]
