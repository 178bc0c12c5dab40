"""A run's life, without Celery: each step, the run's beginning in its first, its end.

The tasks in ``tasks/`` call :func:`run_step` for one step after another while
each is done: they turn :class:`RetryLater` into a Celery retry (or a task of the
step's own, sent with the countdown), :class:`RunEnded` into a result that ends
the run, and :class:`RunFailed` into a failed task (an expected one).

Each step, in this order (what makes a step safe to run any number of times):

1. One round trip (:meth:`Ledger.claim_step`): the run ended (failed, joined,
   superseded, skipped): stop, later steps must not run; the step is done (by this
   run, or for the Order by an earlier one): return its result; another worker
   holds the Order's lease: retry shortly; else take the lease, count the attempt,
   set the marker the step needs from its Order's first try (STAMPED_AT_CLAIM: the
   WHMCS intent, the activation time) unless the Order has it, and read the run,
   the Order's provisioning and its snapshot.
2. A run that has not begun begins, in its first step, under that lease: another
   run of the Order in flight means this one joins it (one provisioning per
   Order, whatever the events); a failed run of the Order is superseded by this
   one, which continues from its last finished step; the Order is read (ONE SOQL
   query) and, unless it says ``Activating``, the run is skipped.
3. Act. Each action is idempotent on its own (intent records, idempotency keys
   derived from the Order, lookups before acting): a worker can die at any instant.
4. One round trip (:meth:`Ledger.end_step`): record the result (ids only) and the
   results of the steps after it that have nothing to do for the Order
   (NOTHING_TO_DO: a physical SIM's eSIM step), end the run after its last step,
   give the lease back; name the next step to run.

Transient errors are retried with backoff, bounded by count (TASK_MAX_RETRIES) and
by the run's age (TASK_MAX_AGE_S); permanent errors and exhausted retries end the
run: failed in the ledger, Failed on the Order. The welcome e-mail is the
exception: it is sent after the Order says Activated, so a refused e-mail ends
the run done, lists the Order as undelivered and tells the Order's user why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioning.core.backoff import backoff_s, retrying_transient
from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.logs import get_logger
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.esim.steps import is_esim
from provisioning.esim.steps import nothing_to_do as esim_not_needed
from provisioning.ledger import Provisioning, RunRecord, RunState
from provisioning.ledger.metrics import FailureCause, StepObservation, observe_step
from provisioning.runs.services import Services
from provisioning.salesforce.errors import OrderNotFound
from provisioning.salesforce.steps import ACTIVATED_AT_MARKER, salesforce_now
from provisioning.step.chain import ENTRY_STEP, STEPS, Step
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import (
    EsimActivated,
    PaymentChecked,
    StepResult,
    WelcomeEmail,
    WhmcsOrderCreated,
)
from provisioning.whmcs.steps import WHMCS_INTENT_MARKER, intent_stamp

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
    """The run ends here without failing here (joined, skipped, ended before): its chain stops.

    ``result`` is what the step reports instead of a result of its own.
    """

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


class RunFailed(Exception):
    """The run ended at this step; the reason is on the Order and in the ledger (an expected failure)."""


def retry_backoff_s(settings: Settings, attempts: int) -> float:
    """The countdown after ``attempts`` failed attempts, kept below the broker's visibility timeout."""
    cap = min(settings.task_retry_backoff_max_s, settings.celery_visibility_timeout_s / 2)
    return backoff_s(max(attempts - 1, 0), base_s=settings.task_retry_backoff_s, cap_s=cap)


# -- one step (and the run's beginning, in its first step) -------------------------------------

Action = Callable[[StepContext], StepResult]

# The ledger out of reach: a Sentinel failover (a few seconds), a network cut (longer), a demoted
# primary still answering. The step is tried again after a short jittered wait. Nothing could be
# recorded, so it spends none of the step's budget; Celery's own bound on a message's retries
# (tasks.steps.max_retries) still ends an outage that lasts, and the reconciler resumes the run.
LEDGER_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
LEDGER_UNREACHABLE_RETRY_BASE_S = 1.0
LEDGER_UNREACHABLE_RETRY_CAP_S = 5.0


@dataclass(frozen=True)
class StepDone:
    """A step done (now, or before): its result, and the step to run next (None: the run is over)."""

    result: dict[str, Any]
    next_step: Step | None


# Steps that can have nothing to do for an Order: what such a step records, without being run.
# The step before it records that result with its own and the step after it runs next (one claim
# and one end fewer per run). Run anyway (an operator's resume), the step records the same.
NOTHING_TO_DO: Mapping[Step, Callable[[Order], StepResult | None]] = MappingProxyType(
    {Step.ACTIVATE_ESIM: esim_not_needed}
)


# Markers a step needs set at its Order's first try: set by the step's claim unless the Order has
# them (no round trip of their own). The activation time goes on the Order, and every write of it
# (a retry after a lost answer, a later run) must send the same value. The WHMCS intent must be
# in the ledger before AddOrder: a try that finds another try's intent looks the order up first.
STAMPED_AT_CLAIM: Mapping[Step, tuple[str, Callable[[], str]]] = MappingProxyType(
    {
        Step.UPDATE_SALESFORCE: (ACTIVATED_AT_MARKER, salesforce_now),
        Step.CREATE_WHMCS_ORDER: (WHMCS_INTENT_MARKER, intent_stamp),
    }
)


def run_step(services: Services, run_id: RunId, step: Step, action: Action) -> StepDone:
    """Run one step of one run; the first step of a run that has not begun begins it."""
    try:
        return _run_step(services, run_id, step, action)
    except LEDGER_UNREACHABLE as exc:
        countdown = backoff_s(2, base_s=LEDGER_UNREACHABLE_RETRY_BASE_S, cap_s=LEDGER_UNREACHABLE_RETRY_CAP_S)
        log.warning(
            "step_ledger_unreachable", step=step.value, countdown_s=round(countdown, 2), error=str(exc)
        )
        raise RetryLater(countdown, f"the ledger is unreachable: {exc}") from exc


def _run_step(services: Services, run_id: RunId, step: Step, action: Action) -> StepDone:
    ledger = services.ledger
    claimed_at = time.monotonic()
    stamping = STAMPED_AT_CLAIM.get(step)
    stamp = (stamping[0], stamping[1]()) if stamping else None
    claim = ledger.claim_step(run_id, step, stamp=stamp)
    if claim.status == "ended":
        assert claim.state is not None
        log.warning("step_stopped_run_ended", step=step.value, state=claim.state.value)
        raise RunEnded({"ended": claim.state.value})
    if claim.status == "done":
        log.debug("step_already_done", step=step.value)
        if step is STEPS[-1] and claim.state is RunState.RUNNING:
            # Its worker died between recording the last step and ending the run.
            ledger.finish(run_id)
        return StepDone(claim.result or {}, step.next)
    if claim.status == "busy":
        log.info("step_lease_busy", step=step.value)
        raise RetryLater(LEASE_BUSY_RETRY_S, "another worker holds the Order's lease")
    assert claim.lease is not None
    assert claim.provisioning is not None
    lease = claim.lease
    try:
        provisioning = claim.provisioning
        snapshot = claim.snapshot
        run = claim.run
        attempts = claim.attempts
        if claim.state in (None, RunState.QUEUED):
            begun = _begin(services, run_id, provisioning, step)
            if begun.run is None or begun.provisioning is None:
                raise RunEnded(begun.result)
            run, provisioning, snapshot = begun.run, begun.provisioning, begun.snapshot
            attempts = begun.attempts
            recorded = run.step(step, provisioning)
            if recorded.done:  # a re-approval: the Order's effects exist, the chain moves on
                return StepDone(recorded.result or {}, step.next)
        assert run is not None
        ctx = StepContext(
            services, run_id, provisioning, lease, snapshot, lease_set_at=claimed_at, stamp=stamp
        )
        started = time.monotonic()
        try:
            result = action(ctx).to_json()
        except TransientError as exc:
            ledger.record_error(
                run_id, step, str(exc), markers=ctx.pending_markers, writes=ctx.pending_writes
            )
            settings = services.settings
            age_s = time.time() - run.created_at
            # The budget is the step's attempts in the ledger: waits for the lease do not spend it.
            if attempts <= settings.task_max_retries and age_s < settings.task_max_age_s:
                countdown = retry_backoff_s(settings, attempts)
                log.warning(
                    "step_retry",
                    step=step.value,
                    attempt=attempts,
                    countdown_s=round(countdown, 2),
                    error=str(exc),
                )
                raise RetryLater(countdown, str(exc)) from exc
            reason = f"gave up after {attempts} attempts: {exc}"
            observed = _observe(run, step, attempts, started)
            return _terminal(
                services, run, provisioning, step, reason, FailureCause.TRANSIENT_EXHAUSTED, observed
            )
        except PermanentError as exc:
            ledger.record_error(
                run_id, step, str(exc), markers=ctx.pending_markers, writes=ctx.pending_writes
            )
            observed = _observe(run, step, attempts, started)
            return _terminal(services, run, provisioning, step, str(exc), FailureCause.PERMANENT, observed)
        except BaseException:
            # Anything else (the ledger out of reach, a bug): what the step did is still worth keeping.
            if ctx.pending_markers or ctx.pending_writes:
                with suppress(Exception):
                    ledger.set_markers(run_id.order_id, ctx.pending_markers, ctx.pending_writes)
            raise
        next_step, skipped = _next_step(step, ctx, run)
        ledger.end_step(
            run_id,
            step,
            result,
            lease,
            finish=next_step is None,
            observed=_observe(run, step, attempts, started),
            markers=ctx.pending_markers,
            writes=ctx.pending_writes,
            also_done=skipped,
        )
        # DEBUG: the worker's INFO line per task is Celery's, and the run's own lines are its start
        # and its end (one formatted line costs about as much CPU as a Redis round trip).
        log.debug("step_done", step=step.value, attempt=attempts, **result)
        if next_step is None:
            log.info("run_done", **_ids(run, provisioning, step, result))
        return StepDone(result, next_step)
    finally:
        # Still ours after a failure (end_step gives it back itself): let the next worker in at once.
        if lease.local.token is not None:
            with suppress(LockError, *LEDGER_UNREACHABLE):
                lease.release()


def _next_step(
    step: Step, ctx: StepContext, run: RunRecord
) -> tuple[Step | None, dict[Step, dict[str, Any]]]:
    """The step to run after ``step``, and the results of those between that have nothing to do."""
    skipped: dict[Step, dict[str, Any]] = {}
    following = step.next
    while following is not None and following in NOTHING_TO_DO:
        result = NOTHING_TO_DO[following](ctx.order())
        if result is None:
            break
        if not run.step(following, ctx.provisioning).done:
            skipped[following] = result.to_json()
        following = following.next
    return following, skipped


def _ids(run: RunRecord, provisioning: Provisioning, last: Step, result: dict[str, Any]) -> dict[str, Any]:
    """What the run's last line says it got: the ids of its effects, from the recorded results."""
    ids: dict[str, Any] = {}
    for s in STEPS:
        recorded = result if s is last else run.step(s, provisioning).result
        for key in ("iccid", "whmcs_order_id", "message_id", "delivery"):
            if recorded and key in recorded:
                ids[key] = recorded[key]
    return ids


@dataclass
class _Begun:
    """A run's beginning: the records to go on with, or (``run`` None) why it ends here."""

    result: dict[str, Any]
    run: RunRecord | None = None
    provisioning: Provisioning | None = None
    snapshot: dict[str, Any] | None = None
    attempts: int = 0  # of the step the run begins in


def _begin(services: Services, run_id: RunId, provisioning: Provisioning, step: Step) -> _Begun:
    """Under the Order's lease: join a run in flight, or read the Order (ONE query) and start.

    Starting counts the attempt of ``step``, the step it begins in, in the same round trip.

    Raises RetryLater (the Order could not be read, for now) or RunFailed (not at all).
    """
    ledger = services.ledger
    superseded: RunId | None = None
    if provisioning.active and provisioning.active != str(run_id):
        other_id = RunId.parse(provisioning.active)
        other = ledger.get(other_id)
        if other is not None and other.state.unfinished:
            ledger.join(run_id, other_id)
            log.info("run_joined", joined=str(other_id))
            return _Begun({"joined": str(other_id)})
        if other is not None and other.state is RunState.FAILED:
            superseded = other_id
    try:
        order = services.salesforce.fetch_order(run_id.order_id)
    except OrderNotFound as exc:
        ledger.skip(run_id, f"skipped: {exc}")
        log.warning("order_not_found_run_skipped", error=str(exc))
        return _Begun({"skipped": "order not found"})
    except TransientError as exc:
        # The beginning has a retry budget of its own, counted in the ledger like a step's.
        attempts = ledger.record_attempt(run_id, ENTRY_STEP)
        if attempts <= services.settings.task_max_retries:
            raise RetryLater(retry_backoff_s(services.settings, attempts), str(exc)) from exc
        fail_run(
            services,
            run_id,
            ENTRY_STEP,
            f"gave up reading the Order after {attempts} attempts: {exc}",
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
        return _Begun({"skipped": reason})
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
    snapshot = order.model_dump(mode="json")
    run, attempts = ledger.start(run_id, snapshot, note=note, attempt=step)
    provisioning.active = str(run_id)
    log.info("run_started")
    return _Begun(
        {"run_id": str(run_id)}, run=run, provisioning=provisioning, snapshot=snapshot, attempts=attempts
    )


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
        markers[ACTIVATED_AT_MARKER] = order.activated_at
    services.ledger.adopt(run_id, results, markers)
    log.warning("effects_adopted_from_order", whmcs_order_id=order.whmcs_order_id)


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
) -> StepDone:
    if step is Step.SEND_EMAIL and run.step(Step.UPDATE_SALESFORCE, provisioning).done:
        # The Order is Activated and live: a notification that cannot go out does not undo that.
        email_undelivered(services, run.run_id, reason)
        services.ledger.finish(run.run_id, note=f"done; the welcome e-mail was not delivered: {reason}")
        return StepDone(WelcomeEmail(delivery="refused").to_json(), None)
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
        for attempt in retrying_transient(
            attempts=WRITEBACK_ATTEMPTS, base_s=WRITEBACK_BACKOFF_S, cap_s=WRITEBACK_BACKOFF_MAX_S
        ):
            with attempt:
                services.salesforce.update_order(order_id, fields)
        return True
    except Exception as exc:
        log.error("order_writeback_failed", what=what, order_id=order_id, error=str(exc))
        return False
