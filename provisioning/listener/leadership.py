"""One active listener per channel: a Redis lock with expiry, renewed; other replicas wait as hot standbys."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress

import redis
from redis.lock import Lock

from provisioning.core.logs import get_logger

log = get_logger(__name__)

# A standby looks at the lock, and the leader renews it, this often (a fraction of its expiry).
POLL_FRACTION = 1 / 3


class Leadership:
    def __init__(self, lock: Lock, *, ttl_s: int, channel: str) -> None:
        """``lock``: the channel's leader lock (``ledger.listener.leader_lock``), not taken yet."""
        self.ttl_s = ttl_s
        self.channel = channel
        self.lost = threading.Event()
        self._lock = lock

    def acquire(self, stopping: threading.Event) -> bool:
        """Wait as a standby until the lock is ours (True) or ``stopping`` is set (False)."""
        announced = False
        while not stopping.is_set():
            try:
                if self._lock.acquire(blocking=False):
                    self.lost.clear()
                    return True
            except redis.exceptions.ConnectionError as exc:
                log.warning("listener_lock_unreachable", error=str(exc))
            if not announced:
                log.info("listener_standby", channel=self.channel)
                announced = True
            stopping.wait(self.ttl_s * POLL_FRACTION)
        return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew until the lead is given up or lost (then ``on_lost``); run in a thread of its own."""
        while not self.lost.wait(self.ttl_s * POLL_FRACTION):
            try:
                self._lock.reacquire()
            except redis.exceptions.LockError:
                log.error("listener_leadership_lost", channel=self.channel)
                self.lost.set()
                on_lost()
                return
            except redis.exceptions.ConnectionError as exc:
                # Keep going: the lock may still be ours when Redis is back; if not, reacquire says so.
                log.warning("listener_lock_renew_failed", error=str(exc))

    def release(self) -> None:
        self.lost.set()
        with suppress(redis.exceptions.LockError, redis.exceptions.ConnectionError):
            self._lock.release()
