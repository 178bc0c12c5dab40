"""The Orders' leases: one worker at a time acts on an Order (SET NX with expiry, renewed while working).

A step's claim takes the lease in its script (:mod:`provisioning.ledger.runs`); what
the claim took is handed back as a redis-py ``Lock``, so renewing and releasing
work on it as on any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
from redis.lock import Lock

from provisioning.ledger.keys import Keys


class Leases:
    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self.ttl_s = ttl_s

    def lease(self, order_id: str) -> Lock:
        """The Order's lease, not taken yet."""
        lock: Lock = self._redis.lock(
            self._keys.lease(order_id), timeout=self.ttl_s, blocking=False, thread_local=False
        )
        return lock

    def held(self, order_id: str, token: str) -> Lock:
        """The lease a script took with ``token``: renew and release work on it as usual."""
        lock = self.lease(order_id)
        lock.local.token = token.encode()
        return lock

    def is_held(self, order_id: str) -> bool:
        return bool(self._redis.exists(self._keys.lease(order_id)))

    @contextmanager
    def holding(self, order_id: str) -> Iterator[Lock | None]:
        """Yield the acquired lease, or None when another worker holds it."""
        lock = self.lease(order_id)
        if not lock.acquire(blocking=False):
            yield None
            return
        try:
            yield lock
        finally:
            # It may have expired while we worked; then someone else may hold it, and it is theirs.
            with suppress(redis.exceptions.LockError):
                lock.release()
