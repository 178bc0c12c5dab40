"""The entry task: one run of one Order, from the event to the started chain."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.errors import PermanentError, TransientError
from provisioning.ledger import STEPS, RunState, parse_run_id
from provisioning.logs import get_logger
from provisioning.runs import ENTRY_STEP, backoff_s, fail_run, start_chain
from provisioning.salesforce.errors import OrderNotFound
from tasks.app import ProvisioningTask
from tasks.steps import LEASE_BUSY_RETRY_S, RunFailed, max_retries

log = get_logger(__name__)

ACTIVATING = "Activating"


@shared_task(name="provisioning.provision_order", bind=True, base=ProvisioningTask)
def provision_order(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    """Take the run's lease, read the Order (ONE query), check it is Activating, start the chain.

    Idempotent: a run that already started its chain, finished, failed or was
    skipped is left alone, so a duplicate or replayed event does nothing; the
    lease keeps simultaneous duplicates from both starting it; a redelivery of a
    message whose worker died before the chain started picks up where it stopped.
    """
    try:
        order_id, _ = parse_run_id(run_id)
    except ValueError as exc:
        log.error("provision_order_bad_run_id", error=str(exc))
        return {"ignored": "not a run id"}
    services = self.app.services
    ledger = services.ledger
    settings = services.settings

    def already(run: Any) -> bool:
        return run is not None and (
            "chain" in run.markers or run.state not in (RunState.QUEUED, RunState.RUNNING)
        )

    run = ledger.get(run_id)
    if already(run):
        log.info("duplicate_event_ignored", state=run.state.value)
        return {"duplicate": True, "state": run.state.value}

    with ledger.holding(run_id) as lease:
        if lease is None:
            log.info("run_being_started_elsewhere")
            raise self.retry(countdown=LEASE_BUSY_RETRY_S, max_retries=max_retries(self))
        run = ledger.get(run_id)
        if already(run):
            return {"duplicate": True, "state": run.state.value}
        try:
            order = services.salesforce.fetch_order(order_id)
        except OrderNotFound as exc:
            ledger.skip(run_id, str(exc))
            log.warning("order_not_found_run_skipped", error=str(exc))
            return {"skipped": "order not found"}
        except TransientError as exc:
            if self.request.retries < settings.task_max_retries:
                raise self.retry(
                    exc=exc,
                    countdown=backoff_s(settings, self.request.retries),
                    max_retries=max_retries(self),
                ) from None
            fail_run(services, run_id, ENTRY_STEP, f"gave up reading the Order: {exc}")
            raise RunFailed(f"{ENTRY_STEP}: {exc}") from None
        except PermanentError as exc:
            fail_run(services, run_id, ENTRY_STEP, str(exc))
            raise RunFailed(f"{ENTRY_STEP}: {exc}") from None
        if order.activation_status != ACTIVATING:
            reason = f"Order is {order.activation_status!r}, not {ACTIVATING!r}: nothing to do"
            ledger.skip(run_id, reason)
            log.warning("order_not_activating", status=order.activation_status, reason=reason)
            return {"skipped": reason}
        ledger.start(run_id, order.model_dump(mode="json"))
    # Outside the lease: the first step takes it at once.
    start_chain(self.app, run_id, STEPS[0])
    ledger.set_marker(run_id, "chain", "1")
    log.info("run_started")
    return {"run_id": run_id}
