"""The step tasks' shared body: a run goes through its steps in one task while each succeeds at once.

What a step does and in which order lives in :mod:`provisioning.runs.lifecycle`; here
its outcomes become Celery's. The task of a step runs that step, then the steps
after it, in the same task, for as long as each is done at its first try: a run
that meets no trouble is one task message, not five (each message costs the broker
and the worker more than most steps cost themselves; see ``docs/benchmarks.md``).
A step that must wait (a transient error, another worker's lease) goes on as a
task of its own, sent with its countdown, so Flower shows a retry under the name
of the step that retries. A :class:`RunEnded` becomes a result that ends the run;
a :class:`RunFailed` fails the task (an expected failure: one line in the
worker's log, the task shown failed in Flower, the failing step in its reason).

Exactly-once does not depend on the task boundaries: each step is claimed and
ended in the ledger, so a redelivered message, a retry or an operator's resume
finds the steps done and goes on from the first that is not.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from provisioning.runs import lifecycle
from provisioning.core.logs import get_logger
from provisioning.core.run_id import RunId
from provisioning.runs.lifecycle import Action, RetryLater, RunEnded
from provisioning.runs.publishing import publish_step
from provisioning.step.chain import Step

log = get_logger(__name__)

# Celery counts every retry of a message: lease waits, the run's beginning and the step's errors.
# The lifecycle bounds the errors itself (TASK_MAX_RETRIES each, counted in the ledger); this
# bound only keeps Celery from giving up first.
LEASE_WAIT_HEADROOM = 20
# The shortest countdown of a retry. On RabbitMQ quorum queues Celery 5.7 routes a countdown through
# native delayed delivery with int(countdown) seconds, and rejects (drops) a task whose countdown
# is between 0 and 1 s ("countdown must be a positive number"); a whole second is always safe.
MIN_COUNTDOWN_S = 1.0

# What each step does, registered by its domain's task module: a worker imports every one of them
# (``tasks.app.TASK_MODULES``) before it takes a task, so a run finds each step it goes on to.
_ACTIONS: dict[Step, Action] = {}


def register(step: Step, action: Action) -> None:
    """Make ``action`` the body of ``step``, for its own task and for the tasks that run it inline."""
    _ACTIONS[step] = action


def run_step(task: Task, run_id: str, step: Step) -> dict[str, Any]:
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("step_with_bad_run_id", step=step.value, error=str(exc))
        return {"ignored": "not a run id"}
    services = task.app.services
    ran: list[str] = []
    current = step
    while True:
        try:
            done = lifecycle.run_step(services, rid, current, _ACTIONS[current])
        except RetryLater as exc:
            countdown = max(exc.countdown_s, MIN_COUNTDOWN_S)
            if current is step:
                cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else None
                raise task.retry(exc=cause, countdown=countdown, max_retries=max_retries(task)) from None
            # A later step must wait: it goes on as its own task; what this task did is done. Sent
            # before this message is acknowledged: a worker dying here means a redelivery (the
            # steps done are found done), not a lost step.
            publish_step(task.app, rid, current, countdown=countdown)
            return {"steps": ran, "retrying": current.value}
        except RunEnded as exc:
            # Success for this task, and the end of the run: no further step runs.
            return {"steps": ran, **exc.result} if ran else exc.result
        ran.append(current.value)
        if done.next_step is None:
            return {"steps": ran, **done.result}
        current = done.next_step


def max_retries(task: Task) -> int:
    return 2 * int(task.app.services.settings.task_max_retries) + LEASE_WAIT_HEADROOM
