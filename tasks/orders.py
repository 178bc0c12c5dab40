"""The entry task: one run of one Order, from the event to the started chain."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.chain import ENTRY_TASK
from provisioning.lifecycle import begin_run
from provisioning.logs import get_logger
from provisioning.publishing import chain_from
from provisioning.run_id import RunId
from tasks.app import ProvisioningTask
from tasks.steps import celery_outcomes

log = get_logger(__name__)


@shared_task(name=ENTRY_TASK, bind=True, base=ProvisioningTask)
def provision_order(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    """Take the Order's lease, read the Order (ONE query), check it is Activating, start the chain.

    Idempotent: a run that already started its chain, or ended, is left alone, so a
    duplicate or replayed event does nothing; a run of an Order that another run is
    provisioning joins that run; the lease keeps simultaneous duplicates from both
    starting; a redelivery of a message whose worker died before the chain started
    picks up where it stopped.
    """
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        log.error("provision_order_bad_run_id", error=str(exc))
        return {"ignored": "not a run id"}
    services = self.app.services
    begun = celery_outcomes(self, lambda: begin_run(services, rid, retries=self.request.retries))
    if begun.first_step is None:
        return begun.result
    # Outside the lease: the first step takes it at once.
    chain_from(self.app, rid, begun.first_step).apply_async()
    services.ledger.mark_chain_started(rid)
    log.info("run_started", first_step=begun.first_step.value)
    return begun.result
