"""The cancellation's tasks: one Celery task per row of the cancellation's table, named after its step.

The same shape as the step tasks (``tasks/steps.py``, where their task lines are): each runs its
compensation (:func:`provisioning.runs.cancellation.run_compensation`) under the Order's lease and,
once it is done, sends the task of the next one before its own message is acknowledged. A wait is a
retry of the same task with the retry policy's countdown; a run that ended says so and sends nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from provisioning.core.logs import get_logger
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.runs import cancellation
from provisioning.runs.lifecycle import RunEnded
from provisioning.runs.publishing import publish_step
from provisioning.step.spec import StepSpec
from tasks.app import ProvisioningTask

log = get_logger(__name__)

# As the step tasks': a transient error's retries are bounded here; a wait for the lease or the ledger is not.
TRANSIENT_RETRIES_HEADROOM = 20


def compensate(task: ProvisioningTask, run_id: str, spec: StepSpec) -> dict[str, Any]:
    """The body of every compensation task."""
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("compensation_with_bad_run_id", step=spec.name, error=str(exc))
        return {"ignored": "not a run id"}
    app = task.app
    try:
        done = cancellation.run_compensation(app.services, rid, spec)
    except Wait as wait:
        cause = wait.__cause__ if isinstance(wait.__cause__, Exception) else wait
        budget = 2 * int(app.services.settings.task_max_retries) + TRANSIENT_RETRIES_HEADROOM
        raise task.retry(
            exc=cause, countdown=wait.countdown_s, max_retries=budget if wait.cause.spends_budget else None
        ) from None
    except RunEnded as exc:
        return exc.result
    if done.next_step is None:
        return done.result
    publish_step(app, rid, done.next_step)
    return {**done.result, "next": done.next_step.name}


def compensation_task(spec: StepSpec) -> Task:
    """The task of ``spec``'s compensation, registered on every app (``celery -A tasks``)."""

    def body(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
        return compensate(self, run_id, spec)

    body.__name__ = spec.name
    body.__qualname__ = spec.name
    body.__doc__ = f"The {spec.name} compensation of an Order's cancellation (the cancellation table's row)."
    task: Task = shared_task(
        name=spec.task_name, bind=True, base=ProvisioningTask, time_limit=spec.time_limit_s, max_retries=None
    )(body)
    return task
