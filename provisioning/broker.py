"""kombu's Redis transport with one redis-py client per channel, not one per broker command.

kombu builds a new ``redis.Redis`` for each queue operation outside its poll loop
(each publish, each ack, each unacked record); redis-py's constructor fills a
case-insensitive table of some 200 response callbacks every time, which made it
the hottest function of a worker's profile. A ``redis.Redis`` is thread-safe (it
takes a connection from its pool per command), so one per channel and pool does
the same work. Used for ``redis://`` and ``rediss://`` brokers (``celeryconfig``).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        # A new pool (after a reconnect) gets a new client: never one bound to a closed pool.
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
