"""Runs as a whole: publishing them, resuming them, and ending them in failure.

Used by the tasks, the listener (publish, reconciler) and the operators' CLI
(requeue). Tasks are addressed by name, so nothing here imports ``tasks/``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.canvas import Signature, chain
from redis.lock import Lock

import celeryconfig
from provisioning.errors import TransientError
from provisioning.ledger import STEPS, NotRequeueable, RunState
from provisioning.logs import get_logger
from provisioning.salesforce.client import Order
from provisioning.services import Services
from provisioning.settings import Settings

log = get_logger(__name__)

ENTRY_TASK = "provisioning.provision_order"
# The failed_step of a run that failed before its chain started.
ENTRY_STEP = "provision_order"
# Attempts to write "Failed" back on the Order before leaving it to the operators.
FAILURE_WRITEBACK_ATTEMPTS = 3
FAILURE_WRITEBACK_BACKOFF_S = 1.0
# Activation_Error__c is short on the Order; the ledger keeps the longer text.
ORDER_ERROR_MAX_CHARS = 255


@dataclass
class StepContext:
    """What a step's action gets: the services, its run and the run's lease."""

    services: Services
    run_id: str
    lease: Lock

    @property
    def order_id(self) -> str:
        return self.run_id.split(":", 1)[0]

    @property
    def settings(self) -> Settings:
        return self.services.settings

    def order(self) -> Order:
        return Order.model_validate(self.services.ledger.load_order(self.run_id))

    def marker(self, name: str) -> str | None:
        return self.services.ledger.marker(self.run_id, name)

    def set_marker(self, name: str, value: str) -> None:
        self.services.ledger.set_marker(self.run_id, name, value)

    def renew(self) -> None:
        """Renew the lease before a call that may be slow (a lapsed lease lets the reconciler in)."""
        self.lease.reacquire()


def step_task_name(step: str) -> str:
    return f"provisioning.{step}"


def make_publisher(settings: Settings) -> Celery:
    """A Celery app that only sends (the listener, the CLI): same broker and delivery settings."""
    app = Celery("provisioning-publisher", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


def publish_run(app: Celery, run_id: str) -> str:
    """Send ``provisioning.provision_order(run_id)``; returns once the broker accepted it."""
    result = app.send_task(ENTRY_TASK, args=(run_id,), argsrepr=repr((run_id,)), kwargsrepr="{}")
    return str(result.id)


def chain_from(app: Celery, run_id: str, first_step: str) -> Any:
    """The chain of steps from ``first_step`` to the end, each taking only the run id."""
    start = STEPS.index(first_step)
    sigs: list[Signature] = [
        app.signature(step_task_name(step), args=(run_id,), immutable=True).set(argsrepr=repr((run_id,)))
        for step in STEPS[start:]
    ]
    return chain(*sigs)


def start_chain(app: Celery, run_id: str, first_step: str) -> None:
    chain_from(app, run_id, first_step).apply_async()


def backoff_s(settings: Settings, retries: int) -> float:
    """Exponential backoff with full jitter, capped below the broker's visibility timeout."""
    cap = min(settings.task_retry_backoff_max_s, settings.celery_visibility_timeout_s / 2)
    return random.uniform(0, min(cap, settings.task_retry_backoff_s * (2**retries)))


def fail_run(services: Services, run_id: str, step: str, reason: str) -> None:
    """Terminal failure: ledger first (the operators' record), then the Order shows Failed.

    Should the write-back not happen (Salesforce keeps refusing, or the worker dies first),
    the run stays in the ledger's write-back set and the reconciler writes it later.
    """
    services.ledger.fail(run_id, step, reason)
    log.error("run_failed", step=step, reason=reason)
    if write_order(services, run_id, _failure_fields(services.settings, step, reason), what="failure"):
        services.ledger.writeback_done(run_id)


def _failure_fields(settings: Settings, step: str, reason: str) -> dict[str, Any]:
    return {
        settings.sf_field_activation_status: "Failed",
        settings.sf_field_activation_error: f"{step}: {reason}"[:ORDER_ERROR_MAX_CHARS],
    }


def write_order(services: Services, run_id: str, fields: dict[str, Any], *, what: str) -> bool:
    """One PATCH, with a few short retries: used where no task retry can take over."""
    order_id = run_id.split(":", 1)[0]
    for attempt in range(1, FAILURE_WRITEBACK_ATTEMPTS + 1):
        try:
            services.salesforce.update_order(order_id, fields)
            return True
        except TransientError as exc:
            log.warning("order_writeback_retry", what=what, attempt=attempt, error=str(exc))
            time.sleep(FAILURE_WRITEBACK_BACKOFF_S * attempt)
        except Exception as exc:
            log.error("order_writeback_failed", what=what, error=str(exc))
            return False
    log.error("order_writeback_failed", what=what, error="transient errors persisted")
    return False


@dataclass
class RequeueOutcome:
    run_id: str
    action: str  # "requeued", "would requeue" or "skipped"
    step: str | None
    detail: str


def requeue(services: Services, app: Celery, run_ids: list[str], *, dry_run: bool) -> list[RequeueOutcome]:
    """Resume failed runs at their failed step; completed steps are not repeated."""
    outcomes: list[RequeueOutcome] = []
    s = services.settings
    for run_id in run_ids:
        run = services.ledger.get(run_id)
        if run is None or run.state is not RunState.FAILED:
            why = "not in the ledger" if run is None else f"it is {run.state.value}, not failed"
            outcomes.append(RequeueOutcome(run_id, "skipped", None, f"nothing to requeue: {why}"))
            continue
        step = run.failed_step or run.first_unfinished_step() or STEPS[-1]
        if dry_run:
            outcomes.append(
                RequeueOutcome(run_id, "would requeue", step, f"would resume at {step}: {run.error}")
            )
            continue
        try:
            step = services.ledger.reopen(run_id)
        except NotRequeueable as exc:
            outcomes.append(RequeueOutcome(run_id, "skipped", None, str(exc)))
            continue
        # The Order goes back to Activating before the chain resumes, so the writeback of a
        # second failure or of the success is the last word on the Order.
        write_order(
            services,
            run_id,
            {s.sf_field_activation_status: "Activating", s.sf_field_activation_error: None},
            what="requeue",
        )
        if step == ENTRY_STEP:
            publish_run(app, run_id)
        else:
            start_chain(app, run_id, step)
        outcomes.append(RequeueOutcome(run_id, "requeued", step, f"resumed at {step}"))
        log.info("run_requeued", run_id=run_id, step=step)
    return outcomes


def resume_stale(services: Services, app: Celery, idle_s: float) -> list[str]:
    """The reconciler's sweep: unfinished runs whose lease lapsed and that nobody touched lately."""
    resumed = []
    for run_id in services.ledger.stale_runs(idle_s):
        run = services.ledger.get(run_id)
        if run is None or run.state not in (RunState.QUEUED, RunState.RUNNING):
            continue
        step = run.first_unfinished_step()
        if step is None:
            services.ledger.finish(run_id)
            continue
        services.ledger.touch(run_id)
        if "chain" not in run.markers and not any(run.step(s).done for s in STEPS):
            # The entry task never started the chain (queued and lost, or requeued at the entry step).
            step = ENTRY_STEP
            publish_run(app, run_id)
        else:
            start_chain(app, run_id, step)
        resumed.append(run_id)
        log.warning("run_resumed_by_reconciler", run_id=run_id, step=step)
    return resumed


def repair_failure_writebacks(services: Services, idle_s: float) -> list[str]:
    """The reconciler's other sweep: failed runs whose Order does not show Failed yet; one PATCH each."""
    repaired = []
    for run_id in services.ledger.pending_writebacks(idle_s):
        run = services.ledger.get(run_id)
        if run is None or run.state is not RunState.FAILED:
            services.ledger.writeback_done(run_id)
            continue
        fields = _failure_fields(services.settings, run.failed_step or ENTRY_STEP, run.error or "")
        try:
            services.salesforce.update_order(run.order_id, fields)
        except TransientError as exc:
            log.warning("failure_writeback_retry_later", run_id=run_id, error=str(exc))
            continue
        except Exception as exc:
            log.error("failure_writeback_failed", run_id=run_id, error=str(exc))
            services.ledger.writeback_done(run_id)
            continue
        services.ledger.writeback_done(run_id)
        repaired.append(run_id)
        log.warning("failure_writeback_repaired", run_id=run_id, step=run.failed_step)
    return repaired
