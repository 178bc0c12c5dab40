"""What protects each external system, shared by every worker: its rate limit and its circuit breaker.

Celery's own ``rate_limit`` is per worker (celery #5732): twenty threads on four
hosts would each get the whole limit. Here the calls of every worker to one
system share one window in Redis (``lua/admit.lua``: a sliding window, so the
limit holds in any window, however it is placed; a step's later calls are
reserved for when they are expected to go out, and each call is counted again as
it does, ``lua/call_made.lua``), and one breaker
(``lua/breaker.lua``): after a run of transient failures, or a 429 or a
Retry-After, every worker stops calling the system for a cool-down, then lets
one probe through; its outcome closes the circuit or opens it again for longer.

A step asks first (:meth:`Limits.admit`: one round trip, nothing taken when the
answer is no) and reports how its call went (:meth:`Limits.record`: a round trip
only when there is something to change). Keys (in :mod:`provisioning.ledger.keys`):
``p:limits:{system}:breaker`` (hash), ``:probe`` (string), ``:calls`` (zset),
``:slots`` (zset: the steps the rate limit turned away, by when to come back),
``:leads`` (hash: how long after its step's admission a call of each number goes
out), and ``p:limits:salesforce:api`` (the Salesforce API usage the last answers
reported).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from provisioning.core.rate import Rate
from provisioning.ledger.keys import Keys
from provisioning.ledger.metrics import STEP_WAITS, counter_field
from provisioning.ledger.records import text
from provisioning.ledger.scripts import Scripts

# How long a half-open circuit's probe may take before another step may probe instead (ms): longer
# than any call (a connect timeout plus a read timeout) with room to spare.
PROBE_TTL_MS = 60_000
# How long a rate-limited step's slot is kept for it after its time (ms): a step late by more than
# this (its worker died, a long backlog) queues again at the end.
SLOT_KEEP_MS = 60_000
# How much of a longer lead than the one learned is believed at each call (a shorter one is believed
# at once): a later call reserved too early only holds its token a little longer, one reserved too
# late would be missing from a window it falls in.
LEAD_RISE = 0.05
# How long a system's learned leads are kept when none of its calls goes out (ms).
LEADS_KEEP_MS = 86_400_000


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Admission:
    """May the step call now; if not, how long until it may, and why."""

    ok: bool
    # OK: the admission's id (the window's members of its calls are ID:1, ID:2, ...), its time on
    # Redis's clock (ms) and the calls it was for.
    id: str = ""
    at_ms: int = 0
    calls: int = 0
    wait_s: float = 0.0
    cause: str | None = None  # "breaker_open" or "rate_limited"
    # OK: the circuit is closed with no failure counted, so a success needs no write.
    clean: bool = True
    # OK: this step is a half-open circuit's one probe (its id holds the probe).
    probe_id: str | None = None


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int
    cooldown_s: float
    cooldown_max_s: float


@dataclass(frozen=True)
class BreakerView:
    """A system's circuit as operators see it."""

    system: str
    state: BreakerState
    failures: int
    open_for_s: float | None  # OPEN: until the next probe may go

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "state": self.state.value,
            "failures": self.failures,
            "open_for_s": self.open_for_s,
        }


@dataclass(frozen=True)
class ApiUsage:
    """Salesforce's daily API allowance as its last answer reported it (``Sforce-Limit-Info``)."""

    used: int
    limit: int
    at: float

    @property
    def share(self) -> float:
        return self.used / self.limit if self.limit else 0.0


class Limits:
    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts) -> None:
        self._redis = client
        self._keys = keys
        self._admit = scripts["admit"]
        self._breaker = scripts["breaker"]
        self._release_probe = scripts["release_probe"]
        self._call_made = scripts["call_made"]

    def admit(self, system: str, *, rate: Rate | None, calls: int, holder: str | None = None) -> Admission:
        """One round trip: the system's breaker, then (with a rate) ``calls`` of its window.

        ``holder``: who asks (a run's step). Turned away by the rate limit, it is given a slot in the
        system's queue (``wait_s``: until then) and keeps it until it comes back; without a holder
        the answer is only the window's (its next free call).
        """
        keys = [
            self._keys.limit(system, "breaker"),
            self._keys.limit(system, "probe"),
            self._keys.limit(system, "calls"),
            self._keys.limit(system, "slots"),
            self._keys.metrics_counters,
            self._keys.limit(system, "leads"),
        ]
        admission_id = uuid.uuid4().hex
        args: list[str | int] = [
            rate.calls if rate else 0,
            int(rate.window_s * 1000) if rate else 0,
            max(calls, 1),
            admission_id,
            PROBE_TTL_MS,
            counter_field(STEP_WAITS, system=system, cause="breaker_open"),
            counter_field(STEP_WAITS, system=system, cause="rate_limited"),
            holder or "",
            SLOT_KEEP_MS,
        ]
        reply = self._admit(keys=keys, args=args)
        if int(reply[0]) == 1:
            probe = admission_id if int(reply[2]) else None
            return Admission(
                True,
                id=admission_id,
                at_ms=int(reply[3]),
                calls=max(calls, 1),
                clean=bool(int(reply[1])),
                probe_id=probe,
            )
        return Admission(False, wait_s=int(reply[1]) / 1000, cause=text(reply[2]))

    def call_made(self, system: str, admission: Admission, number: int, *, rate: Rate) -> None:
        """The admitted step's call ``number`` (from 1) goes out now: the window counts it from now,
        and learns how long after their admission the calls of that number go out."""
        self._call_made(
            keys=[self._keys.limit(system, "calls"), self._keys.limit(system, "leads")],
            args=[
                f"{admission.id}:{number}",
                int(rate.window_s * 1000),
                number,
                admission.calls,
                admission.at_ms,
                LEAD_RISE,
                LEADS_KEEP_MS,
            ],
        )

    def release_probe(self, system: str, admission: Admission) -> None:
        """The step admitted as the probe did not call after all: the next one may probe at once."""
        if admission.probe_id is not None:
            self._release_probe(keys=[self._keys.limit(system, "probe")], args=[admission.probe_id])

    def record(
        self, system: str, outcome: Outcome, policy: BreakerPolicy, *, retry_after_s: float | None = None
    ) -> BreakerState:
        """How a call to ``system`` went; returns the circuit's state after it."""
        keys = [self._keys.limit(system, "breaker"), self._keys.limit(system, "probe")]
        args: list[str | int] = [
            outcome.value,
            policy.failures,
            int(policy.cooldown_s * 1000),
            int(policy.cooldown_max_s * 1000),
            int((retry_after_s or 0) * 1000),
        ]
        return BreakerState(text(self._breaker(keys=keys, args=args)))

    def breakers(self, systems: list[str]) -> list[BreakerView]:
        """Every system's circuit: one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for system in systems:
            pipe.hgetall(self._keys.limit(system, "breaker"))
        pipe.time()  # the scripts keep Redis's time
        *answers, (seconds, micros) = pipe.execute()
        now_ms = seconds * 1000 + micros / 1000
        views = []
        for system, raw in zip(systems, answers, strict=True):
            data = {text(k): text(v) for k, v in raw.items()}
            state = BreakerState(data.get("state", BreakerState.CLOSED.value))
            open_until = float(data.get("open_until_ms", 0))
            open_for = max(0.0, (open_until - now_ms) / 1000) if state is BreakerState.OPEN else None
            views.append(BreakerView(system, state, int(data.get("failures", 0)), open_for))
        return views

    # -- the Salesforce API budget ------------------------------------------------------------------
    def record_api_usage(self, used: int, limit: int) -> None:
        self._redis.hset(
            self._keys.limit("salesforce", "api"),
            mapping={"used": used, "limit": limit, "at": repr(time.time())},
        )

    def api_usage(self) -> ApiUsage | None:
        raw = self._redis.hgetall(self._keys.limit("salesforce", "api"))
        if not raw:
            return None
        data = {text(k): text(v) for k, v in raw.items()}
        return ApiUsage(int(data["used"]), int(data["limit"]), float(data["at"]))
