"""A run's life, without Celery: one step at a time, the run's beginning in its first, its end.

Each step's task (``tasks/steps.py``) calls :func:`run_step` for its step and
turns the outcome into Celery's: :class:`StepDone` into a result (and the next
step's task, sent before the message is acknowledged), :class:`Wait` into a
retry of the same task with the countdown the retry policy chose, :class:`RunEnded`
into a result that ends the run, :class:`RunFailed` into a failed task (an
expected one).

Each step, in this order (what makes a step safe to run any number of times):

1. One round trip (``ledger.runs.claim``): the run ended (failed, joined,
   superseded, skipped): stop, later steps must not run; the step is done (by this
   run, or for the Order by an earlier one): return its result; another worker
   holds the Order's lease: wait; else take the lease, count the attempt, set the
   marker the step stamps at its Order's first try (its row's ``stamp``) unless the
   Order has it, and read the run, the Order's provisioning and its snapshot.
2. A run that has not begun begins, in its first step, under that lease: another
   run of the Order in flight means this one joins it (one provisioning per
   Order, whatever the events); a failed run of the Order is superseded by this
   one, which continues from its last finished step; the Order is read (ONE SOQL
   query) and, unless it says ``Activating``, the run is skipped.
3. Act. Each action is idempotent on its own (intent records, idempotency keys
   derived from the Order, lookups before acting): a worker can die at any instant.
4. One round trip (``ledger.runs.end_step``): record the result (ids only) and the
   results of the steps after it that have nothing to do for the Order (a physical
   SIM's eSIM step), end the run after its last step, give the lease back; name
   the next step to run.

Transient errors are retried with backoff, bounded by count (TASK_MAX_RETRIES) and
by the run's age (TASK_MAX_AGE_S); permanent errors and exhausted retries end the
run: failed in the ledger, Failed on the Order. A notification step (the welcome
e-mail) is the exception: it is sent after the Order says Activated, so its
refusal ends the run done, lists the Order as undelivered and tells the Order's
user why.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioning.core.backoff import retrying_transient
from provisioning.core.errors import PermanentError, PicklableError, TransientError
from provisioning.core.logs import get_logger
from provisioning.core.retry import Cause, Wait
from provisioning.core.run_id import RunId
from provisioning.email.steps import OUTBOX_MARKER
from provisioning.ledger import BEGIN, ClaimStatus, Provisioning, Recorded, RunRecord, RunState
from provisioning.ledger.metrics import FailureCause, StepObservation, observe_step
from provisioning.runs import writeback
from provisioning.runs.chain import Chain
from provisioning.runs.services import Services
from provisioning.salesforce.errors import OrderNotFound
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import WelcomeEmail
from provisioning.step.spec import StepSpec, System

log = get_logger(__name__)

ACTIVATING = "Activating"
# Writes of the Order where no task retry can take over (a failure, a requeue): a few quick tries.
WRITEBACK_ATTEMPTS = 3
WRITEBACK_BACKOFF_S = 1.0
WRITEBACK_BACKOFF_MAX_S = 4.0

# The ledger out of reach: a Sentinel failover (a few seconds), a network cut (longer), a demoted
# primary still answering. Nothing could be recorded, so the wait spends none of the step's budget;
# Celery's own bound on a message's retries still ends an outage that lasts, and the reconciler
# resumes the run.
LEDGER_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


class RunEnded(Exception):
    """The run ends here without failing here (joined, skipped, ended before): no later step runs.

    ``result`` is what the step reports instead of a result of its own.
    """

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


class RunFailed(PicklableError):
    """The run ended at this step; the reason is on the Order and in the ledger (an expected failure).

    ``writeback_in_s``: Salesforce refused to record the failure on the Order for now; the caller
    sends the write-back's next try (``provisioning.write_failure_on_order``) after that many seconds.
    """

    def __init__(self, reason: str, *, writeback_in_s: float | None = None) -> None:
        super().__init__(reason)
        self.writeback_in_s = writeback_in_s


@dataclass(frozen=True)
class StepDone:
    """A step done (now, or before): its result, and the step to run next (None: the run is over)."""

    result: dict[str, Any]
    next_step: StepSpec | None


@dataclass
class _Call:
    """Whether the step's action ran (it called its system), and what it raised."""

    ran: bool = False
    error: BaseException | None = None


def run_step(services: Services, run_id: RunId, spec: StepSpec) -> StepDone:
    """Run one step of one run; the first step of a run that has not begun begins it.

    Its system admits it first (its rate limit, its circuit breaker: ``Wait``, spending no
    budget, when it may not call now) and learns after how its call went.
    """
    try:
        admission = services.protection.admit(spec.system, spec.calls, f"{run_id}:{spec.name}")
        call = _Call()
        try:
            with services.protection.counting(spec.system, admission):
                return _run_step(services, run_id, spec, call)
        finally:
            with suppress(*LEDGER_UNREACHABLE):
                if call.ran:
                    services.protection.called(spec.system, admission, call.error)
                else:
                    services.protection.not_called(spec.system, admission)
                services.note_salesforce_api_usage()
    except LEDGER_UNREACHABLE as exc:
        countdown = services.retry.wait_s(Cause.LEDGER_DOWN)
        log.warning(
            "step_ledger_unreachable", step=spec.name, countdown_s=round(countdown, 2), error=str(exc)
        )
        raise Wait(Cause.LEDGER_DOWN, countdown, f"the ledger is unreachable: {exc}") from exc


def _run_step(services: Services, run_id: RunId, spec: StepSpec, call: _Call) -> StepDone:
    ledger = services.ledger
    chain = services.chain
    claimed_at = time.monotonic()
    stamp = (spec.stamp.marker, spec.stamp.make()) if spec.stamp else None
    claim = ledger.runs.claim(run_id, spec.name, owned_by_order=spec.owned_by_order, stamp=stamp)
    if claim.status is ClaimStatus.ENDED:
        assert claim.state is not None
        log.warning("step_stopped_run_ended", step=spec.name, state=claim.state.value)
        raise RunEnded({"ended": claim.state.value})
    if claim.status is ClaimStatus.DONE:
        log.debug("step_already_done", step=spec.name)
        following = chain.after(spec.name)
        if following is None and claim.state is RunState.RUNNING:
            # Its worker died between recording the last step and ending the run.
            ledger.runs.finish(run_id)
        return StepDone(claim.result or {}, following)
    if claim.status is ClaimStatus.BUSY:
        log.info("step_lease_busy", step=spec.name)
        raise services.retry.lease_busy()
    assert claim.lease is not None
    assert claim.provisioning is not None
    lease = claim.lease
    try:
        provisioning = claim.provisioning
        snapshot = claim.snapshot
        run = claim.run
        attempts = claim.attempts
        if claim.state in (None, RunState.QUEUED):
            begun = _begin(services, run_id, provisioning, spec)
            if begun.run is None or begun.provisioning is None:
                raise RunEnded(begun.result)
            run, provisioning, snapshot = begun.run, begun.provisioning, begun.snapshot
            attempts = begun.attempts
            recorded = chain.record(run, provisioning, spec)
            if recorded.done:  # a re-approval: the Order's effects exist, the chain moves on
                return StepDone(recorded.result or {}, chain.after(spec.name))
        assert run is not None
        ctx = StepContext(
            services, run_id, provisioning, lease, snapshot, lease_set_at=claimed_at, stamp=stamp
        )
        started = time.monotonic()
        call.ran = True
        try:
            result = spec.action(ctx).to_json()
        except TransientError as exc:
            call.error = exc
            ledger.runs.record_error(
                run_id, spec.name, str(exc), markers=ctx.pending_markers, writes=ctx.pending_writes
            )
            settings = services.settings
            age_s = time.time() - run.created_at
            # The budget is the step's attempts in the ledger: waits for the lease do not spend it.
            if attempts <= settings.task_max_retries and age_s < settings.task_max_age_s:
                countdown = services.retry.wait_s(Cause.TRANSIENT, attempts=attempts)
                log.warning(
                    "step_retry",
                    step=spec.name,
                    attempt=attempts,
                    countdown_s=round(countdown, 2),
                    error=str(exc),
                )
                raise Wait(Cause.TRANSIENT, countdown, str(exc)) from exc
            reason = f"gave up after {attempts} attempts: {exc}"
            observed = _observe(run, spec, attempts, started)
            return _terminal(
                services, run, provisioning, spec, reason, FailureCause.TRANSIENT_EXHAUSTED, observed
            )
        except PermanentError as exc:
            ledger.runs.record_error(
                run_id, spec.name, str(exc), markers=ctx.pending_markers, writes=ctx.pending_writes
            )
            observed = _observe(run, spec, attempts, started)
            return _terminal(services, run, provisioning, spec, str(exc), FailureCause.PERMANENT, observed)
        except BaseException as exc:
            call.error = exc
            # Anything else (the ledger out of reach, a bug): what the step did is still worth keeping.
            if ctx.pending_markers or ctx.pending_writes:
                with suppress(Exception):
                    ledger.orders.set_markers(run_id.order_id, ctx.pending_markers, ctx.pending_writes)
            raise
        following, skipped = _next_step(chain, spec, ctx, run)
        ledger.runs.end_step(
            run_id,
            Recorded(spec.name, spec.owned_by_order, result),
            lease,
            finish=following is None,
            observed=_observe(run, spec, attempts, started),
            markers=ctx.pending_markers,
            writes=ctx.pending_writes,
            also_done=skipped,
        )
        # DEBUG: the worker's INFO line per task is Celery's, and the run's own lines are its start
        # and its end (one formatted line costs about as much CPU as a Redis round trip).
        log.debug("step_done", step=spec.name, attempt=attempts, **result)
        if following is None:
            log.info("run_done", **_ids(chain, run, provisioning, spec, result))
        return StepDone(result, following)
    finally:
        # Still ours after a failure (end_step gives it back itself): let the next worker in at once.
        if lease.local.token is not None:
            with suppress(LockError, *LEDGER_UNREACHABLE):
                lease.release()


def _next_step(
    chain: Chain, spec: StepSpec, ctx: StepContext, run: RunRecord
) -> tuple[StepSpec | None, list[Recorded]]:
    """The step to run after ``spec``, and the results of those between that have nothing to do."""
    skipped: list[Recorded] = []
    following = chain.after(spec.name)
    while following is not None and following.nothing_to_do is not None:
        result = following.nothing_to_do(ctx.order())
        if result is None:
            break
        if not chain.record(run, ctx.provisioning, following).done:
            skipped.append(Recorded(following.name, following.owned_by_order, result.to_json()))
        following = chain.after(following.name)
    return following, skipped


def _ids(
    chain: Chain, run: RunRecord, provisioning: Provisioning, last: StepSpec, result: dict[str, Any]
) -> dict[str, Any]:
    """What the run's last line says it got: every id its steps recorded."""
    ids: dict[str, Any] = {}
    for spec in chain:
        recorded = result if spec.name == last.name else chain.record(run, provisioning, spec).result
        ids.update(recorded or {})
    return ids


@dataclass
class _Begun:
    """A run's beginning: the records to go on with, or (``run`` None) why it ends here."""

    result: dict[str, Any]
    run: RunRecord | None = None
    provisioning: Provisioning | None = None
    snapshot: dict[str, Any] | None = None
    attempts: int = 0  # of the step the run begins in


def _begin(services: Services, run_id: RunId, provisioning: Provisioning, spec: StepSpec) -> _Begun:
    """Under the Order's lease: join a run in flight, or read the Order (ONE query) and start.

    Starting counts the attempt of ``spec``, the step it begins in, in the same round trip.

    Raises Wait (the Order could not be read, for now) or RunFailed (not at all).
    """
    ledger = services.ledger
    chain = services.chain
    superseded: RunId | None = None
    if provisioning.active and provisioning.active != str(run_id):
        other_id = RunId.parse(provisioning.active)
        other = ledger.runs.get(other_id)
        if other is not None and other.state.unfinished:
            ledger.runs.join(run_id, other_id)
            log.info("run_joined", joined=str(other_id))
            return _Begun({"joined": str(other_id)})
        if other is not None and other.state is RunState.FAILED:
            superseded = other_id
    # The Order is read from Salesforce: its rate limit and its breaker have their say too.
    admission = services.protection.admit(System.SALESFORCE, 1, f"{run_id}:{BEGIN}")
    try:
        with services.protection.counting(System.SALESFORCE, admission):
            order = services.salesforce.fetch_order(run_id.order_id)
        services.protection.called(System.SALESFORCE, admission, None)
    except OrderNotFound as exc:
        services.protection.called(System.SALESFORCE, admission, exc)
        ledger.runs.skip(run_id, f"skipped: {exc}")
        log.warning("order_not_found_run_skipped", error=str(exc))
        return _Begun({"skipped": "order not found"})
    except TransientError as exc:
        services.protection.called(System.SALESFORCE, admission, exc)
        # The beginning has a retry budget of its own, counted in the ledger like a step's.
        attempts = ledger.runs.record_attempt(run_id, BEGIN)
        if attempts <= services.settings.task_max_retries:
            raise Wait(
                Cause.TRANSIENT, services.retry.wait_s(Cause.TRANSIENT, attempts=attempts), str(exc)
            ) from exc
        again = fail_run(
            services,
            run_id,
            BEGIN,
            f"gave up reading the Order after {attempts} attempts: {exc}",
            cause=FailureCause.TRANSIENT_EXHAUSTED,
        )
        raise RunFailed(f"{BEGIN}: {exc}", writeback_in_s=again) from None
    except PermanentError as exc:
        services.protection.called(System.SALESFORCE, admission, exc)
        again = fail_run(services, run_id, BEGIN, str(exc))
        raise RunFailed(f"{BEGIN}: {exc}", writeback_in_s=again) from None
    if order.activation_status != ACTIVATING:
        reason = f"skipped: the Order is {order.activation_status!r}, not {ACTIVATING!r}: nothing to do"
        ledger.runs.skip(run_id, reason)
        log.warning("order_not_activating", status=order.activation_status, reason=reason)
        return _Begun({"skipped": reason})
    if superseded is not None:
        ledger.runs.supersede(superseded, by=run_id)
        log.warning("failed_run_superseded", superseded=str(superseded))
    note = None
    if provisioning.gen == 1 and not chain.has_effects(provisioning) and order.whmcs_order_id:
        # The Order shows a WHMCS order the ledger does not know: provisioned before the ledger forgot.
        _adopt_from_order(services, run_id, order)
        provisioning = ledger.orders.provisioning(run_id.order_id)
        note = "the Order already had its effects (found on the Order): no new effect"
    elif chain.has_effects(provisioning) and provisioning.active and provisioning.active != str(run_id):
        note = f"continues the provisioning of run {provisioning.active}: no effect is made twice"
    snapshot = order.model_dump(mode="json")
    run, attempts = ledger.runs.begin(run_id, snapshot, note=note, attempt=spec.name)
    provisioning.active = str(run_id)
    log.info("run_started")
    return _Begun(
        {"run_id": str(run_id)}, run=run, provisioning=provisioning, snapshot=snapshot, attempts=attempts
    )


def _adopt_from_order(services: Services, run_id: RunId, order: Order) -> None:
    """The ledger forgot this Order (past its retention), but the Order says what it got: keep that."""
    results: dict[str, dict[str, Any]] = {}
    markers: dict[str, str] = {}
    for spec in services.chain:
        if spec.adopt is None:
            continue
        adopted = spec.adopt(order)
        if adopted.result is not None and spec.owned_by_order:
            results[spec.name] = adopted.result.to_json()
        markers.update(adopted.markers)
    services.ledger.orders.adopt(run_id, results, markers)
    log.warning("effects_adopted_from_order", whmcs_order_id=order.whmcs_order_id)


def _observe(run: RunRecord, spec: StepSpec, attempts: int, started: float) -> StepObservation:
    return observe_step(
        spec.name,
        attempts=attempts,
        started_monotonic=started,
        run_created_at=run.created_at,
        origin=run.origin.value,
        activates=spec.activates,
    )


def _terminal(
    services: Services,
    run: RunRecord,
    provisioning: Provisioning,
    spec: StepSpec,
    reason: str,
    cause: FailureCause = FailureCause.PERMANENT,
    observed: StepObservation | None = None,
) -> StepDone:
    chain = services.chain
    activated = any(chain.record(run, provisioning, s).done for s in chain if s.activates)
    if spec.notification and activated:
        # The Order is Activated and live: a notification that cannot go out does not undo that.
        email_undelivered(services, run.run_id, reason)
        services.ledger.runs.finish(run.run_id, note=f"done; the welcome e-mail was not delivered: {reason}")
        return StepDone(WelcomeEmail(delivery="refused").to_json(), None)
    again = fail_run(services, run.run_id, spec.name, reason, cause=cause, observed=observed)
    raise RunFailed(f"{spec.name}: {reason}", writeback_in_s=again)


# -- ending badly --------------------------------------------------------------------------------


def fail_run(
    services: Services,
    run_id: RunId,
    step: str,
    reason: str,
    *,
    cause: FailureCause = FailureCause.PERMANENT,
    observed: StepObservation | None = None,
) -> float | None:
    """Terminal failure: ledger first (the operators' record, and the write-back set), then the Order
    shows Failed: one PATCH now (:func:`provisioning.runs.writeback.first_try`).

    Returns None when that is done with, or the countdown to the write's next try when Salesforce
    refused it for now (the caller sends ``provisioning.write_failure_on_order``). Should the write
    never happen (the tries spent, or the worker dead first), the run stays in the ledger's
    write-backs and the reconciler writes it later.
    """
    services.ledger.runs.fail(run_id, step, reason, cause=cause, observed=observed)
    log.warning("run_failed", run_id=str(run_id), order_id=run_id.order_id, step=step, reason=reason)
    return writeback.first_try(services, run_id, step, reason)


def email_undelivered(services: Services, run_id: RunId, reason: str) -> None:
    """List the Order for operators and tell the Order's user, leaving it Activated."""
    services.ledger.orders.email_refused(run_id.order_id, reason, {OUTBOX_MARKER: "refused"})
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
