"""The broker transports as the listener uses them: a batch of runs on a real RabbitMQ and a real Redis."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Producer, Queue
from kombu.common import ignore_errors

from provisioning.core.broker import AmqpChannel, AmqpTransport, Transport
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import make_publisher, publish_run, publish_runs
from provisioning.sandbox.redis_server import RedisServer, SentinelGroup

# The machine's servers, as in conftest's settings.
BROKER_URL = "redis://127.0.0.1:6379/1"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _runs(count: int) -> list[RunId]:
    return [RunId.parse(f"801000000000{i:03d}AAA:key-{i}") for i in range(count)]


def _queued(queue: str) -> int:
    with Connection(RABBITMQ_URL) as conn:
        _, count, _ = conn.channel().queue_declare(queue, passive=True)
        return int(count)


def _read_in_a_loop(conn: Connection, hub: Any, ready: threading.Event, stop: threading.Event) -> None:
    """A worker's event loop reading ``conn``: registered on the loop's own thread, as Celery's
    consumer does, until ``stop``."""
    conn.transport.register_with_event_loop(conn.connection, hub)
    ready.set()
    loop = hub.create_loop()
    while not stop.is_set():
        next(loop)


def _delete(queue: Queue) -> None:
    with Connection(RABBITMQ_URL) as admin:
        channel = admin.channel()
        channel.queue_delete(queue.name)
        channel.exchange_delete(queue.exchange.name)


def test_a_batch_of_runs_on_rabbitmq_is_confirmed_at_once_and_every_message_is_queued(
    rabbit_settings: Settings,
) -> None:
    app = make_publisher(rabbit_settings)
    runs = _runs(300)
    publish_runs(app, runs)
    # Returned after the confirms: RabbitMQ holds every message, none of them waits in a buffer.
    assert _queued(rabbit_settings.celery_queue) == 300
    with app.producer_or_acquire() as producer:
        assert isinstance(producer.channel, AmqpChannel)
        # Numbered like RabbitMQ's delivery tags: every publish of the batch was a confirmed one.
        assert producer.channel.published >= 300
    # A lone publish (confirmed on its own) between two batches keeps the numbering of the next.
    publish_run(app, runs[0])
    publish_runs(app, runs[:10])
    assert _queued(rabbit_settings.celery_queue) == 311


def test_a_batch_rabbitmq_refuses_in_part_raises_instead_of_returning(namespace: str) -> None:
    # A queue that refuses what exceeds 5 messages: RabbitMQ nacks the rest of the batch.
    exchange = Exchange(f"x-{namespace}", type="direct")
    queue = Queue(
        f"q-{namespace}",
        exchange,
        routing_key="full",
        queue_arguments={"x-max-length": 5, "x-overflow": "reject-publish"},
    )
    conn = Connection(RABBITMQ_URL, transport=AmqpTransport, transport_options={"confirm_publish": True})
    try:
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel, exchange=exchange, routing_key="full")

        def publish_twelve() -> None:
            with producer.batch(max_size=100):
                for n in range(12):
                    producer.publish({"n": n})

        with pytest.raises(MessageNacked, match="refused 7 messages"):
            publish_twelve()
        # The channel is usable after: a lone publish is confirmed on its own, and refused too.
        with pytest.raises(MessageNacked):
            producer.publish({"n": 12})
        assert _queued(queue.name) == 5
    finally:
        channel = conn.channel()
        channel.queue_delete(queue.name)
        channel.exchange_delete(exchange.name)
        conn.release()


def test_a_batch_of_runs_on_redis_is_queued_whole_as_first_steps(settings: Settings) -> None:
    app = make_publisher(settings)
    publish_runs(app, _runs(250))
    client = redis.Redis.from_url(BROKER_URL)
    try:
        messages = client.lrange(settings.celery_queue, 0, -1)
    finally:
        client.close()
    assert len(messages) == 250
    assert all(CHAIN.first.task_name.encode() in m for m in messages)


def test_publishes_from_other_threads_on_a_connection_an_event_loop_reads_never_hang(namespace: str) -> None:
    """Celery's worker reads its event connection in its loop while pool threads publish events on it."""
    from kombu.asynchronous import Hub

    queue = Queue(f"q-{namespace}", Exchange(f"x-{namespace}", type="direct"), routing_key="events")
    conn = Connection(RABBITMQ_URL, transport=AmqpTransport, transport_options={"confirm_publish": True})
    hub = Hub()
    loop_ready = threading.Event()
    published = threading.Event()

    def event_loop() -> None:
        _read_in_a_loop(conn, hub, loop_ready, published)

    try:
        # Declared before the loop reads: only the publishes' confirms are at stake here.
        producer = Producer(conn.channel(), exchange=queue.exchange, routing_key="events", auto_declare=False)
        queue(producer.channel).declare()
        # The loop's own thread confirms its publishes as usual (it is the one that reads).
        reader = threading.Thread(target=event_loop, daemon=True)
        reader.start()
        assert loop_ready.wait(10)

        def publish_many() -> None:
            for n in range(300):
                producer.publish({"n": n})
            published.set()

        publisher = threading.Thread(target=publish_many, daemon=True)
        publisher.start()
        publisher.join(30)
        assert published.is_set(), "a publish waited for a confirm the event loop had read"
        reader.join(10)
        assert _queued(queue.name) == 300
    finally:
        published.set()
        hub.close()
        _delete(queue)
        conn.release()


def test_one_thread_at_a_time_reads_a_connection_an_event_loop_reads_while_others_publish(
    namespace: str,
) -> None:
    """py-amqp reads a connection on every publish (for RabbitMQ's connection.blocked notice). On the
    worker's event connection, which its loop also reads, two threads reading at once split a frame
    between them: each then waited for bytes that never came, the loop spun at full CPU and the
    consumer's prefetched messages sat unread (a 100-thread worker on RabbitMQ, 2026-12-06)."""
    from kombu.asynchronous import Hub

    queue = Queue(f"q-{namespace}", Exchange(f"x-{namespace}", type="direct"), routing_key="events")
    conn = Connection(RABBITMQ_URL, transport=AmqpTransport, transport_options={"confirm_publish": True})
    hub = Hub()
    loop_ready = threading.Event()
    published = threading.Event()
    readers = 0
    most_readers = 0
    count_lock = threading.Lock()

    def event_loop() -> None:
        _read_in_a_loop(conn, hub, loop_ready, published)

    try:
        producer = Producer(conn.channel(), exchange=queue.exchange, routing_key="events", auto_declare=False)
        queue(producer.channel).declare()
        # The worker's first event goes out before its loop reads: the channel is in confirm mode, and
        # RabbitMQ's confirms of the later publishes come in for somebody to read.
        producer.publish({"n": "online"})
        transport = conn.connection.transport
        read_frame = transport.read_frame
        loop_thread = threading.Thread(target=event_loop, daemon=True)

        def watched_read_frame(*args: Any, **kwargs: Any) -> Any:
            # Who is reading, and (in the loop's thread) a slow read: a publish comes in meanwhile.
            nonlocal readers, most_readers
            with count_lock:
                readers += 1
                most_readers = max(most_readers, readers)
            try:
                if threading.current_thread() is loop_thread:
                    time.sleep(0.005)
                return read_frame(*args, **kwargs)
            finally:
                with count_lock:
                    readers -= 1

        transport.read_frame = watched_read_frame
        loop_thread.start()
        assert loop_ready.wait(10)
        mutex = threading.Lock()  # Celery's event dispatcher publishes under its mutex

        def publish_many() -> None:
            for n in range(100):
                with mutex:
                    producer.publish({"n": n})
                time.sleep(0.002)  # its confirm arrives meanwhile: the loop reads it

        publishers = [threading.Thread(target=publish_many, daemon=True) for _ in range(4)]
        for thread in publishers:
            thread.start()
        deadline = time.monotonic() + 60
        for thread in publishers:
            thread.join(max(0.0, deadline - time.monotonic()))
        published.set()
        assert not any(thread.is_alive() for thread in publishers), "a publish never returned"
        loop_thread.join(10)
        assert most_readers == 1
        assert _queued(queue.name) == 401
    finally:
        published.set()
        hub.close()
        _delete(queue)
        conn.release()


# -- a worker's Redis connection lost: Celery collects it, then closes it ------------------------


def _consume_one_and_wait_in_brpop(conn: Connection, queue: Queue) -> Any:
    """A worker's consumer connection: one message delivered and unacked, the next BRPOP sent, and
    a second channel consuming a fanout queue that is deleted on close (Celery's pidbox)."""
    delivered: list[Any] = []
    conn.Consumer([queue], callbacks=[lambda body, message: delivered.append(message)]).consume()
    broadcast = Queue(
        f"{queue.name}.pidbox", Exchange(f"{queue.name}.bcast", type="fanout"), auto_delete=True
    )
    conn.Consumer([broadcast], channel=conn.channel(), no_ack=True).consume()
    channel = conn.default_channel
    for _ in range(50):
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)
        if delivered and channel._in_poll:
            return channel
    raise AssertionError(f"not consuming: {len(delivered)} delivered, BRPOP pending {channel._in_poll}")


def _collect_then_close(conn: Connection) -> None:
    """What Celery's consumer does with its connection after a connection error (consumer.py)."""
    with contextlib.suppress(Exception):
        conn.collect(socket_timeout=5)
    ignore_errors(conn, conn.close)


@pytest.mark.parametrize(
    ("transport", "survives"),
    [("kombu.transport.redis:Transport", False), ("provisioning.core.broker:Transport", True)],
)
def test_a_connection_collected_after_its_redis_died_closes_without_an_error_that_stops_a_worker(
    tmp_path: Path, transport: str, survives: bool
) -> None:
    queue = Queue("tasks", Exchange("tasks"), routing_key="tasks")
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        with Connection(server.url(1), transport=transport) as publisher:
            publisher.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="tasks", declare=[queue]
            )
        conn = Connection(server.url(1), transport=transport)
        channel = _consume_one_and_wait_in_brpop(conn, queue)
        server.stop(signal.SIGKILL)
        if survives:
            _collect_then_close(conn)
            assert channel.closed
        else:
            # kombu's own: the consumer's channel is closed after the detach, and the restore of its
            # unacked message raises what Celery cannot recover from.
            with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'hostname'"):
                _collect_then_close(conn)


def test_a_channel_that_reaches_for_redis_after_its_connection_was_collected_gets_a_connection_error(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        conn = Connection(server.url(1), transport="provisioning.core.broker:Transport")
        channel = conn.channel()
        conn.collect()
        # A restore of unacked messages after the detach (kombu's raises AttributeError here).
        with pytest.raises(redis.exceptions.ConnectionError, match="closed after an error") as info:
            channel.qos.restore_unacked()
        assert isinstance(info.value, tuple(Transport.connection_errors))


def test_after_a_sentinel_failover_a_collected_channel_gives_its_unacked_message_back_at_once(
    tmp_path: Path,
) -> None:
    queue = Queue("tasks", Exchange("tasks"), routing_key="tasks")
    options = {"master_name": "broker", "visibility_timeout": 3600}
    transport = "provisioning.core.broker:SentinelTransport"
    with SentinelGroup(tmp_path / "ha", master_name="broker") as group:
        url = group.broker_url(1)
        with Connection(url, transport=transport, transport_options=options) as publisher:
            publisher.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="tasks", declare=[queue]
            )
        conn = Connection(url, transport=transport, transport_options=options)
        _consume_one_and_wait_in_brpop(conn, queue)
        old = group.master()
        # The unacked record is on the replica too: the failover keeps it.
        assert old.client(1).wait(1, 5000) == 1
        old.stop(signal.SIGKILL)
        new = group.wait_for_failover()
        _collect_then_close(conn)
        # Restored on the new master by the close, not an hour later by the visibility timeout.
        client = new.client(1)
        try:
            assert client.llen("tasks") == 1
            assert client.hlen("unacked") == 0
        finally:
            client.close()
