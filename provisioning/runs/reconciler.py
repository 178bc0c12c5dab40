"""The reconciler: the listener leader's sweeps that leave no Order behind.

Three sweeps, each safe to run at any time and on any replica (the listener runs
them only on the leader):

- :func:`resume_stale`: unfinished runs nobody works on (a worker died, a task was
  lost): sent on from where they stopped.
- :func:`repair_failure_writebacks`: failed runs whose Order does not show
  ``Failed`` yet (Salesforce refused the write, or the worker died first).
- :func:`backfill_orders`: Orders waiting in ``Activating`` that no run of ours is
  handling (an event never published, lost in the LATEST start gap, older than
  the 72 h retention, or dropped by the daily delivery limit): ONE SOQL query
  per sweep, paged, and a run for each, started by the reconciler. It also
  repairs an Order whose provisioning is done but which still says ``Activating``:
  the new run reuses the effects and writes the Order back.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from celery import Celery

from provisioning.core.errors import TransientError
from provisioning.core.logs import get_logger
from provisioning.core.run_id import RunId
from provisioning.ledger import BEGIN, Origin, RunState
from provisioning.ledger.metrics import ReconcilerAction
from provisioning.runs import cancellation
from provisioning.runs.publishing import publish_run, resume
from provisioning.runs.services import Services
from provisioning.runs.writeback import failure_fields

log = get_logger(__name__)

# The most Orders one backfill sweep starts (the next sweep takes the rest).
BACKFILL_MAX_ORDERS = 10_000
BACKFILL_KEY_PREFIX = "backfill-"


def resume_stale(services: Services, app: Celery, idle_s: float) -> list[RunId]:
    """Unfinished runs whose Order nobody holds and that nobody touched for ``idle_s``."""
    ledger = services.ledger
    chain = services.chain
    resumed = []
    for run_id in ledger.registries.stale(idle_s):
        run = ledger.runs.get(run_id)
        if run is None or not run.state.unfinished:
            continue
        if cancellation.is_cancellation(run_id):  # its own table: runs/cancellation.py
            if cancellation.resume(services, app, run) is not None:
                resumed.append(run_id)
            continue
        provisioning = ledger.orders.provisioning(run_id.order_id)
        if run.state is RunState.RUNNING and chain.first_unfinished(run, provisioning) is None:
            ledger.runs.finish(run_id)
            continue
        step = chain.resume_point(run, provisioning)
        ledger.runs.touch(run_id)
        resume(app, run_id, step)
        resumed.append(run_id)
        log.warning("run_resumed_by_reconciler", run_id=str(run_id), order_id=run_id.order_id, step=step)
    ledger.metrics.count_sweep(ReconcilerAction.RESUME, len(resumed))
    return resumed


def repair_failure_writebacks(services: Services, idle_s: float) -> list[RunId]:
    """Failed runs whose Order may not show Failed yet; one PATCH each."""
    ledger = services.ledger
    repaired = []
    for run_id in ledger.registries.pending_writebacks(idle_s):
        # Under the Order's lease: a newer run of the Order (a re-approval) must not be overwritten
        # with this run's failure after it has started.
        with ledger.leases.holding(run_id.order_id) as lease:
            if lease is None:
                continue
            # Checked again under the lease: the worker's short schedule may have written it meanwhile.
            if not ledger.registries.awaiting_writeback(run_id):
                continue
            run = ledger.runs.get(run_id)
            if run is None or run.state is not RunState.FAILED:
                ledger.registries.writeback_done(run_id)
                continue
            fields = failure_fields(services, run.failed_step or BEGIN, run.error or "")
            try:
                services.salesforce.update_order(run.order_id, fields)
            except TransientError as exc:
                log.warning("failure_writeback_retry_later", run_id=str(run_id), error=str(exc))
                continue
            except Exception as exc:
                log.error("failure_writeback_failed", run_id=str(run_id), error=str(exc))
                ledger.registries.writeback_done(run_id)
                continue
            ledger.registries.writeback_done(run_id)
        repaired.append(run_id)
        log.warning("failure_writeback_repaired", run_id=str(run_id), step=run.failed_step)
    ledger.metrics.count_sweep(ReconcilerAction.WRITEBACK, len(repaired))
    return repaired


def backfill_orders(services: Services, app: Celery, grace_s: float) -> list[RunId]:
    """Start a run for each Order waiting in Activating for longer than ``grace_s`` that no run handles."""
    ledger = services.ledger
    usage = ledger.limits.api_usage()
    ceiling = services.settings.sf_api_backfill_max_share
    if usage is not None and usage.share > ceiling:
        # The events' runs need the allowance more than this safety net does: try again next sweep.
        log.warning(
            "order_backfill_skipped",
            api_used=usage.used,
            api_limit=usage.limit,
            max_share=ceiling,
            reason="the org's daily API allowance is nearly spent (SF_API_BACKFILL_MAX_SHARE)",
        )
        ledger.metrics.count_sweep(ReconcilerAction.BACKFILL_SKIPPED, 1)
        return []
    before = datetime.fromtimestamp(time.time() - grace_s, UTC)
    started = []
    found = services.salesforce.waiting_orders(before, limit=BACKFILL_MAX_ORDERS)
    services.note_salesforce_api_usage()
    for waiting in found:
        order_id = waiting.order_id
        if ledger.orders.in_flight(order_id):
            continue
        provisioning = ledger.orders.provisioning(order_id)
        last = ledger.runs.get(provisioning.active) if provisioning.active else None
        if (
            last is not None
            and last.state is RunState.FAILED
            and ledger.registries.awaiting_writeback(last.run_id)
        ):
            # Failed, and the Order does not say so yet: the write-back sweep's business.
            continue
        # One id per modification of the Order: another sweep (or replica) finds the same run.
        run_id = RunId(order_id, BACKFILL_KEY_PREFIX + (re.sub(r"\D", "", waiting.last_modified) or "0"))
        if not ledger.runs.enqueue(run_id, Origin.RECONCILER):
            continue
        publish_run(app, run_id)
        started.append(run_id)
        log.warning(
            "order_backfilled",
            run_id=str(run_id),
            order_id=order_id,
            last_modified=waiting.last_modified,
            done_before=provisioning.active is not None,
        )
    # One round trip per sweep: what operators' dashboards and alerts show as Orders waiting.
    oldest = _timestamp(found[0].last_modified) if found else None
    ledger.metrics.count_backfill(waiting=len(found), oldest_modified_at=oldest, started=len(started))
    return started


def _timestamp(salesforce_datetime: str) -> float | None:
    try:
        return datetime.fromisoformat(salesforce_datetime).timestamp()
    except ValueError:
        return None
