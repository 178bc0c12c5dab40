"""eSIM step task."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.esim import steps
from provisioning.step.chain import Step
from tasks.app import ProvisioningTask
from tasks.steps import register, run_step

register(Step.ACTIVATE_ESIM, steps.activate_esim)


@shared_task(name=Step.ACTIVATE_ESIM.task_name, bind=True, base=ProvisioningTask)
def activate_esim(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: the Order's ICCID is claimed from our inventory before downloadOrder (a repeat
    # answers "in use" for our own ICCID); the matchingId derives from the Order.
    return run_step(self, run_id, Step.ACTIVATE_ESIM)
