"""The step tasks' shared body: the run lifecycle, with its outcomes turned into Celery's.

What a step does and in which order lives in :mod:`provisioning.lifecycle`;
here a :class:`RetryLater` becomes ``task.retry``, a :class:`RunEnded` becomes a
result that ends the run (the next step is not sent), a :class:`RunFailed` fails
the task (an expected failure: one line in the worker's log, the task shown failed
in Flower), and a step done sends the run's next step (skipping
those that have nothing to do for the Order: the lifecycle recorded their results).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from provisioning import lifecycle
from provisioning.chain import Step
from provisioning.lifecycle import Action, RetryLater, RunEnded
from provisioning.logs import get_logger
from provisioning.publishing import publish_step
from provisioning.run_id import RunId

log = get_logger(__name__)

# Celery counts every retry of a message: lease waits, the run's beginning and the step's errors.
# The lifecycle bounds the errors itself (TASK_MAX_RETRIES each, counted in the ledger); this
# bound only keeps Celery from giving up first.
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
        return {"ignored": "not a run id"}
    services = task.app.services
    try:
        done = lifecycle.run_step(services, rid, step, action)
    except RetryLater as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else None
        countdown = max(exc.countdown_s, MIN_COUNTDOWN_S)
        raise task.retry(exc=cause, countdown=countdown, max_retries=max_retries(task)) from None
    except RunEnded as exc:
        # Success for this task, and the end of the run: no further step is sent.
        return exc.result
    # The step is done (now, or before: a redelivery must not leave the run stranded): send the next.
    # Before the message is acknowledged, so a worker dying here means a redelivery, not a lost step.
    # The next step that has something to do for this Order (the lifecycle recorded those between).
    if done.next_step is not None:
        publish_step(task.app, rid, done.next_step)
    return done.result


def max_retries(task: Task) -> int:
    return 2 * int(task.app.services.settings.task_max_retries) + LEASE_WAIT_HEADROOM
