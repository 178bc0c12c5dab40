"""Console login throttling: counters of wrong passwords per user and per client address, in Redis.

Without it, a script could try passwords as fast as argon2 checks them. Each
user's failures are answered at once up to ``free_failures``; after those, each
further try must wait ``delay_s``, doubled by each failure; at ``max_failures`` the
user is locked for ``lock_s``. A client address is locked after
``max_failures_per_address`` failures, whatever the user names (password spraying),
with no growing wait before: one address is often many people (a NAT, a VPN).
A user that does not exist is counted like one that does, so a lock tells nothing
about who exists.

An attempt is counted as a failure *before* its password is checked
(``login_attempt.lua``: the check and the count are one atomic step) and a right
password takes it back (``login_success.lua``, which also resets the user's
counter but not the address's). Checking first and counting after would let
every attempt running side by side slip past the same hold. A counter is
forgotten ``lock_s`` after its last attempt, the moment a lock ends.

Keys (``p`` is ``LEDGER_PREFIX``; listed with every other key in :mod:`provisioning.ledger.keys`):

=====================================  ====  ==========================================================
``p:console:login:user:{user}``        hash  failures, last_ms (the last attempt), until_ms (held
                                             until); expires ``lock_s`` after the last attempt
``p:console:login:address:{address}``  hash  the same, for one client address
=====================================  ====  ==========================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis

from provisioning.ledger.keys import Keys
from provisioning.ledger.scripts import Scripts

# Longer user names are cut to this length for their counter (CONSOLE_USERS names are far shorter;
# the login form would otherwise let anyone make keys of a megabyte).
MAX_NAME_CHARS = 200


class Scope(StrEnum):
    USER = "user"
    ADDRESS = "address"


@dataclass(frozen=True)
class ThrottlePolicy:
    """The numbers (CONSOLE_LOGIN_* settings)."""

    free_failures: int
    delay_s: float
    max_failures: int
    max_failures_per_address: int
    lock_s: int

    def limit(self, scope: Scope) -> int:
        return self.max_failures if scope is Scope.USER else self.max_failures_per_address


@dataclass(frozen=True)
class Hold:
    """What keeps the next attempt out: which counter, until when, and whether it is a lock."""

    scope: Scope
    until: float
    locked: bool


@dataclass(frozen=True)
class Attempt:
    """The outcome of :meth:`LoginThrottle.attempt`.

    ``held``: the attempt is refused, its password must not be checked. Otherwise it
    was counted as a failure: ``if_failed`` is what holds the next one should the
    password be wrong (None: nothing), ``locks`` the counters a wrong password locks
    now (each lock is reported once, by the failure that reaches it).
    """

    held: Hold | None
    if_failed: Hold | None = None
    locks: tuple[Scope, ...] = ()


class LoginThrottle:
    """Thread-safe: it holds only a redis-py client (a pool) and registered scripts."""

    def __init__(
        self,
        *,
        redis: redis.Redis,
        prefix: str,
        policy: ThrottlePolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.policy = policy
        self._clock = clock
        scripts = Scripts(redis)
        self._attempt = scripts["login_attempt"]
        self._success = scripts["login_success"]

    def _key(self, scope: Scope, value: str) -> str:
        return Keys(self._prefix).login(scope.value, value[:MAX_NAME_CHARS])

    def attempt(self, user: str, address: str) -> Attempt:
        """Refuse the attempt while ``user`` or ``address`` is held; count it otherwise."""
        p = self.policy
        now_ms = int(self._clock() * 1000)
        answer = self._attempt(
            keys=[self._key(Scope.USER, user), self._key(Scope.ADDRESS, address)],
            args=[
                now_ms,
                p.lock_s * 1000,
                p.free_failures,
                int(p.delay_s * 1000),
                p.max_failures,
                p.max_failures_per_address,
            ],
        )
        if int(answer[0]) == 0:
            scope = (Scope.USER, Scope.ADDRESS)[int(answer[1]) - 1]
            failures = int(answer[3])
            return Attempt(Hold(scope, int(answer[2]) / 1000, failures >= p.limit(scope)))
        counted = {
            Scope.USER: (int(answer[1]), int(answer[2])),
            Scope.ADDRESS: (int(answer[3]), int(answer[4])),
        }
        holds = [
            Hold(scope, until_ms / 1000, failures >= p.limit(scope))
            for scope, (failures, until_ms) in counted.items()
            if until_ms > now_ms
        ]
        # A lock before a wait; the longer of two.
        if_failed = max(holds, key=lambda h: (h.locked, h.until), default=None)
        locks = tuple(scope for scope, (failures, _) in counted.items() if failures == p.limit(scope))
        return Attempt(None, if_failed, locks)

    def succeeded(self, user: str, address: str) -> None:
        """The password was right: the user's counter goes, the address takes back this attempt."""
        self._success(
            keys=[self._key(Scope.USER, user), self._key(Scope.ADDRESS, address)],
            args=[self.policy.max_failures_per_address],
        )

    def unlock(self, *, user: str | None = None, address: str | None = None) -> int:
        """Forget the failures of ``user`` and/or ``address`` (an operator's command); how many
        counters there were."""
        keys = [self._key(Scope.USER, user)] if user is not None else []
        keys += [self._key(Scope.ADDRESS, address)] if address is not None else []
        return int(self._redis.delete(*keys)) if keys else 0
