"""A worker's remote-control queue, declared again while RabbitMQ still holds its old one.

Celery's remote control (``celery inspect``, Flower's worker pages and buttons) reads a
queue named after the worker, ``<hostname>.celery.pidbox``, which kombu declares
*exclusive* (only the declaring connection may use it; it goes with that connection)
every time the worker's consumer connects. When the RabbitMQ node a worker is connected
to dies, the worker reconnects to another node of the cluster within milliseconds, and
there the old connection's queue may still be on record: the surviving nodes drop a
dead node's exclusive queues once they learn it is down, soon after a crash (its
sockets close), up to ``net_ticktime`` (60 s by default) after a host is cut off.
Until then the declare is refused, ``RESOURCE_LOCKED``, a channel error that Celery's
consumer does not count as a lost connection: the worker stopped ("Unrecoverable
error", exit 1), with its prefetched tasks (``tests/ha/test_rabbitmq_cluster.py`` in
CI on 2026-12-06, a worker's node killed as the queue's leader).

Here the declare is tried again on a new channel, waits drawn by the one backoff
formula (``provisioning.core.backoff``), for up to ``LOCKED_WAIT_MAX_S``: longer than
the cluster takes to forget a lost node. Past that a *live* connection holds the
queue, which is a second worker started with the same ``--hostname``; the worker
stops and says so. Celery's ``worker_consumer`` setting puts this step in place of
its own for every RabbitMQ broker (``provisioning.core.worker_consumer``); Redis has
no exclusive queues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from amqp.exceptions import ResourceLocked
from celery.worker.consumer.control import Control
from celery.worker.pidbox import Pidbox
from celery.worker.state import maybe_shutdown

from provisioning.core.backoff import backoff_s
from provisioning.core.logs import get_logger

log = get_logger(__name__)

# How long a locked remote-control queue is waited for: RabbitMQ's default net_ticktime
# (60 s; a cut-off node is declared down 45 to 75 s after its last word) with room to spare.
LOCKED_WAIT_MAX_S = 120.0
# The backoff between two declares: from half a second, doubling, never above five.
LOCKED_BASE_S = 0.5
LOCKED_CAP_S = 5.0
# How often a wait looks whether the worker was told to stop (SIGTERM, SIGQUIT).
STOP_CHECK_S = 0.25
# What the operator is told when the queue stays held.
DUPLICATE_HOSTNAME = (
    "another live connection holds this worker's remote-control queue: a second worker started "
    "with the same --hostname; give each worker a name of its own (worker1@%h, worker2@%h; "
    "$POD_NAME@%h on Kubernetes)"
)


def declare_when_free(
    declare: Callable[[], None],
    *,
    queue: str,
    max_wait_s: float = LOCKED_WAIT_MAX_S,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Call ``declare`` until RabbitMQ stops refusing it as locked; how many calls it took.

    Each refusal is logged with the wait before the next call; after ``max_wait_s`` the
    last refusal is raised, logged as critical with what to do.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            declare()
        except ResourceLocked:
            waited_s = time.monotonic() - started
            if waited_s >= max_wait_s:
                log.critical(
                    "remote_control_queue_held",
                    queue=queue,
                    waited_s=round(waited_s, 1),
                    action=DUPLICATE_HOSTNAME,
                )
                raise
            wait_s = min(backoff_s(attempt, base_s=LOCKED_BASE_S, cap_s=LOCKED_CAP_S), max_wait_s - waited_s)
            log.warning(
                "remote_control_queue_locked",
                queue=queue,
                attempt=attempt + 1,
                waited_s=round(waited_s, 1),
                retry_in_s=round(wait_s, 2),
            )
            sleep(wait_s)
            attempt += 1
            continue
        if attempt:
            log.info(
                "remote_control_queue_declared",
                queue=queue,
                attempts=attempt + 1,
                waited_s=round(time.monotonic() - started, 1),
            )
        return attempt + 1


def sleep_unless_stopping(seconds: float) -> None:
    """``time.sleep`` that ends the worker as soon as it is told to stop.

    Celery's signal handlers only set a flag its loops look at; a worker told to stop while
    it waits here stops now (``maybe_shutdown`` raises Celery's shutdown), not after the wait.
    """
    deadline = time.monotonic() + seconds
    while (left_s := deadline - time.monotonic()) > 0:
        maybe_shutdown()
        time.sleep(min(left_s, STOP_CHECK_S))
    maybe_shutdown()


class PatientPidbox(Pidbox):  # type: ignore[misc]
    """Celery's mailbox, its queue declared with :func:`declare_when_free`."""

    def start(self, c: Any) -> None:
        def declare() -> None:
            try:
                Pidbox.start(self, c)
            except ResourceLocked:
                # RabbitMQ closed the channel with its refusal; the next try opens another.
                self._close_channel(c)
                raise

        declare_when_free(
            declare, queue=self.node.mailbox.get_queue(self.node.hostname).name, sleep=sleep_unless_stopping
        )


class PatientControl(Control):  # type: ignore[misc]
    """Celery's remote-control bootstep with :class:`PatientPidbox` (a green pool keeps Celery's)."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        if not self.is_green:
            self.box = PatientPidbox(c)
            self.start = self.box.start
            self.stop = self.box.stop
            self.shutdown = self.box.shutdown
