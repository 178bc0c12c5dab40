"""kombu's transports as our processes use them: fewer objects per Redis command, batched confirms.

Redis (``Transport``): kombu builds a new ``redis.Redis`` for each queue operation
outside its poll loop (each publish, each ack, each unacked record); redis-py's
constructor fills a case-insensitive table of some 200 response callbacks every
time, which made it the hottest function of a worker's profile. A ``redis.Redis``
is thread-safe (it takes a connection from its pool per command), so one per
channel and pool does the same work.

RabbitMQ (``AmqpTransport``, ``AmqpSSLTransport``): with publisher confirms each
publish waits for RabbitMQ's ack before the next is sent, one round trip per
message. Inside kombu's ``Producer.batch()`` (the listener publishes a batch of
events that way) the messages are sent back to back and their acks awaited once
at the end; outside a batch a publish is confirmed on its own, as before.

A publish is confirmed only where the publishing thread is the one that reads its
connection. Celery's worker registers its event connection with its event loop (to
read the broker's heartbeats) while the thread pool's threads publish task events on
it: a confirm awaited by a pool thread could be read by the loop instead, and the pool
thread would wait for ever, holding the event dispatcher's lock every other thread
then waits for (all of a worker's threads stuck, its prefetched tasks unacked). Such a
publish is sent without waiting; events are Flower's view, the ledger is the record.

For the same reason a connection is read by one thread at a time (``AmqpConnection``).
py-amqp reads its connection on every publish (``drain_events(timeout=0)``, to see
RabbitMQ's ``connection.blocked`` notice), so a pool thread publishing a task event
read the event connection while the loop read it too: each took part of one frame.
The loop then read a header made of the middle of a frame (a size of 1.3 GB) and
spun at full CPU waiting for it, never reading the consumer's connection again; its
prefetched messages sat unacknowledged and the worker made no progress (a 100-thread
worker on RabbitMQ, 4 of 12 benchmark runs on 2026-12-06; py-spy showed both threads
in the same transport's read).

Redis and Sentinel (``Transport``, ``SentinelTransport``): a worker must outlive the
loss of its broker. When the connection fails, Celery ``collect()``s it (every channel
closed, then the transport detached from its kombu connection) and ``close()``s it.
kombu's ``close_connection`` closes the channels in a loop that stops at the first
error, and a dead Redis gives one at once (the pidbox channel's queue delete); the
consumer's channel, whose close had already failed reading its pending BRPOP, was
left open. ``close()`` then closed it after the detach: restoring its unacked
messages, it built a pool from the detached transport's connection parameters and
raised ``AttributeError: 'NoneType' object has no attribute 'hostname'``, not a
connection error, so Celery stopped the worker ("Unrecoverable error"). Here every
channel is closed even when one fails, so the restore is tried while the transport
still knows its broker (it works once the broker, or the new master, answers), and a
channel closed after the detach fails as a connection error does: Celery reconnects.
Messages not restored stay in the unacked hash until the visibility timeout.

``celeryconfig`` picks them by the broker URL's scheme.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from amqp import spec
from amqp.exceptions import MessageNacked
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis

# How long the end of a batch waits for RabbitMQ to confirm its messages.
BATCH_CONFIRM_TIMEOUT_S = 30.0


# Raised by a Redis channel used after its connection was collected (module docstring).
DETACHED = "the broker connection was closed after an error; reconnecting"


class _FailsAsConnectionErrorOnceDetached:
    """A Redis channel used after ``Connection.collect()`` raises a connection error, not AttributeError."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(DETACHED)
        return super()._connparams(asynchronous)  # type: ignore[misc]


class _ClosesEveryChannel:
    """kombu's ``close_connection``, but a channel that fails to close does not leave the rest open."""

    cycle: Any
    channels: list[Any]
    _avail_channels: list[Any]

    def close_connection(self, connection: Any) -> None:
        self.cycle.close()
        errors: list[Exception] = []
        for channels in self._avail_channels, self.channels:
            while channels:
                channel = channels.pop()
                try:
                    channel.close()
                except Exception as exc:  # the others are still closed; the first error is raised after
                    errors.append(exc)
        if errors:
            raise errors[0]


class Channel(_FailsAsConnectionErrorOnceDetached, kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        # A new pool (after a reconnect) gets a new client: never one bound to a closed pool.
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(_ClosesEveryChannel, kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_FailsAsConnectionErrorOnceDetached, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (a pool that asks the sentinels for the master), closed safely."""


class SentinelTransport(_ClosesEveryChannel, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class BatchNotConfirmed(Exception):
    """RabbitMQ did not confirm every message of a batch in time: their delivery is uncertain."""


class AmqpChannel(pyamqp.Channel):
    """A channel that numbers its confirmed publishes, as RabbitMQ numbers their delivery tags."""

    # RabbitMQ numbers the publishes of a channel from 1 once it is in confirm mode.
    published: int = 0

    def confirm_select(self, nowait: bool = False) -> Any:
        # Also after a revive: the numbering starts again with confirm mode.
        self.published = 0
        return super().confirm_select(nowait)

    def _basic_publish(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._basic_publish(*args, **kwargs)
        if self._confirm_selected:
            self.published += 1
        return result

    def basic_publish_confirm(self, *args: Any, **kwargs: Any) -> Any:
        reader = getattr(self.connection, "event_loop_thread", None)
        if reader is not None and reader != threading.get_ident():
            # Another thread reads this connection: the confirm could be read there (module docstring).
            kwargs.pop("confirm_timeout", None)
            return self._basic_publish(*args, **kwargs)
        return super().basic_publish_confirm(*args, **kwargs)

    def create_publish_batch(self, max_size: int) -> ConfirmedBatch:
        """kombu's hook for ``Producer.batch()``."""
        return ConfirmedBatch(self, max_size)


class ConfirmedBatch:
    """Messages of one batch sent without waiting, then every confirm awaited at once (kombu's session)."""

    def __init__(self, channel: AmqpChannel, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._unconfirmed: set[int] = set()
        self._nacked = 0
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def publish(self, message: Any, **kwargs: Any) -> None:
        kwargs.pop("confirm_timeout", None)
        channel = self.channel
        if not channel._confirm_selected:
            channel.confirm_select()
            channel._confirm_selected = True
        channel._basic_publish(message, **kwargs)
        self._unconfirmed.add(channel.published)
        if len(self._unconfirmed) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        """Return once RabbitMQ confirmed every message sent so far; raise if it refused one."""
        deadline = time.monotonic() + BATCH_CONFIRM_TIMEOUT_S
        # Every confirm, nacks included, is read before returning or raising: none is left on the
        # channel for a later publish to take for its own.
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BatchNotConfirmed(
                    f"RabbitMQ confirmed no more of the batch within {BATCH_CONFIRM_TIMEOUT_S:g} s; "
                    f"{len(self._unconfirmed)} messages unconfirmed"
                )
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=remaining)
        if self._nacked:
            nacked, self._nacked = self._nacked, 0
            raise MessageNacked(f"RabbitMQ refused {nacked} messages of the batch")

    def discard(self) -> None:
        # Sent is sent: an aborted batch only stops waiting for its confirms.
        self._unconfirmed.clear()

    def close(self) -> None:
        self.channel.events["basic_ack"].discard(self._on_ack)
        self.channel.events["basic_nack"].discard(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {tag for tag in self._unconfirmed if tag > delivery_tag}
        else:
            self._unconfirmed.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        refused = {t for t in self._unconfirmed if t <= delivery_tag} if multiple else {delivery_tag}
        refused &= self._unconfirmed
        self._nacked += len(refused)
        self._unconfirmed -= refused


class AmqpConnection(pyamqp.Connection):
    Channel = AmqpChannel
    # The thread of the event loop that reads this connection, once it is registered with one.
    event_loop_thread: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Taken around every frame read; reentrant, as a frame's handler may read again (a wait).
        self._reading = threading.RLock()
        super().__init__(*args, **kwargs)

    def blocking_read(self, timeout: float | None = None) -> Any:
        """One frame, read by one thread at a time (module docstring)."""
        with self._reading:
            return super().blocking_read(timeout)


class _NotesItsReader:
    """Marks a connection registered with an event loop with the loop's thread (see AmqpChannel)."""

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        # Registration happens on the loop's own thread (the worker's consumer starting its loop).
        connection.event_loop_thread = threading.get_ident()
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]


class AmqpTransport(_NotesItsReader, pyamqp.Transport):
    Connection = AmqpConnection
    implements = pyamqp.Transport.implements.extend(batch_publish=True)


class AmqpSSLTransport(_NotesItsReader, pyamqp.SSLTransport):
    Connection = AmqpConnection
    implements = pyamqp.Transport.implements.extend(batch_publish=True)
