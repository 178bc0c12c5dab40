"""The one retry policy of a step: how long it waits before it is tried again, for each cause.

A step that cannot go on now is sent again with a countdown; this module alone
decides the countdown (the task layer only applies it). Every wait is jittered
(:func:`provisioning.core.backoff.backoff_s`, full jitter, or a little added to a
known wait), at least the broker's shortest safe countdown (a second on RabbitMQ,
none on Redis) and at most the policy's cap, which stays below the Redis broker's
visibility timeout (a countdown past it would run the task twice). On RabbitMQ a
wait is rounded up to whole seconds: the broker's delayed delivery would cut it
down to them, and a step back before its time only waits again.

========================  ===========================================  ==============
cause                     wait                                         spends budget
========================  ===========================================  ==============
``TRANSIENT``             exponential from TASK_RETRY_BACKOFF_S,       yes
                          capped at TASK_RETRY_BACKOFF_MAX_S
``LEASE_BUSY``            1 to 4 s: another worker holds the Order     no
``LEDGER_DOWN``           1 to 5 s: Redis out of reach (a failover)    no
``RATE_LIMITED``          until the step's slot in the system's queue  no
                          (the limiter spaces the slots at its pace)
``BREAKER_OPEN``          until the system's circuit lets a probe in   no
``WRITEBACK_REFUSED``     a failed run's write of Failed on the Order  yes (its own:
                          refused: exponential from                    FAILURE_WRITE-
                          FAILURE_WRITEBACK_BACKOFF_S, capped at       BACK_TRIES)
                          FAILURE_WRITEBACK_BACKOFF_MAX_S
========================  ===========================================  ==============

"Spends budget": the wait follows a try that counted against the step's retries
(TASK_MAX_RETRIES, in the ledger); the others wait for something that is not the
step's fault, and a step may wait for them as often as it must. A refused failure
write has a short schedule of its own (``provisioning.runs.writeback``): its waits
are short (the Order should show the failure within a minute) and its tries few,
after which the reconciler's sweep takes it over.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from provisioning.core.backoff import backoff_s

if TYPE_CHECKING:
    from provisioning.core.settings import Settings

# The shortest wait on RabbitMQ. On quorum queues Celery 5.7 routes a countdown through native
# delayed delivery with int(countdown) seconds, and drops a task whose countdown is between 0 and
# 1 s ("countdown must be a positive number"): a whole second is always safe. On Redis (and in
# memory) the worker holds a countdown's message itself, to the millisecond.
RABBITMQ_MIN_WAIT_S = 1.0
LEASE_BUSY_BASE_S = 1.0
LEASE_BUSY_CAP_S = 4.0
LEDGER_DOWN_BASE_S = 1.0
LEDGER_DOWN_CAP_S = 5.0
# A wait for a breaker's probe gets up to this much on top, so the steps told the same time do not
# all come back at once.
KNOWN_WAIT_JITTER_S = 1.0
# A rate-limited step's wait is its slot, already spaced from the others' by the limiter: only up to
# this much on top, so that it is not back a moment before it.
RATE_SLOT_JITTER_S = 0.02


_RANDOM = random.Random()


class Cause(StrEnum):
    TRANSIENT = "transient"
    LEASE_BUSY = "lease_busy"
    LEDGER_DOWN = "ledger_down"
    RATE_LIMITED = "rate_limited"
    BREAKER_OPEN = "breaker_open"
    WRITEBACK_REFUSED = "writeback_refused"

    @property
    def spends_budget(self) -> bool:
        return self in (Cause.TRANSIENT, Cause.WRITEBACK_REFUSED)


@dataclass(frozen=True)
class RetryPolicy:
    transient_base_s: float
    transient_cap_s: float
    # No wait is longer (below the broker's visibility timeout).
    max_wait_s: float
    # No wait is shorter (what the broker can take).
    min_wait_s: float = 0.0
    # Waits in whole seconds, rounded up (RabbitMQ's delayed delivery truncates a countdown to them).
    whole_seconds: bool = False
    rng: random.Random | None = None
    # A refused failure write (WRITEBACK_REFUSED): the first wait's ceiling and the cap of every one.
    writeback_base_s: float = 2.0
    writeback_cap_s: float = 16.0

    @classmethod
    def from_settings(cls, settings: Settings, rng: random.Random | None = None) -> RetryPolicy:
        max_wait = settings.celery_visibility_timeout_s / 2
        return cls(
            transient_base_s=settings.task_retry_backoff_s,
            transient_cap_s=min(settings.task_retry_backoff_max_s, max_wait),
            max_wait_s=max_wait,
            min_wait_s=RABBITMQ_MIN_WAIT_S if settings.broker_is_rabbitmq else 0.0,
            whole_seconds=settings.broker_is_rabbitmq,
            rng=rng,
            writeback_base_s=settings.failure_writeback_backoff_s,
            writeback_cap_s=min(settings.failure_writeback_backoff_max_s, max_wait),
        )

    def wait_s(self, cause: Cause, *, attempts: int = 1, known_s: float = 0.0) -> float:
        """Seconds to wait before the next try.

        ``attempts``: the tries so far that spent budget (TRANSIENT: the step's; WRITEBACK_REFUSED: the
        failure write's, the first one included); ``known_s``: how long
        the cause is known to last (RATE_LIMITED: until the step's slot; BREAKER_OPEN: until the
        circuit lets a probe in).
        """
        rng = self.rng or _RANDOM
        if cause is Cause.TRANSIENT:
            wait = backoff_s(
                max(attempts - 1, 0), base_s=self.transient_base_s, cap_s=self.transient_cap_s, rng=rng
            )
        elif cause is Cause.WRITEBACK_REFUSED:
            wait = backoff_s(
                max(attempts - 1, 0), base_s=self.writeback_base_s, cap_s=self.writeback_cap_s, rng=rng
            )
        elif cause is Cause.LEASE_BUSY:
            wait = LEASE_BUSY_BASE_S + backoff_s(
                1, base_s=LEASE_BUSY_BASE_S, cap_s=LEASE_BUSY_CAP_S - LEASE_BUSY_BASE_S, rng=rng
            )
        elif cause is Cause.LEDGER_DOWN:
            wait = LEDGER_DOWN_BASE_S + backoff_s(
                2, base_s=LEDGER_DOWN_BASE_S, cap_s=LEDGER_DOWN_CAP_S - LEDGER_DOWN_BASE_S, rng=rng
            )
        elif cause is Cause.RATE_LIMITED:
            wait = known_s + rng.uniform(0, RATE_SLOT_JITTER_S)
        else:
            wait = known_s + rng.uniform(0, KNOWN_WAIT_JITTER_S)
        wait = min(max(wait, self.min_wait_s), self.max_wait_s)
        return float(math.ceil(wait)) if self.whole_seconds else wait

    def lease_busy(self) -> Wait:
        """The wait of a step (or a write) that found another worker holding the Order's lease."""
        return Wait(Cause.LEASE_BUSY, self.wait_s(Cause.LEASE_BUSY), "another worker holds the Order's lease")


class Wait(Exception):
    """Try the same step again in ``countdown_s`` seconds (``cause``: why, as this policy names it)."""

    def __init__(self, cause: Cause, countdown_s: float, reason: str) -> None:
        super().__init__(cause, countdown_s, reason)
        self.cause = cause
        self.countdown_s = countdown_s
        self.reason = reason
