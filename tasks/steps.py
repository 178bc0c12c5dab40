"""The step tasks' shared body: the run lifecycle, with its outcomes turned into Celery's.

What a step does and in which order lives in :mod:`provisioning.lifecycle`;
here a :class:`RetryLater` becomes ``task.retry`` (the rest of the chain travels
with it), a :class:`RunEnded` becomes a result that stops the chain (later steps
are never sent), and a :class:`RunFailed` fails the task (an expected failure:
one line in the worker's log, the task shown failed in Flower).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from provisioning import lifecycle
from provisioning.chain import Step
from provisioning.lifecycle import Action, RetryLater, RunEnded
from provisioning.logs import get_logger
from provisioning.run_id import RunId

log = get_logger(__name__)

# Lease waits and transient retries share Celery's counter; the lifecycle enforces
# TASK_MAX_RETRIES for errors, this headroom only keeps Celery from giving up first.
LEASE_WAIT_HEADROOM = 20
# The shortest countdown of a retry. On RabbitMQ quorum queues Celery 5.7 routes a countdown through
# native delayed delivery with int(countdown) seconds, and rejects (drops) a task whose countdown
# is between 0 and 1 s ("countdown must be a positive number"); a whole second is always safe.
MIN_COUNTDOWN_S = 1.0


def run_step(task: Task, run_id: str, step: Step, action: Action) -> dict[str, Any]:
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("step_with_bad_run_id", step=step.value, error=str(exc))
        task.request.chain = None
        return {"ignored": "not a run id"}
    services = task.app.services
    try:
        return lifecycle.run_step(services, rid, step, action, retries=task.request.retries)
    except RetryLater as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else None
        countdown = max(exc.countdown_s, MIN_COUNTDOWN_S)
        raise task.retry(exc=cause, countdown=countdown, max_retries=max_retries(task)) from None
    except RunEnded as exc:
        # Success for this task, and the end of the chain: Celery sends no further step.
        task.request.chain = None
        return exc.result


def max_retries(task: Task) -> int:
    return int(task.app.services.settings.task_max_retries) + LEASE_WAIT_HEADROOM
