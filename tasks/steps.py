"""The step tasks: one Celery task per row of the step table, named after its step.

A run is a chain of these tasks: each runs its step (:func:`provisioning.runs.lifecycle.run_step`)
and, once the step is done, sends the task of the next one itself, before its own
message is acknowledged (a worker dying in between means a redelivery, which finds
the step done and sends the next again: never a lost step). The ledger, not a
canvas, decides what comes next: a run's steps stop where the run ends (joined,
skipped, failed), a physical SIM's run sends no eSIM task, and a requeue resumes
at the step that failed. Flower shows each step under its own name: its runtime,
its retries (``task-retried``), its failure.

How each outcome of a step becomes Celery's:

- done: the task's result is the step's (ids only), with ``next``, the step it sent;
- must wait (:class:`Wait`: a transient error, the Order's lease, the ledger out of
  reach, the system's rate limit or circuit breaker): a retry of this task, with the
  countdown the retry policy chose;
- the run ended before (:class:`RunEnded`): a result that says so, and no next step;
- failed (:class:`RunFailed`): a failed task, the step and the reason in its error; if Salesforce
  refused to record the failure on the Order for now, the write-back's task
  (``provisioning.write_failure_on_order``, ``tasks/writeback.py``) is sent first, with its countdown.

Every step task is idempotent: a step is claimed and ended in the ledger, so a
redelivered message, a retry or a requeue finds it done and only sends the next.
What makes each step's action safe to repeat is said beside its task below.

The cancellation's compensations are tasks of the same shape (:func:`compensation_task`): the
same body runs :func:`provisioning.runs.cancellation.run_compensation` instead of the step's life.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task, shared_task

from provisioning.core.logs import get_logger
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.runs import cancellation, lifecycle
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import RunEnded, RunFailed, StepDone
from provisioning.runs.publishing import publish_failure_writeback, publish_step
from provisioning.runs.services import Services
from provisioning.step.spec import StepSpec
from tasks.app import ProvisioningTask

log = get_logger(__name__)

# Celery counts every retry of a message. Transient errors are bounded by the lifecycle itself
# (TASK_MAX_RETRIES each, counted in the ledger); this bound only keeps Celery from giving up first.
# Waits that spend no budget (the lease, the ledger, a rate limit, a breaker) are not bounded here.
TRANSIENT_RETRIES_HEADROOM = 20

# What a task runs under its step's name: a step's life (claim, act, end) without Celery.
Perform = Callable[[Services, RunId, StepSpec], StepDone]


def run(
    task: ProvisioningTask, run_id: str, spec: StepSpec, perform: Perform = lifecycle.run_step
) -> dict[str, Any]:
    """The body of every step task (and, with ``perform`` the cancellation's, of every compensation's)."""
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("step_with_bad_run_id", step=spec.name, error=str(exc))
        return {"ignored": "not a run id"}
    app = task.app
    try:
        done = perform(app.services, rid, spec)
    except Wait as wait:
        cause = wait.__cause__ if isinstance(wait.__cause__, Exception) else wait
        budget = 2 * int(app.services.settings.task_max_retries) + TRANSIENT_RETRIES_HEADROOM
        # A wait that spends no budget retries without a bound (None: the task's own, which is none).
        raise task.retry(
            exc=cause, countdown=wait.countdown_s, max_retries=budget if wait.cause.spends_budget else None
        ) from None
    except RunEnded as exc:
        return exc.result
    except RunFailed as exc:
        if exc.writeback_in_s is not None:
            # Should this send fail, the run is still in the ledger's write-backs: the reconciler has it.
            publish_failure_writeback(app, rid, exc.writeback_in_s)
        raise
    if done.next_step is None:
        return done.result
    publish_step(app, rid, done.next_step)
    return {**done.result, "next": done.next_step.name}


def step_task(spec: StepSpec) -> Task:
    """The task of ``spec``'s step, registered on every app (``celery -A tasks``, and a test's own).

    It runs the step as its app's chain declares it (``ProvisioningCelery.chain``: the step table,
    or a test's own table with the same names).
    """
    name = spec.name

    def body(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
        return run(self, run_id, self.app.chain[name])

    return _register(spec, body, f"The {spec.name} step of a run (the step table's row).")


def compensation_task(spec: StepSpec) -> Task:
    """The task of ``spec``'s compensation (a row of the cancellation's table), registered likewise."""

    def body(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
        return run(self, run_id, spec, cancellation.run_compensation)

    return _register(
        spec, body, f"The {spec.name} compensation of an Order's cancellation (the cancellation table's row)."
    )


def _register(spec: StepSpec, body: Callable[..., dict[str, Any]], doc: str) -> Task:
    body.__name__ = spec.name
    body.__qualname__ = spec.name
    body.__doc__ = doc
    # max_retries=None: a wait that spends no budget is not bounded by Celery (a transient error's
    # retry passes its own bound, see run()).
    task: Task = shared_task(
        name=spec.task_name, bind=True, base=ProvisioningTask, time_limit=spec.time_limit_s, max_retries=None
    )(body)
    return task


# One line per step: what makes the step's action safe to run again.

# Read-only calls; the ledger records the outcome once per Order.
validate_payment = step_task(CHAIN["validate_payment"])
# The Order's ICCID is claimed from our inventory before downloadOrder (a repeat answers "in use" for
# our own ICCID); the matchingId derives from the Order.
activate_esim = step_task(CHAIN["activate_esim"])
# An intent record before AddOrder, the Order's effect key in the order's notes and a GetOrders lookup
# before any second AddOrder; AcceptOrder's "not Pending" is checked with GetOrders.
create_whmcs_order = step_task(CHAIN["create_whmcs_order"])
# One PATCH of absolute values (the activation time is fixed on the Order's first activation).
update_salesforce = step_task(CHAIN["update_salesforce"])
# The ledger's outbox (sending -> sent) and a Message-ID derived from the Order; an unknown outcome
# follows EMAIL_RESEND_POLICY (default: resend with the same Message-ID).
send_email = step_task(CHAIN["send_email"])

# The cancellation's compensations (provisioning/runs/cancellation.py's table): one task each, like the
# steps; each claimed and ended under the Order's lease and recorded once for the Order.

# cancelOrder only while the profile is not downloaded (8.2.1/3.5 on a repeat means done); a marker is
# confirmed before the ICCID goes back to stock, so a retry never cancels an ICCID another Order holds.
cancel_esim = compensation_task(cancellation.CANCELLATION["cancel_esim"])
# GetOrders before every call: a Cancelled order or a Terminated service is not called again.
cancel_whmcs_order = compensation_task(cancellation.CANCELLATION["cancel_whmcs_order"])
# One PATCH of absolute values (Cancelled, what was undone).
write_cancelled = compensation_task(cancellation.CANCELLATION["write_cancelled"])
