"""A run's life, without Celery: begin it, run each step, end it (done, failed, joined, skipped).

The tasks in ``tasks/`` are thin wrappers: they call :func:`begin_run` and
:func:`run_step` and turn :class:`RetryLater` into a Celery retry,
:class:`RunEnded` into ``Ignore`` and :class:`RunFailed` into a failed task.

Begin, under the Order's lease, in this order:

1. A run that started its chain or ended already is a duplicate: nothing to do.
2. Another run of the Order is in flight: this run joins it (one provisioning
   per Order, whatever the events). A failed run of the Order is superseded by
   this one, which continues from its last finished step.
3. Read the Order (ONE SOQL query); unless it says ``Activating``, skip.
4. Record the run as running: the Order's provisioning is now this run's.

Each step, in this order (what makes a step safe to run any number of times):

1. The run ended (failed, joined, superseded): stop, later steps must not run.
2. The step is done (by this run, or for the Order by an earlier one): return its result.
3. Take the Order's lease; if another worker holds it, retry shortly.
4. Act. Each action is idempotent on its own (intent records, idempotency keys
   derived from the Order, lookups before acting): a worker can die at any instant.
5. Record the result, then return it (ids only) to the next step.

Transient errors are retried with backoff, bounded by count (TASK_MAX_RETRIES) and
by the run's age (TASK_MAX_AGE_S); permanent errors and exhausted retries end the
run: failed in the ledger, Failed on the Order. The welcome e-mail is the
exception: it is sent after the Order says Activated, so a refused e-mail ends
the run done, lists the Order as undelivered and tells the Order's user why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from provisioning.backoff import backoff_s, tenacity_wait
from provisioning.chain import ENTRY_STEP, STEPS, Step
from provisioning.context import StepContext
from provisioning.errors import PermanentError, TransientError
from provisioning.esim.steps import is_esim
from provisioning.ledger import Provisioning, RunRecord, RunState
from provisioning.logs import get_logger
from provisioning.metrics import FailureCause, StepObservation, observe_step
from provisioning.order import Order
from provisioning.results import EsimActivated, PaymentChecked, StepResult, WelcomeEmail, WhmcsOrderCreated
from provisioning.run_id import RunId
from provisioning.salesforce.errors import OrderNotFound
from provisioning.services import Services
from provisioning.settings import Settings

log = get_logger(__name__)

ACTIVATING = "Activating"
# Another worker holds the Order's lease: look again after about this long.
LEASE_BUSY_RETRY_S = 2.0
# Writes of the Order where no task retry can take over (a failure, a requeue): a few quick tries.
WRITEBACK_ATTEMPTS = 3
WRITEBACK_BACKOFF_S = 1.0
WRITEBACK_BACKOFF_MAX_S = 4.0


class RetryLater(Exception):
    """Try the same task again in ``countdown_s`` seconds."""

    def __init__(self, countdown_s: float, reason: str) -> None:
        super().__init__(countdown_s, reason)
        self.countdown_s = countdown_s
        self.reason = reason


class RunEnded(Exception):
    """The run is not running (failed, joined, superseded, unknown): the rest of its chain must not run."""


class RunFailed(Exception):
    """The run ended at this step; the reason is on the Order and in the ledger (an expected failure)."""


def retry_backoff_s(settings: Settings, retries: int) -> float:
    """A task retry's countdown, kept below the broker's visibility timeout."""
    cap = min(settings.task_retry_backoff_max_s, settings.celery_visibility_timeout_s / 2)
    return backoff_s(retries, base_s=settings.task_retry_backoff_s, cap_s=cap)


# -- beginning a run ---------------------------------------------------------------------------


@dataclass
class Begun:
    """What the entry task does next: start the chain at ``first_step``, or nothing (``result`` says why)."""

    first_step: Step | None
    result: dict[str, Any]


def begin_run(services: Services, run_id: RunId, *, retries: int) -> Begun:
    ledger = services.ledger
    run = ledger.get(run_id)
    if _already_begun(run):
        assert run is not None
        log.info("duplicate_event_ignored", state=run.state.value)
        return Begun(None, {"duplicate": True, "state": run.state.value})
    with ledger.holding(run_id.order_id) as lease:
        if lease is None:
            log.info("order_being_worked_on_elsewhere")
            raise RetryLater(LEASE_BUSY_RETRY_S, "another worker holds the Order's lease")
        run = ledger.get(run_id)
        if _already_begun(run):
            assert run is not None
            return Begun(None, {"duplicate": True, "state": run.state.value})
        provisioning = ledger.provisioning(run_id.order_id)
        superseded: RunId | None = None
        if provisioning.active and provisioning.active != str(run_id):
            other_id = RunId.parse(provisioning.active)
            other = ledger.get(other_id)
            if other is not None and other.state.unfinished:
                ledger.join(run_id, other_id)
                log.info("run_joined", joined=str(other_id))
                return Begun(None, {"joined": str(other_id)})
            if other is not None and other.state is RunState.FAILED:
                superseded = other_id
        try:
            order = services.salesforce.fetch_order(run_id.order_id)
        except OrderNotFound as exc:
            ledger.skip(run_id, f"skipped: {exc}")
            log.warning("order_not_found_run_skipped", error=str(exc))
            return Begun(None, {"skipped": "order not found"})
        except TransientError as exc:
            if retries < services.settings.task_max_retries:
                raise RetryLater(retry_backoff_s(services.settings, retries), str(exc)) from exc
            fail_run(
                services,
                run_id,
                ENTRY_STEP,
                f"gave up reading the Order: {exc}",
                cause=FailureCause.TRANSIENT_EXHAUSTED,
            )
            raise RunFailed(f"{ENTRY_STEP}: {exc}") from None
        except PermanentError as exc:
            fail_run(services, run_id, ENTRY_STEP, str(exc))
            raise RunFailed(f"{ENTRY_STEP}: {exc}") from None
        if order.activation_status != ACTIVATING:
            reason = f"skipped: the Order is {order.activation_status!r}, not {ACTIVATING!r}: nothing to do"
            ledger.skip(run_id, reason)
            log.warning("order_not_activating", status=order.activation_status, reason=reason)
            return Begun(None, {"skipped": reason})
        if superseded is not None:
            ledger.supersede(superseded, by=run_id)
            log.warning("failed_run_superseded", superseded=str(superseded))
        note = None
        if provisioning.gen == 1 and not provisioning.has_effects and order.whmcs_order_id:
            _adopt_from_order(services, run_id, order)
            provisioning = ledger.provisioning(run_id.order_id)
            note = "the Order already had its effects (found on the Order): no new effect"
        elif provisioning.has_effects and provisioning.active and provisioning.active != str(run_id):
            note = f"continues the provisioning of run {provisioning.active}: no effect is made twice"
        ledger.start(run_id, order.model_dump(mode="json"), note=note)
        run = ledger.get(run_id)
        assert run is not None
        first = run.first_unfinished_step(provisioning) or STEPS[-1]
    return Begun(first, {"run_id": str(run_id), "first_step": first.value})


def _already_begun(run: RunRecord | None) -> bool:
    return run is not None and (run.chain_started or not run.state.unfinished)


def _adopt_from_order(services: Services, run_id: RunId, order: Order) -> None:
    """The ledger forgot this Order (past its retention), but the Order says what it got: keep that."""
    esim = EsimActivated(iccid=order.esim_iccid) if is_esim(order.sim_type) else EsimActivated(sim="physical")
    results: dict[Step, dict[str, Any]] = {
        Step.VALIDATE_PAYMENT: PaymentChecked(adopted=True).to_json(),
        Step.ACTIVATE_ESIM: esim.to_json(),
        Step.CREATE_WHMCS_ORDER: WhmcsOrderCreated(whmcs_order_id=int(order.whmcs_order_id or 0)).to_json(),
        Step.SEND_EMAIL: WelcomeEmail(delivery="not resent (adopted)").to_json(),
    }
    markers = {"whmcs_accepted": "1", "outbox": "sent"}
    if order.activated_at:
        markers["activated_at"] = order.activated_at
    services.ledger.adopt(run_id, results, markers)
    log.warning("effects_adopted_from_order", whmcs_order_id=order.whmcs_order_id)


# -- one step ----------------------------------------------------------------------------------

Action = Callable[[StepContext], StepResult]
_ENDED = (RunState.FAILED, RunState.JOINED, RunState.SUPERSEDED, RunState.SKIPPED)


def run_step(
    services: Services, run_id: RunId, step: Step, action: Action, *, retries: int
) -> dict[str, Any]:
    ledger = services.ledger
    run = ledger.get(run_id)
    if run is None:
        log.error("step_for_unknown_run", step=step.value)
        raise RunEnded(f"run {run_id} is not in the ledger")
    if run.state in _ENDED:
        log.warning("step_stopped_run_ended", step=step.value, state=run.state.value)
        raise RunEnded(f"run {run_id} is {run.state.value}")
    recorded = run.step(step, ledger.provisioning(run_id.order_id))
    if recorded.done:
        log.info("step_already_done", step=step.value)
        if step is STEPS[-1] and run.state is RunState.RUNNING:
            # Its worker died between recording the last step and ending the run.
            ledger.finish(run_id)
        return recorded.result or {}

    with ledger.holding(run_id.order_id) as lease:
        if lease is None:
            log.info("step_lease_busy", step=step.value)
            raise RetryLater(LEASE_BUSY_RETRY_S, "another worker holds the Order's lease")
        # Re-read under the lease: the holder we waited for may have done this step.
        provisioning = ledger.provisioning(run_id.order_id)
        run = ledger.get(run_id) or run
        recorded = run.step(step, provisioning)
        if recorded.done:
            return recorded.result or {}
        attempt = ledger.record_attempt(run_id, step)
        started = time.monotonic()
        try:
            result = action(StepContext(services, run_id, provisioning, lease)).to_json()
        except TransientError as exc:
            ledger.record_error(run_id, step, str(exc))
            settings = services.settings
            age_s = time.time() - run.created_at
            if retries < settings.task_max_retries and age_s < settings.task_max_age_s:
                countdown = retry_backoff_s(settings, retries)
                log.warning(
                    "step_retry",
                    step=step.value,
                    attempt=attempt,
                    countdown_s=round(countdown, 2),
                    error=str(exc),
                )
                raise RetryLater(countdown, str(exc)) from exc
            reason = f"gave up after {attempt} attempts: {exc}"
            observed = _observe(run, step, attempt, started)
            return _terminal(
                services, run, provisioning, step, reason, FailureCause.TRANSIENT_EXHAUSTED, observed
            )
        except PermanentError as exc:
            ledger.record_error(run_id, step, str(exc))
            observed = _observe(run, step, attempt, started)
            return _terminal(services, run, provisioning, step, str(exc), FailureCause.PERMANENT, observed)
        ledger.record_step(run_id, step, result, observed=_observe(run, step, attempt, started))
        if step is STEPS[-1]:
            ledger.finish(run_id)
            log.info("run_done")
        log.info("step_done", step=step.value, attempt=attempt, **result)
        return result


def _observe(run: RunRecord, step: Step, attempts: int, started: float) -> StepObservation:
    return observe_step(
        step,
        attempts=attempts,
        started_monotonic=started,
        run_created_at=run.created_at,
        origin=run.origin.value,
    )


def _terminal(
    services: Services,
    run: RunRecord,
    provisioning: Provisioning,
    step: Step,
    reason: str,
    cause: FailureCause = FailureCause.PERMANENT,
    observed: StepObservation | None = None,
) -> dict[str, Any]:
    if step is Step.SEND_EMAIL and run.step(Step.UPDATE_SALESFORCE, provisioning).done:
        # The Order is Activated and live: a notification that cannot go out does not undo that.
        email_undelivered(services, run.run_id, reason)
        services.ledger.finish(run.run_id, note=f"done; the welcome e-mail was not delivered: {reason}")
        return WelcomeEmail(delivery="refused").to_json()
    fail_run(services, run.run_id, step.value, reason, cause=cause, observed=observed)
    raise RunFailed(f"{step.value}: {reason}")


# -- ending badly --------------------------------------------------------------------------------


def fail_run(
    services: Services,
    run_id: RunId,
    step: str,
    reason: str,
    *,
    cause: FailureCause = FailureCause.PERMANENT,
    observed: StepObservation | None = None,
) -> None:
    """Terminal failure: ledger first (the operators' record), then the Order shows Failed.

    Should the write-back not happen (Salesforce keeps refusing, or the worker dies first),
    the run stays in the ledger's write-back set and the reconciler writes it later.
    """
    services.ledger.fail(run_id, step, reason, cause=cause, observed=observed)
    log.warning("run_failed", run_id=str(run_id), order_id=run_id.order_id, step=step, reason=reason)
    if write_order(services, run_id.order_id, failure_fields(services, step, reason), what="failure"):
        services.ledger.writeback_done(run_id)


def failure_fields(services: Services, step: str, reason: str) -> dict[str, object]:
    return services.salesforce.field_names.patch(
        activation_status="Failed", activation_error=f"{step}: {reason}"
    )


def email_undelivered(services: Services, run_id: RunId, reason: str) -> None:
    """List the Order for operators and tell the Order's user, leaving it Activated."""
    services.ledger.email_refused(run_id.order_id, reason)
    log.warning("email_undelivered", run_id=str(run_id), order_id=run_id.order_id, reason=reason)
    fields = services.salesforce.field_names.patch(
        activation_error=f"Activated; the welcome e-mail was not delivered: {reason}"
    )
    write_order(services, run_id.order_id, fields, what="undelivered e-mail")


def write_order(services: Services, order_id: str, fields: dict[str, object], *, what: str) -> bool:
    """One PATCH, with a few short tries: used where no task retry can take over."""
    try:
        for attempt in Retrying(
            stop=stop_after_attempt(WRITEBACK_ATTEMPTS),
            wait=tenacity_wait(base_s=WRITEBACK_BACKOFF_S, cap_s=WRITEBACK_BACKOFF_MAX_S),
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        ):
            with attempt:
                services.salesforce.update_order(order_id, fields)
        return True
    except Exception as exc:
        log.error("order_writeback_failed", what=what, order_id=order_id, error=str(exc))
        return False
