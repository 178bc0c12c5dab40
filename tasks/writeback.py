"""The failure write-back's task: the next try of writing a failed run's failure on its Order.

Sent by a step's task when its run failed and Salesforce refused to record the failure for now
(:class:`provisioning.runs.lifecycle.RunFailed` with ``writeback_in_s``); each refusal is a retry of
this task with the countdown the retry policy chose (``WRITEBACK_REFUSED``), at most
FAILURE_WRITEBACK_TRIES tries in all; then the reconciler has it (``provisioning.runs.writeback``).
Flower shows it under its name, a child of the step that failed, with its retries.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.core.logs import get_logger
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.runs import writeback
from provisioning.runs.writeback import WRITE_FAILURE_TASK
from tasks.app import ProvisioningTask

log = get_logger(__name__)

# One PATCH and a few Redis round trips: far below this.
WRITE_FAILURE_TIME_LIMIT_S = 60


# Idempotent: it takes the run id only and writes only while the run is still failed and in the
# ledger's write-back set, checked under the Order's lease; the set is left as soon as the PATCH is
# answered, and the PATCH sets absolute values. A redelivered message, a retry after a lost answer or
# the reconciler's sweep running meanwhile find the run out of the set, or write the same thing again.
@shared_task(
    name=WRITE_FAILURE_TASK,
    bind=True,
    base=ProvisioningTask,
    time_limit=WRITE_FAILURE_TIME_LIMIT_S,
    max_retries=None,
)
def write_failure_on_order(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    """Write a failed run's failure on its Order (a try of the write-back's short schedule)."""
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("writeback_with_bad_run_id", error=str(exc))
        return {"ignored": "not a run id"}
    # The first try was the failing step's own; this task's first run is the second.
    tries = int(self.request.retries) + 2
    try:
        outcome = writeback.retry(self.app.services, rid, tries)
    except Wait as wait:
        # Bounded by writeback.retry itself (FAILURE_WRITEBACK_TRIES): Celery's own bound is not used.
        cause = wait.__cause__ if isinstance(wait.__cause__, Exception) else wait
        raise self.retry(exc=cause, countdown=wait.countdown_s, max_retries=None) from None
    return {"writeback": outcome.value, "tries": tries}
