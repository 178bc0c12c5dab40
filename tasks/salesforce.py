"""Salesforce step task."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.salesforce import steps
from provisioning.step.chain import Step
from tasks.app import ProvisioningTask
from tasks.steps import register, run_step

register(Step.UPDATE_SALESFORCE, steps.update_salesforce)


@shared_task(name=Step.UPDATE_SALESFORCE.task_name, bind=True, base=ProvisioningTask)
def update_salesforce(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: one PATCH of absolute values (the activation time is fixed on the Order's first activation).
    return run_step(self, run_id, Step.UPDATE_SALESFORCE)
