"""Ledger writes that guard an external effect, confirmed by a replica before the effect.

Redis replicates asynchronously: a write the primary acknowledged is lost if the
primary dies before a replica got it and that replica is promoted. For most ledger
writes that costs a repeated, idempotent step. For the few after which we act on
the outside world it would cost a second effect: the WHMCS intent (a lost intent
means ``AddOrder`` again without the lookup), the ICCID claim (a lost claim means a
second profile) and the outbox's ``sending``. (The eSIM download marker is not one: a
lost one means ``downloadOrder`` again for the same claimed ICCID, which answers "in use", read as done.) Those go
through :meth:`ReplicaWait.write`: the write and ``WAIT 1 <REDIS_WAIT_TIMEOUT_MS>``
in one pipeline, on one connection (WAIT counts the replicas that acknowledged
*that connection's* writes), so one round trip that returns once a replica holds
the write. No replica within the timeout raises :class:`ReplicaUnconfirmed`, a
transient error: the step retries later and does not act on an unconfirmed write.

Whether there are replicas (in sync: ``state=online``) is read from ``INFO
replication`` and cached per process for ``REPLICA_REFRESH_S`` (an unconfirmed write
reads it again at once). Without replicas the write goes alone, with no WAIT: so after
a failover until the old primary rejoins as a replica (AOF keeps the write meanwhile),
and where an ACL forbids INFO.

WAIT does not make Redis strongly consistent (the replica that acknowledged may not
be the one promoted); with one replica, or with Sentinel promoting the most
up-to-date replica, it bounds the loss to double failures.

Errors::

    TransientError
    └── ReplicaUnconfirmed   no replica acknowledged a guarded write within the timeout
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from provisioning.core.errors import TransientError
from provisioning.core.logs import get_logger

log = get_logger(__name__)

# How long a process trusts what INFO replication said about the replicas.
REPLICA_REFRESH_S = 10.0
# Replicas that must hold a guarded write before the effect it guards.
REPLICAS_NEEDED = 1


def online_replicas(replication: dict[str, Any]) -> int:
    """Replicas in sync, from INFO replication (one still loading its first copy cannot acknowledge)."""
    return sum(
        1
        for key, value in replication.items()
        if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


class ReplicaUnconfirmed(TransientError):
    """No replica acknowledged a write that guards an external effect in time: retry, do not act."""


class ReplicaWait:
    """Runs guarded writes, followed by WAIT when the ledger's Redis has replicas. Thread-safe."""

    def __init__(
        self,
        *,
        redis: redis.Redis,
        timeout_ms: int,
        refresh_s: float = REPLICA_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        self._clock = clock
        self._replicas = 0
        self._read_at: float | None = None

    def __repr__(self) -> str:
        return f"ReplicaWait(timeout_ms={self.timeout_ms}, replicas={self._replicas})"

    def replicas(self) -> int:
        """Replicas connected to the primary, as last read (at most ``refresh_s`` ago)."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            try:
                replicas = online_replicas(self._redis.info("replication"))
            except redis.exceptions.NoPermissionError:
                # An ACL without INFO (some managed Redis): replicas cannot be seen, so nothing waits;
                # `provisioning check` says what the deployment is.
                if self._read_at is None:
                    log.warning("ledger_replicas_unknown", reason="INFO is not permitted to this user")
                replicas = 0
            if replicas != self._replicas:
                log.info("ledger_replicas_changed", replicas=replicas, before=self._replicas)
            self._replicas, self._read_at = replicas, now
        return self._replicas

    def forget(self) -> None:
        """Read the replicas again on the next write (after a WAIT that timed out)."""
        self._read_at = None

    def write(self, commands: Callable[[Any], object]) -> list[Any]:
        """Queue the write(s) with ``commands(pipeline)`` and run them; with replicas, confirmed.

        Returns the commands' results. Raises :class:`ReplicaUnconfirmed` when replicas
        exist and none acknowledged within ``timeout_ms``.
        """
        confirm = self.replicas() > 0
        pipe = self._redis.pipeline(transaction=False)
        commands(pipe)
        if confirm:
            pipe.wait(REPLICAS_NEEDED, self.timeout_ms)
        results: list[Any] = pipe.execute()
        if confirm:
            acked = int(results.pop())
            if acked < REPLICAS_NEEDED:
                self.forget()
                log.warning("ledger_write_unconfirmed", timeout_ms=self.timeout_ms, acked=acked)
                raise ReplicaUnconfirmed(
                    f"no replica of the ledger's Redis confirmed a write that guards an external effect "
                    f"within {self.timeout_ms} ms (REDIS_WAIT_TIMEOUT_MS); not acting on it yet"
                )
        return results
