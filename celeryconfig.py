"""Celery settings, built from :class:`provisioning.core.settings.Settings`.

Delivery settings (docs/architecture.md; the reference design's Celery facts): late acks with reject on a
lost worker, so every task runs at least once (and every task is idempotent);
prefetch 1; events on for Flower; JSON only; the Redis visibility timeout set
above the longest retry delay.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Exchange, Queue

from provisioning.core.redis_client import SENTINEL_SOCKET_TIMEOUT_S
from provisioning.core.settings import Settings
from provisioning.runs.routing import step_queues

# The result backend, when one is configured, keeps results this long.
RESULT_EXPIRES_S = 24 * 3600
# How long a broker publish waits for a connection before it fails.
BROKER_CONNECT_TIMEOUT_S = 5.0
# Upper bound of the period of the Redis broker's sweep for unacked messages of dead workers.
UNACKED_RESTORE_INTERVAL_MAX_S = 10
# Broker socket timeout (Redis): a stuck connection fails instead of hanging a publish.
BROKER_SOCKET_TIMEOUT_S = 30.0


def build(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {}
    routes = step_queues(settings.celery_step_queues)
    names = [settings.celery_queue, *sorted(set(routes.values()) - {settings.celery_queue})]
    queues = [Queue(name) for name in names]
    extra: dict[str, Any] = {}
    if settings.broker_is_rabbitmq:
        # Publisher confirms: a publish returns only once RabbitMQ has the message (quorum queues
        # need them).
        transport["confirm_publish"] = True
        # A remote-control queue still held by a dead node's connection waited for, and the
        # delayed delivery (quorum queues) set up on one node of a cluster, not on each
        # (provisioning.core.worker_consumer).
        extra["worker_consumer"] = "provisioning.core.worker_consumer:Consumer"
        # py-amqp with the acks of a batch awaited once (see provisioning.core.broker).
        if settings.celery_broker_url.startswith("amqps://"):
            extra["broker_transport"] = "provisioning.core.broker:AmqpSSLTransport"
        elif settings.celery_broker_url.startswith(("amqp://", "pyamqp://")):
            extra["broker_transport"] = "provisioning.core.broker:AmqpTransport"
        if settings.celery_queue_type == "quorum":
            # A quorum queue refuses the global QoS that countdown retries relied on; Celery 5.5+
            # then uses per-consumer QoS and RabbitMQ's native delayed delivery for countdowns,
            # which needs a topic exchange (a direct one would make a retry block its worker).
            queues = [
                Queue(
                    name,
                    Exchange(name, type="topic"),
                    routing_key=name,
                    queue_arguments={"x-queue-type": "quorum"},
                )
                for name in names
            ]
            extra.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
    else:
        # kombu's Redis transport with one redis-py client per channel, and a lost connection closed
        # without stopping the worker (see provisioning.core.broker).
        if settings.celery_broker_url.startswith(("redis://", "rediss://")):
            extra["broker_transport"] = "provisioning.core.broker:Transport"
        transport.update(
            visibility_timeout=settings.celery_visibility_timeout_s,
            # Look for messages of dead workers every few seconds (kombu's default: about every
            # 100 s), so a redelivery comes soon after the visibility timeout, not minutes later.
            unacked_restore_interval=max(
                1, min(UNACKED_RESTORE_INTERVAL_MAX_S, settings.celery_visibility_timeout_s // 3)
            ),
            unacked_restore_throttle=1,
            socket_timeout=BROKER_SOCKET_TIMEOUT_S,
            socket_connect_timeout=BROKER_CONNECT_TIMEOUT_S,
            retry_on_timeout=True,
            health_check_interval=30,
        )
        if settings.broker_is_sentinel:
            # kombu's Sentinel transport asks the sentinels for the master on every (re)connection;
            # ours closes a lost connection without stopping the worker (provisioning.core.broker).
            extra["broker_transport"] = "provisioning.core.broker:SentinelTransport"
            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
                "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S,
            }
            if settings.redis_sentinel_password is not None:
                sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
            transport.update(master_name=settings.broker_sentinel_master, sentinel_kwargs=sentinel_kwargs)
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT_S,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": True,
        "task_send_sent_event": settings.celery_task_sent_events,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_default_queue": settings.celery_queue,
        "task_queues": tuple(queues),
        # A step or a system with a queue of its own (CELERY_STEP_QUEUES): provisioning.runs.routing.
        "task_routes": {task: {"queue": queue} for task, queue in routes.items()},
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
        **extra,
    }
    if settings.celery_result_backend:
        config.update(
            result_backend=settings.celery_result_backend,
            result_expires=RESULT_EXPIRES_S,
            result_backend_transport_options={"visibility_timeout": settings.celery_visibility_timeout_s},
            task_ignore_result=False,
        )
    else:
        config["task_ignore_result"] = True
    return config
