"""The operator's ICCID inventory: which profiles are free, which Order claimed which, which are used.

Operators receive profile batches from the SM-DP+ vendor with their ICCID lists
and load them (``provisioning esim load FILE``; the file is read by
:mod:`provisioning.esim.batch`). An Order claims one ICCID atomically BEFORE its
downloadOrder (every run of the Order gets the same one), so a lost answer never
leaks a profile: the repeat orders the same ICCID and reads 8.2.1/3.3 as done.

Its keys (``p:esim:free``, ``claims``, ``used``, ``known``) are in
:mod:`provisioning.ledger.keys`; its scripts are ``lua/inventory_*.lua``. Memory:
about 200 bytes per ICCID in total (claims and known keep growing with the stock
ever loaded). ICCIDs are stored in canonical form (digits, no ``F`` pad; see
:mod:`provisioning.core.iccid`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError
from provisioning.core.iccid import normalize_iccid
from provisioning.core.logs import get_logger
from provisioning.core.replication import ReplicaUnconfirmed, ReplicaWait
from provisioning.ledger.keys import Keys
from provisioning.ledger.scripts import Scripts, source

log = get_logger(__name__)

# ICCIDs per Redis call when loading; each chunk is atomic, a reload skips what was added.
LOAD_CHUNK = 1000
# Longest value quoted back in an error (a wrong value could be anything).
MAX_QUOTED_VALUE = 40

T = TypeVar("T")


class InventoryError(ProvisioningError):
    """The operator's ICCID inventory cannot do what was asked."""


class InventoryEmpty(InventoryError, TransientError):
    """No free ICCID is left; a run waits (retries) until an operator loads a batch."""

    def __init__(self) -> None:
        super().__init__(
            "no free ICCID in the eSIM inventory; load a batch with `provisioning esim load FILE`"
        )


class InventoryUnavailable(InventoryError, TransientError):
    """Redis did not answer, or no replica confirmed a claim within REDIS_WAIT_TIMEOUT_MS."""


class InventoryClaimError(InventoryError, PermanentError):
    """The Order has no claimed ICCID, or its ICCID is already used and cannot be released."""


@dataclass(frozen=True)
class Stock:
    free: int
    claimed: int
    used: int

    @property
    def total(self) -> int:
        return self.free + self.claimed + self.used


def _quote(value: str) -> str:
    return value if len(value) <= MAX_QUOTED_VALUE else value[:MAX_QUOTED_VALUE] + "..."


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EsimInventory:
    """Free, claimed and used ICCIDs of one deployment (one key prefix)."""

    def __init__(
        self, client: Redis, keys: Keys, scripts: Scripts, replicas: ReplicaWait | None = None
    ) -> None:
        self._redis = client
        self._keys = keys
        # With replicas, a claim is on a replica before the downloadOrder it guards.
        self._replicas = replicas
        self.free_key = keys.esim_free
        self.claims_key = keys.esim_claims
        self.used_key = keys.esim_used
        self.known_key = keys.esim_known
        self._load = scripts["inventory_load"]
        self._claim = scripts["inventory_claim"]
        self._release = scripts["inventory_release"]
        self._return = scripts["inventory_return"]
        self._stock = scripts["inventory_stock"]

    @classmethod
    def on(cls, client: Redis, prefix: str, replicas: ReplicaWait | None = None) -> EsimInventory:
        """The inventory under ``prefix`` on its own (an operator's command, a test), not a whole ledger."""
        return cls(client, Keys(prefix), Scripts(client), replicas)

    def __repr__(self) -> str:
        return f"EsimInventory(prefix={self._keys.prefix!r})"

    def load(self, iccids: Iterable[str]) -> int:
        """Add ICCIDs to the free stock; returns how many were new (known ones are skipped)."""
        canonical: list[str] = []
        for value in iccids:
            try:
                canonical.append(normalize_iccid(value))
            except ValueError as exc:
                raise ValueError(f"malformed ICCID {_quote(value)!r}: {exc}") from None
        added = 0
        for start in range(0, len(canonical), LOAD_CHUNK):
            chunk = canonical[start : start + LOAD_CHUNK]
            added += int(_guard(self._load, keys=[self.free_key, self.known_key], args=chunk))
        log.info("esim_inventory_loaded", given=len(canonical), added=added)
        return added

    def claim(self, key: str) -> str:
        """The ICCID of ``key`` (an Order's effect key): the one claimed before, else a free one taken for it.

        With replicas the claim (a repeat too) returns once a replica holds it, in the same round
        trip; none in time raises InventoryUnavailable (transient: the step retries, ordering nothing).
        """
        return self.claim_counting(key)[0]

    def claim_counting(self, key: str) -> tuple[str, int]:
        """:meth:`claim`, and how many ICCIDs are still free after it (the same round trip)."""
        replicas = self._replicas
        if replicas is not None and _guard(replicas.replicas):
            # EVAL, not EVALSHA: a script cached on a primary that failed over is not on the new one.
            keys = (self.free_key, self.claims_key)
            value, free = _guard(
                replicas.write, lambda pipe: pipe.eval(source("inventory_claim"), len(keys), *keys, key)
            )[0]
        else:
            value, free = _guard(self._claim, keys=[self.free_key, self.claims_key], args=[key])
        if value is None:
            log.warning("esim_inventory_empty", key=key)
            raise InventoryEmpty()
        return _text(value), int(free)

    def claimed_by(self, key: str) -> str | None:
        value = _guard(self._redis.hget, self.claims_key, key)
        return None if value is None else _text(value)

    def queue_mark_used(self, pipe: Any, iccid: str) -> None:
        """The ICCID a claim returned is activated (idempotent), queued on ``pipe``: an eSIM step's end.

        Used, it never goes back to stock (:meth:`release`); its claim stays, so a repeat still finds it.
        """
        pipe.sadd(self.used_key, iccid)

    def release(self, key: str) -> str | None:
        """Give ``key``'s claimed ICCID back to the free stock; returns it (None: no claim)."""
        status, value = _guard(
            self._release, keys=[self.free_key, self.claims_key, self.used_key], args=[key]
        )
        if int(status) == -1:
            raise InventoryClaimError(
                f"the ICCID of {key}, {_text(value)} is used: it cannot go back to stock"
            )
        if int(status) == 0:
            return None
        log.info("esim_inventory_released", key=key)
        return _text(value)

    def return_to_stock(self, key: str) -> str | None:
        """``key``'s ICCID, used or not, back to the free stock: only after the SM-DP+ cancelled its
        profile with ``Available`` (the Order's cancellation, the stale-stock reclaim). Returns the
        ICCID, None when ``key`` has no claim (returned before: a repeat changes nothing)."""
        status, value = _guard(self._return, keys=[self.free_key, self.claims_key, self.used_key], args=[key])
        if int(status) == 0:
            return None
        log.info("esim_inventory_returned", key=key)
        return _text(value)

    def footprint(self) -> dict[str, tuple[int, int]]:
        """Per key of the stock (free, claims, used, known): its size and its memory in bytes."""
        pipe = self._redis.pipeline(transaction=False)
        names = {
            "free": self.free_key,
            "claims": self.claims_key,
            "used": self.used_key,
            "known": self.known_key,
        }
        for name, key in names.items():
            pipe.hlen(key) if name == "claims" else pipe.scard(key)
            pipe.memory_usage(key, samples=0)
        answers = pipe.execute()
        return {name: (int(answers[2 * i]), int(answers[2 * i + 1] or 0)) for i, name in enumerate(names)}

    def stock(self) -> Stock:
        free, claims, used = _guard(
            self._stock, keys=[self.free_key, self.claims_key, self.used_key], args=[]
        )
        return Stock(free=int(free), claimed=int(claims) - int(used), used=int(used))


def _guard(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one Redis call; Redis errors become inventory errors here and only here."""
    try:
        return call(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise InventoryUnavailable(f"Redis did not answer ({type(exc).__name__})") from exc
    except ReplicaUnconfirmed as exc:
        raise InventoryUnavailable(str(exc)) from exc
