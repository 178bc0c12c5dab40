"""What every step task does around its action: skip when done, hold the lease, retry, fail.

The order matters and is what makes a step safe to run any number of times:

1. The ledger says the run failed: stop (later steps must not run).
2. The ledger says this step is done: return its recorded result (a redelivery, a
   duplicate chain, a requeue that resumes later).
3. Take the run's lease; if another worker holds it, retry shortly (two workers
   never act on one run at once).
4. Act. Each action is idempotent on its own (intent records, idempotency keys,
   lookups before acting), because a worker can die at any instant inside it.
5. Record the result, then return it (ids only) to the next step.

Transient errors are retried with exponential backoff and full jitter, bounded
by count (TASK_MAX_RETRIES) and by the run's age (TASK_MAX_AGE_S); permanent
errors and exhausted retries end the run: failed in the ledger, Failed on the Order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from provisioning.errors import PermanentError, TransientError
from provisioning.ledger import STEPS, RunState
from provisioning.logs import get_logger
from provisioning.runs import StepContext, backoff_s, fail_run
from provisioning.services import Services

log = get_logger(__name__)

# Another worker holds the run's lease: look again after about this long.
LEASE_BUSY_RETRY_S = 2.0


class RunFailed(Exception):
    """The run ended at this step; the reason is on the Order and in the ledger."""


Action = Callable[[StepContext], dict[str, Any]]


def run_step(task: Task, run_id: str, step: str, action: Action) -> dict[str, Any]:
    services: Services = task.app.services
    ledger = services.ledger
    run = ledger.get(run_id)
    if run is None:
        log.error("step_for_unknown_run", step=step)
        raise Ignore()
    if run.state is RunState.FAILED:
        log.warning("step_stopped_run_failed", step=step, failed_step=run.failed_step)
        raise Ignore()
    recorded = run.step(step)
    if recorded.done:
        log.info("step_already_done", step=step)
        return recorded.result or {}

    with ledger.holding(run_id) as lease:
        if lease is None:
            log.info("step_lease_busy", step=step)
            raise task.retry(countdown=LEASE_BUSY_RETRY_S, max_retries=max_retries(task))
        # Re-read under the lease: the holder we waited for may have finished this step.
        recorded = ledger.get(run_id).step(step)  # type: ignore[union-attr]
        if recorded.done:
            return recorded.result or {}
        attempt = ledger.record_attempt(run_id, step)
        try:
            result = action(StepContext(services, run_id, lease))
        except TransientError as exc:
            ledger.record_error(run_id, step, str(exc))
            retries = task.request.retries
            age_s = time.time() - run.created_at
            settings = services.settings
            if retries < settings.task_max_retries and age_s < settings.task_max_age_s:
                countdown = backoff_s(settings, retries)
                log.warning(
                    "step_retry", step=step, attempt=attempt, countdown_s=round(countdown, 2), error=str(exc)
                )
                raise task.retry(exc=exc, countdown=countdown, max_retries=max_retries(task)) from None
            reason = f"gave up after {attempt} attempts: {exc}"
            fail_run(services, run_id, step, reason)
            raise RunFailed(f"{step}: {reason}") from None
        except PermanentError as exc:
            fail_run(services, run_id, step, str(exc))
            raise RunFailed(f"{step}: {exc}") from None
        ledger.record_step(run_id, step, result)
        if step == STEPS[-1]:
            ledger.finish(run_id)
            log.info("run_done")
        log.info("step_done", step=step, attempt=attempt, **result)
        return result


def max_retries(task: Task) -> int:
    # Lease waits and transient retries share Celery's counter; the step itself enforces
    # TASK_MAX_RETRIES for errors, this only keeps Celery from raising MaxRetriesExceeded first.
    return int(task.app.services.settings.task_max_retries) + 20
