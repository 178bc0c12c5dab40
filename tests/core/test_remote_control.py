"""A worker whose remote-control queue RabbitMQ still holds waits for it instead of stopping.

The hold is made for real: a second connection declares the worker's exclusive queue
``<hostname>.celery.pidbox``, as the record of a dead node's connection does in a cluster
(``provisioning.core.remote_control``), then lets it go.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from amqp.exceptions import ResourceLocked
from kombu import Connection

from provisioning.core.remote_control import declare_when_free
from provisioning.core.settings import Settings
from provisioning.runs.publishing import make_publisher
from provisioning.sandbox.processes import WORKER_READY_TIMEOUT_S, worker

pytestmark = pytest.mark.rabbitmq

# Arguments as kombu declares a remote-control queue (Celery's defaults: 10 s expiry, 300 s TTL).
PIDBOX_ARGUMENTS = {"x-expires": 10_000, "x-message-ttl": 300_000}
# A worker told to stop while it waits for its queue is gone within this (the wait may take 120 s).
STOP_WITHIN_S = 5.0


@contextmanager
def held(url: str, queue: str) -> Iterator[Connection]:
    """``queue`` declared exclusive on a connection of its own, until the block ends."""
    with Connection(url) as conn:
        channel = conn.default_channel
        channel.queue_declare(queue, exclusive=True, auto_delete=True, arguments=PIDBOX_ARGUMENTS)
        # Consumed, as the worker consumes it: an unused queue expires after x-expires (10 s).
        channel.basic_consume(queue, callback=lambda message: None)
        yield conn


@contextmanager
def declarer(url: str, queue: str) -> Iterator[Callable[[], None]]:
    """A call that declares ``queue`` exclusive on a new channel of one connection (a refusal closes
    the channel, as it does the worker's)."""
    with Connection(url) as conn:

        def declare() -> None:
            conn.channel().queue_declare(queue, exclusive=True, auto_delete=True, arguments=PIDBOX_ARGUMENTS)

        yield declare


def test_a_worker_started_while_its_remote_control_queue_is_held_waits_then_answers_a_ping_once_it_is_let_go(
    rabbit_settings: Settings, tmp_path: Path
) -> None:
    name = f"locked-{uuid.uuid4().hex[:8]}"
    hostname = f"{name}@{socket.gethostname()}"
    url = rabbit_settings.celery_broker_url
    app = make_publisher(rabbit_settings)
    proc = worker(rabbit_settings.to_env(), tmp_path / "logs", name=name, concurrency=2)
    try:
        with held(url, f"{hostname}.celery.pidbox"):
            proc.start()
            proc.wait_for_log("remote_control_queue_locked", WORKER_READY_TIMEOUT_S)
            # Celery's own Control step stopped the worker here ("Unrecoverable error", exit 1).
            time.sleep(1.0)
            assert proc.alive(), proc.log_text()[-3000:]
            assert " ready." not in proc.log_text()
        proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
        assert proc.alive()
        log = proc.log_text()
        assert "remote_control_queue_declared" in log
        assert "Unrecoverable error" not in log
        replies = app.control.ping(destination=[hostname], timeout=5.0)
        assert replies == [{hostname: {"ok": "pong"}}]
    finally:
        proc.stop()


def test_a_worker_told_to_stop_while_it_waits_for_its_queue_stops_at_once_not_after_the_wait(
    rabbit_settings: Settings, tmp_path: Path
) -> None:
    name = f"locked-{uuid.uuid4().hex[:8]}"
    hostname = f"{name}@{socket.gethostname()}"
    proc = worker(rabbit_settings.to_env(), tmp_path / "logs", name=name, concurrency=2)
    with held(rabbit_settings.celery_broker_url, f"{hostname}.celery.pidbox"):
        proc.start()
        try:
            proc.wait_for_log("remote_control_queue_locked", WORKER_READY_TIMEOUT_S)
            stopping_at = time.monotonic()
            # SIGTERM, then SIGKILL after the grace: well within the 120 s the wait may take.
            code = proc.stop(grace_s=STOP_WITHIN_S)
            took_s = time.monotonic() - stopping_at
        finally:
            proc.stop()
    assert code == 0, proc.log_text()[-3000:]
    assert took_s < STOP_WITHIN_S
    assert "remote_control_queue_declared" not in proc.log_text()


def test_a_free_queue_is_declared_at_the_first_call(rabbit_settings: Settings) -> None:
    slept: list[float] = []
    with declarer(rabbit_settings.celery_broker_url, f"free-{uuid.uuid4().hex}") as declare:
        assert declare_when_free(declare, queue="free", sleep=slept.append) == 1
    assert slept == []


def test_a_queue_held_past_the_longest_wait_is_refused_after_several_tries_none_past_the_deadline(
    rabbit_settings: Settings,
) -> None:
    url = rabbit_settings.celery_broker_url
    queue = f"held-{uuid.uuid4().hex}"
    calls: list[float] = []
    with held(url, queue), declarer(url, queue) as declare_once:

        def declare() -> None:
            calls.append(time.monotonic())
            declare_once()

        started = time.monotonic()
        with pytest.raises(ResourceLocked):
            declare_when_free(declare, queue=queue, max_wait_s=3.0)
        took_s = time.monotonic() - started
    assert 3.0 <= took_s < 3.0 + 2.0
    # Tried again and again, never waiting past the deadline it was given.
    assert len(calls) >= 3
    assert calls[-1] - started <= 3.0 + 0.5


def test_a_queue_let_go_while_waited_for_is_declared_by_the_next_try(rabbit_settings: Settings) -> None:
    url = rabbit_settings.celery_broker_url
    queue = f"let-go-{uuid.uuid4().hex}"
    tries: list[int] = []
    with ExitStack() as holder, declarer(url, queue) as declare_once:
        holder.enter_context(held(url, queue))

        def declare() -> None:
            tries.append(1)
            if len(tries) == 2:
                holder.close()  # the holder's connection closes, and its queue with it
            declare_once()

        took = declare_when_free(declare, queue=queue, max_wait_s=30.0)
    # Refused while held, declared soon after it was let go (RabbitMQ drops it with the connection).
    assert 2 <= took <= 4
