"""The external systems' protection as a step meets it: admitted before it calls, its outcome after.

Each system (Salesforce, WHMCS, the SM-DP+, SMTP) has a global rate limit
(``RATE_LIMIT_<SYSTEM>``, empty: none) and a circuit breaker (``BREAKER_*``),
shared by every worker through the ledger (:mod:`provisioning.ledger.limits`). A
step that may not call now does not sleep in its worker's thread: it is retried
with a countdown until its slot in the system's queue or the breaker's next
probe, and that wait spends none of its retry budget (``core/retry.py``). Once
admitted, each of its calls is counted again as it goes out (:meth:`counting`),
so that the limit holds for the calls as the system receives them.

Only the system's own failures count against its breaker: a transient error of
its client (``SYSTEM_ERRORS``, one table), not the ledger's or the inventory's. A
permanent error is an answer: the system is up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from provisioning.core import calls
from provisioning.core.errors import ProvisioningError, TransientError
from provisioning.core.logs import get_logger
from provisioning.core.rate import Rate
from provisioning.core.retry import Cause, RetryPolicy, Wait
from provisioning.core.settings import Settings
from provisioning.email.errors import EmailError
from provisioning.esim.errors import Es2PlusError
from provisioning.ledger.limits import Admission, BreakerPolicy, BreakerState, Limits, Outcome
from provisioning.salesforce.errors import SalesforceError
from provisioning.step.spec import System
from provisioning.whmcs.errors import WhmcsError

log = get_logger(__name__)

# Whose failure an error is: the root error of each system's client.
SYSTEM_ERRORS: Mapping[System, type[ProvisioningError]] = MappingProxyType(
    {
        System.SALESFORCE: SalesforceError,
        System.WHMCS: WhmcsError,
        System.SMDP: Es2PlusError,
        System.SMTP: EmailError,
    }
)


class Protection:
    def __init__(self, limits: Limits, settings: Settings, retry: RetryPolicy) -> None:
        self._limits = limits
        self._retry = retry
        self._rates: dict[System, Rate | None] = {
            System.SALESFORCE: _rate(settings.rate_limit_salesforce),
            System.WHMCS: _rate(settings.rate_limit_whmcs),
            System.SMDP: _rate(settings.rate_limit_smdp),
            System.SMTP: _rate(settings.rate_limit_smtp),
        }
        self._breaker = BreakerPolicy(
            failures=settings.breaker_failures,
            cooldown_s=settings.breaker_cooldown_s,
            cooldown_max_s=settings.breaker_cooldown_max_s,
        )

    def rate(self, system: System) -> Rate | None:
        return self._rates[system]

    def admit(self, system: System, calls: int, holder: str) -> Admission:
        """May ``calls`` go to ``system`` now; ``Wait`` (spending no budget), with the retry policy's countdown, if not.

        ``holder`` names the step asking (its run and step): turned away by the rate limit, it keeps
        its place in the system's queue until it comes back.
        """
        rate = self._rates[system]
        admission = self._limits.admit(system.value, rate=rate, calls=calls, holder=holder)
        if admission.ok:
            return admission
        if admission.cause == "rate_limited":
            # The limiter spaces the queued steps' slots at the limit's pace: the wait is the slot.
            countdown = self._retry.wait_s(Cause.RATE_LIMITED, known_s=admission.wait_s)
            raise Wait(Cause.RATE_LIMITED, countdown, f"{system.value}'s rate limit ({rate}) is reached")
        countdown = self._retry.wait_s(Cause.BREAKER_OPEN, known_s=admission.wait_s)
        raise Wait(Cause.BREAKER_OPEN, countdown, f"{system.value}'s circuit is open after repeated failures")

    @contextmanager
    def counting(self, system: System, admission: Admission) -> Iterator[None]:
        """Within the block (the admitted step's action), each call to ``system`` is counted by its
        rate limit as it goes out, not when the step was admitted (``core/calls.py``)."""
        rate = self._rates[system]
        if rate is None:
            yield
            return
        numbers = itertools.count(1)

        def going_out() -> None:
            self._limits.call_made(system.value, admission, next(numbers), rate=rate)

        with calls.counting(system.value, going_out):
            yield

    def called(self, system: System, admission: Admission, error: BaseException | None) -> None:
        """How the step's calls to ``system`` went (``error``: what it raised, None when it did not)."""
        if isinstance(error, SYSTEM_ERRORS[system]) and isinstance(error, TransientError):
            outcome = Outcome.THROTTLED if error.throttled else Outcome.FAILED
            state = self._limits.record(
                system.value, outcome, self._breaker, retry_after_s=error.retry_after_s
            )
            if state is BreakerState.OPEN:
                log.warning(
                    "breaker_open", system=system.value, error=str(error), retry_after_s=error.retry_after_s
                )
            return
        if isinstance(error, Exception) and not isinstance(error, SYSTEM_ERRORS[system]):
            # Not the system's failure (the ledger, the inventory, a bug): it says nothing of the system.
            self._limits.release_probe(system.value, admission)
            return
        if not admission.clean:
            state = self._limits.record(system.value, Outcome.OK, self._breaker)
            if admission.probe_id is not None:
                log.info("breaker_closed", system=system.value, state=state.value)

    def not_called(self, system: System, admission: Admission) -> None:
        """The step was admitted but did not call after all (done already, the lease was taken)."""
        self._limits.release_probe(system.value, admission)


def _rate(text: str | None) -> Rate | None:
    return Rate.parse(text) if text else None
