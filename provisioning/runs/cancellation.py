"""The Order's cancellation: recorded once, it stops the Order's runs and undoes what the Order got.

A cancellation (``provisioning cancel``, the console's button, or Salesforce's
event with ``Action__c = cancel``) is recorded on the Order's provisioning in
the ledger, atomically and once (``Orders.request_cancel``). From then on every
forward step's claim (``claim_step.lua``) ends its run as ``cancelled`` before
anything else, in the same script that would take the Order's lease: a run in
flight stops before its next external effect, and a step in the middle of its
effect holds the lease the cancellation's own steps wait for.

The cancellation's own steps are declared here, once, as the step table
declares the forward ones (one :class:`StepSpec` row each, the same
:class:`Chain`). Each runs as its own Celery task named after it
(``tasks/steps.py``), claimed and ended in the ledger under the Order's lease
like a step, recorded on the Order's provisioning (so each happens once per
Order, whatever the number of requests or runs), and resumed after a crash by
redelivery or by the reconciler. They run in a run of their own,
``{OrderId}:cancel:g{generation}``:

1. ``cancel_esim``: cancelOrder (``Available``) while the profile is not downloaded,
   then the ICCID back to our free stock; downloaded or installed: reported for a
   person (``manual``).
2. ``cancel_whmcs_order``: CancelOrder while Pending; accepted: ModuleTerminate of its
   services (``WHMCS_CANCEL_ACCEPTED=terminate``) or reported (``manual``).
3. ``write_cancelled``: the Order written ``Cancelled``, with what was undone.

A compensation refused for good (a permanent error) is recorded as ``manual``
with the reason, and the cancellation goes on: the Order says what is left to a
person, the metrics count it, an alert fires. Transient errors are retried like a
step's (the reconciler resumes a run whose retries ran out). The welcome e-mail is
a forward step: a cancelled Order's is never sent, and a cancellation after it
was sent sends nothing.

A new provisioning of a cancelled Order is an operator's ``provisioning reprovision``
(a new generation, whose provisioning has no cancellation).
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from redis.exceptions import LockError

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.logs import get_logger
from provisioning.core.retry import Cause, Wait
from provisioning.core.run_id import RunId
from provisioning.esim import steps as esim
from provisioning.ledger import Cancel, ClaimStatus, Origin, Provisioning, Recorded, RunRecord, RunState
from provisioning.ledger.metrics import COMPENSATIONS
from provisioning.runs.chain import Chain
from provisioning.runs.lifecycle import LEDGER_UNREACHABLE, RunEnded, StepDone
from provisioning.runs.publishing import publish_step
from provisioning.runs.services import Services
from provisioning.salesforce import steps as salesforce
from provisioning.step.context import StepContext
from provisioning.step.results import (
    EsimActivated,
    EsimCancelled,
    OrderCancelled,
    WhmcsCancelled,
    WhmcsOrderCreated,
)
from provisioning.step.spec import StepSpec, System
from provisioning.whmcs import steps as whmcs

log = get_logger(__name__)

# The cancellation's run: one per generation of the Order's provisioning (a repeat is the same run).
CANCEL_KEY_PREFIX = "cancel:"

# The table: the compensations in their order (the effects in the reverse order of the forward chain's,
# the Order's write last).
CANCELLATION = Chain(
    [
        StepSpec(
            "cancel_esim",
            esim.cancel_esim,
            EsimCancelled,
            System.SMDP,
            effect=True,
            effect_markers=(esim.CANCELLED_MARKER,),
        ),
        StepSpec("cancel_whmcs_order", whmcs.cancel_whmcs_order, WhmcsCancelled, System.WHMCS, effect=True),
        StepSpec("write_cancelled", salesforce.write_cancelled, OrderCancelled, System.SALESFORCE),
    ]
)


def cancellation_run(order_id: str, gen: int) -> RunId:
    return RunId(order_id, f"{CANCEL_KEY_PREFIX}g{gen}")


def is_cancellation(run_id: RunId) -> bool:
    return run_id.idem_key.startswith(CANCEL_KEY_PREFIX)


# -- asking for it ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a cancellation of the Order would undo (read-only: the dry run, the console's preview)."""

    order_id: str
    cancel: Cancel | None  # the Order was cancelled already (then nothing new happens)
    in_flight: list[str]
    iccid: str | None
    esim_state: str | None
    whmcs_order_id: int | None
    email_sent: bool
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # compensations already recorded

    def lines(self) -> list[str]:
        """The plan in words, one line each."""
        if self.cancel is not None:
            head = (
                f"already cancelled at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.cancel.at))} UTC"
            )
            return [f"{head} by {self.cancel.by}: {self.cancel.reason}"] + [
                f"{name}: {result.get('outcome')}"
                + (f" ({result['reason']})" if result.get("reason") else "")
                for name, result in self.done.items()
            ]
        lines = []
        if self.in_flight:
            lines.append(
                f"stop {len(self.in_flight)} run(s) in flight before their next effect: {', '.join(self.in_flight)}"
            )
        if self.iccid:
            state = self.esim_state or "claimed"
            if self.esim_state in ("downloaded", "installed"):
                lines.append(f"eSIM {self.iccid} is {state}: cannot be cancelled, reported for a person")
            else:
                lines.append(f"cancel eSIM {self.iccid} ({state}) on the SM-DP+ and return it to stock")
        if self.whmcs_order_id is not None:
            lines.append(f"cancel WHMCS order {self.whmcs_order_id} (or terminate its services if accepted)")
        lines.append("write the Order Cancelled with what was undone")
        lines.append(
            "the welcome e-mail was sent already: no further e-mail is sent"
            if self.email_sent
            else "the welcome e-mail will not be sent"
        )
        return lines


def plan(services: Services, order_id: str) -> Plan:
    ledger = services.ledger
    provisioning = ledger.orders.provisioning(order_id)
    chain = services.chain
    esim_result = provisioning.step(chain.recording(EsimActivated).name).result or {}
    iccid = esim_result.get("iccid") or ledger.inventory.claimed_by(provisioning.effect_key)
    status = ledger.esim_status.get(iccid) if iccid else None
    created = provisioning.step(chain.recording(WhmcsOrderCreated).name).result or {}
    recorded = provisioning.markers.get(whmcs.WHMCS_ORDER_MARKER)
    whmcs_order_id = created.get("whmcs_order_id") or (int(recorded) if recorded else None)
    email_sent = any(provisioning.step(spec.name).done for spec in chain if spec.notification)
    return Plan(
        order_id=order_id,
        cancel=provisioning.cancel,
        in_flight=[str(r) for r in ledger.orders.in_flight(order_id) if not is_cancellation(r)],
        iccid=iccid,
        esim_state=status.state.value if status else None,
        whmcs_order_id=whmcs_order_id,
        email_sent=email_sent,
        done={
            spec.name: provisioning.step(spec.name).result or {}
            for spec in CANCELLATION
            if provisioning.step(spec.name).done
        },
    )


@dataclass(frozen=True)
class Requested:
    run_id: RunId
    new: bool  # recorded now (False: the Order was cancelled before; nothing changes)
    cancel: Cancel
    published: bool  # the cancellation's first task was sent (False: its run is under way or done)
    cancelled_failed: list[str]


def request_cancel(
    services: Services, app: Celery, order_id: str, reason: str, *, by: str, origin: Origin = Origin.OPERATOR
) -> Requested:
    """Record the Order's cancellation (once) and start its run (once). Safe to repeat at any time."""
    ledger = services.ledger
    new, cancel, gen = ledger.orders.request_cancel(order_id, reason, by)
    # A failed run would be requeued, and its failure written on the Order: it ends as cancelled instead.
    cancelled_failed = []
    for run in ledger.runs.get_many(ledger.orders.runs(order_id)):
        if run.state is RunState.FAILED and not is_cancellation(run.run_id):
            ledger.runs.cancel(run.run_id)
            cancelled_failed.append(str(run.run_id))
    run_id = cancellation_run(order_id, gen)
    published = False
    if ledger.runs.enqueue(run_id, origin, reason=f"cancel: {cancel.reason}"):
        publish_step(app, run_id, CANCELLATION.first)
        published = True
    log.warning(
        "order_cancel_requested",
        order_id=order_id,
        new=new,
        by=by,
        reason=cancel.reason,
        run_id=str(run_id),
        published=published,
    )
    return Requested(run_id, new, cancel, published, cancelled_failed)


def resume(services: Services, app: Celery, run: RunRecord) -> str | None:
    """The reconciler's resume of a cancellation's run nobody works on: the step it goes on from
    (None: every step is done, and the run is finished now)."""
    provisioning = services.ledger.orders.provisioning(run.order_id)
    if run.state is RunState.RUNNING and CANCELLATION.first_unfinished(run, provisioning) is None:
        services.ledger.runs.finish(run.run_id)
        return None
    step = CANCELLATION.first_unfinished(run, provisioning) or CANCELLATION.specs[-1]
    services.ledger.runs.touch(run.run_id)
    publish_step(app, run.run_id, step)
    return step.name


# -- one compensation: a step's life, for the cancellation's table -----------------------------------


def run_compensation(services: Services, run_id: RunId, spec: StepSpec) -> StepDone:
    """Claim, act and end one compensation under the Order's lease (Celery-free, like ``run_step``);
    its system's rate limit and circuit breaker have their say as for any step."""
    try:
        admission = services.protection.admit(spec.system, spec.calls, f"{run_id}:{spec.name}")
        called: list[BaseException | None] = []
        try:
            with services.protection.counting(spec.system, admission):
                return _run_compensation(services, run_id, spec, called)
        finally:
            with suppress(*LEDGER_UNREACHABLE):
                if called:
                    services.protection.called(spec.system, admission, called[0])
                else:
                    services.protection.not_called(spec.system, admission)
    except LEDGER_UNREACHABLE as exc:
        countdown = services.retry.wait_s(Cause.LEDGER_DOWN)
        raise Wait(Cause.LEDGER_DOWN, countdown, f"the ledger is unreachable: {exc}") from exc


def _run_compensation(
    services: Services, run_id: RunId, spec: StepSpec, called: list[BaseException | None]
) -> StepDone:
    """``called`` gets what the action raised (None: nothing) once it has called its system."""
    ledger = services.ledger
    claimed_at = time.monotonic()
    claim = ledger.runs.claim(run_id, spec.name, owned_by_order=True, cancellable=False)
    following = CANCELLATION.after(spec.name)
    if claim.status is ClaimStatus.ENDED:
        assert claim.state is not None
        raise RunEnded({"ended": claim.state.value})
    if claim.status is ClaimStatus.DONE:
        if following is None and claim.state is RunState.RUNNING:
            ledger.runs.finish(run_id)
        return StepDone(claim.result or {}, following)
    if claim.status is ClaimStatus.BUSY:
        # A forward step in the middle of its effect (it ends, then its run's next claim stops it).
        raise services.retry.lease_busy()
    assert claim.lease is not None
    assert claim.provisioning is not None
    lease = claim.lease
    try:
        provisioning: Provisioning = claim.provisioning
        attempts = claim.attempts
        if claim.state in (None, RunState.QUEUED):
            _, attempts = ledger.runs.start(run_id, attempt=spec.name)
            if provisioning.step(spec.name).done:  # an earlier cancellation run of the Order did it
                result = provisioning.step(spec.name).result or {}
                ledger.runs.end_step(
                    run_id, Recorded(spec.name, True, result), lease, finish=following is None
                )
                return StepDone(result, following)
        ctx = StepContext(
            services,
            run_id,
            provisioning,
            lease,
            claim.snapshot,
            lease_set_at=claimed_at,
            tables=(CANCELLATION,),
        )
        try:
            done = spec.action(ctx).to_json()
            called.append(None)
        except TransientError as exc:
            called.append(exc)
            ledger.runs.record_error(
                run_id, spec.name, str(exc), markers=ctx.pending_markers, writes=ctx.pending_writes
            )
            countdown = services.retry.wait_s(Cause.TRANSIENT, attempts=attempts)
            log.warning("compensation_retry", step=spec.name, attempt=attempts, error=str(exc))
            raise Wait(Cause.TRANSIENT, countdown, str(exc)) from exc
        except PermanentError as exc:
            called.append(exc)
            # Refused for good: left to a person, said on the Order; the cancellation goes on.
            done = spec.result.model_validate({"outcome": "manual", "reason": str(exc)[:500]}).to_json()
            log.error("compensation_refused", step=spec.name, error=str(exc))
        outcome = str(done.get("outcome", ""))
        ctx.write_with_end(
            lambda pipe: ledger.metrics.count(pipe, COMPENSATIONS, step=spec.name, outcome=outcome)
        )
        ledger.runs.end_step(
            run_id,
            Recorded(spec.name, True, done),
            lease,
            finish=following is None,
            markers=ctx.pending_markers,
            writes=ctx.pending_writes,
        )
        (log.warning if outcome == "manual" else log.info)("compensation_done", step=spec.name, **done)
        return StepDone(done, following)
    finally:
        if lease.local.token is not None:
            # Expired meanwhile, or the ledger out of reach: it lapses by itself.
            with suppress(LockError, *LEDGER_UNREACHABLE):
                lease.release()
