"""A failed run's write of ``Failed`` on the Order, on a short schedule of its own (without Celery).

A run that fails is recorded in the ledger first, which also puts it in the write-back set
(``p:writeback``); then the worker that failed it writes the failure on the Order, once, at once
(:func:`first_try`, under the Order's lease the step holds). Should Salesforce refuse it for now
(down, 503, ``UNABLE_TO_LOCK_ROW``, rate-limited: a ``TransientError``), the write is tried again by
the task ``provisioning.write_failure_on_order`` (``tasks/writeback.py``, sent by the step's task),
which calls :func:`retry` with the countdown :class:`provisioning.core.retry.RetryPolicy` chooses for
``WRITEBACK_REFUSED``: exponential from FAILURE_WRITEBACK_BACKOFF_S, capped at
FAILURE_WRITEBACK_BACKOFF_MAX_S, full jitter; at most FAILURE_WRITEBACK_TRIES tries in all (the
defaults: 6 tries, the waits' ceilings 2 + 4 + 8 + 16 + 16 = 46 s). After the last the run stays in
the write-back set and the listener's reconciler writes it after RECONCILE_IDLE_S
(``runs/reconciler.py:repair_failure_writebacks``), as it does for a worker killed before writing.

Each try is counted (``failure_writebacks{outcome}``: written, retried, given_up); the set's size is
``provisioning_failure_writebacks_pending``.

Why a repeat writes nothing twice: every try checks, under the Order's lease, that the run is still
in the write-back set and still failed, and takes it out of the set once the PATCH is answered; the
PATCH sets absolute values (``Failed`` and the run's error), so a repeat after a lost answer writes
the same thing. A requeue or a newer run of the Order (which take the run out of the set, or hold
the lease) is never overwritten with this run's failure.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from provisioning.core.errors import TransientError
from provisioning.core.logs import get_logger
from provisioning.core.retry import Cause, Wait
from provisioning.core.run_id import RunId
from provisioning.ledger import BEGIN, RunState
from provisioning.ledger.metrics import FailureWriteback

if TYPE_CHECKING:
    from provisioning.runs.services import Services

log = get_logger(__name__)

# The task that retries a refused failure write (tasks/writeback.py); sent by name.
WRITE_FAILURE_TASK = "provisioning.write_failure_on_order"


class Outcome(StrEnum):
    """What one try of the write ended with (a refusal to try again is a ``Wait`` instead)."""

    WRITTEN = "written"
    # Nothing to write: the Order shows it already (an earlier try, the reconciler), the run was
    # requeued or superseded.
    NOT_NEEDED = "not_needed"
    # The schedule is over; the run stays in the write-back set for the reconciler.
    GIVEN_UP = "given_up"


def failure_fields(services: Services, step: str, reason: str) -> dict[str, object]:
    """The PATCH that makes the Order show the run's failure (absolute values)."""
    return services.salesforce.field_names.patch(
        activation_status="Failed", activation_error=f"{step}: {reason}"
    )


def first_try(services: Services, run_id: RunId, step: str, reason: str) -> float | None:
    """The write right after the run failed, by the worker holding the Order's lease: one PATCH.

    Returns None when it is done with (written, or refused for good: left to the reconciler), or the
    countdown after which the write-back task should try again (refused for now).
    """
    try:
        services.salesforce.update_order(run_id.order_id, failure_fields(services, step, reason))
    except TransientError as exc:
        return _again(services, run_id, 1, exc)
    except Exception as exc:
        _give_up(services, run_id, 1, exc)
        return None
    services.ledger.registries.writeback_done(run_id, written=True)
    return None


def retry(services: Services, run_id: RunId, tries: int) -> Outcome:
    """Try number ``tries`` (2 and up: the first was :func:`first_try`) of writing the run's failure.

    Raises ``Wait`` when the write should be tried again: refused for now (WRITEBACK_REFUSED, spending
    a try) or the Order's lease held (LEASE_BUSY: another worker or the reconciler is at the Order;
    it spends a try too, so that the schedule stays short).
    """
    ledger = services.ledger
    if not ledger.registries.awaiting_writeback(run_id):
        return Outcome.NOT_NEEDED
    last = tries >= services.settings.failure_writeback_tries
    with ledger.leases.holding(run_id.order_id) as lease:
        if lease is None:
            if last:
                _give_up(services, run_id, tries, "the Order's lease stayed held")
                return Outcome.GIVEN_UP
            log.info("failure_writeback_lease_busy", run_id=str(run_id), attempt=tries)
            raise services.retry.lease_busy()
        # Checked again under the lease: another try or the reconciler may have written it meanwhile.
        if not ledger.registries.awaiting_writeback(run_id):
            return Outcome.NOT_NEEDED
        run = ledger.runs.get(run_id)
        if run is None or run.state is not RunState.FAILED:
            ledger.registries.writeback_done(run_id)
            return Outcome.NOT_NEEDED
        fields = failure_fields(services, run.failed_step or BEGIN, run.error or "")
        try:
            services.salesforce.update_order(run_id.order_id, fields)
        except TransientError as exc:
            again = _again(services, run_id, tries, exc)
            if again is None:
                return Outcome.GIVEN_UP
            raise Wait(Cause.WRITEBACK_REFUSED, again, str(exc)) from exc
        except Exception as exc:
            _give_up(services, run_id, tries, exc)
            return Outcome.GIVEN_UP
        ledger.registries.writeback_done(run_id, written=True)
    log.warning("failure_writeback_written", run_id=str(run_id), attempt=tries, step=run.failed_step)
    return Outcome.WRITTEN


def _again(services: Services, run_id: RunId, tries: int, exc: BaseException) -> float | None:
    """A refusal for now: the countdown to the next try, or None when the tries are spent."""
    if tries >= services.settings.failure_writeback_tries:
        _give_up(services, run_id, tries, exc)
        return None
    countdown = services.retry.wait_s(Cause.WRITEBACK_REFUSED, attempts=tries)
    services.ledger.metrics.failure_writeback(None, FailureWriteback.RETRIED)
    log.warning(
        "failure_writeback_retry",
        run_id=str(run_id),
        order_id=run_id.order_id,
        attempt=tries,
        countdown_s=round(countdown, 2),
        error=str(exc),
    )
    return countdown


def _give_up(services: Services, run_id: RunId, tries: int, why: BaseException | str) -> None:
    """The schedule ends here; the run stays in the write-back set, where the reconciler finds it."""
    services.ledger.metrics.failure_writeback(None, FailureWriteback.GIVEN_UP)
    log.error(
        "order_writeback_failed",
        what="failure",
        run_id=str(run_id),
        order_id=run_id.order_id,
        attempt=tries,
        error=str(why),
        then="left to the reconciler (RECONCILE_IDLE_S)",
    )
