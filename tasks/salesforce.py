"""Salesforce step task."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.salesforce import steps
from tasks.app import ProvisioningTask
from tasks.steps import run_step


@shared_task(name="provisioning.update_salesforce", bind=True, base=ProvisioningTask)
def update_salesforce(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: one PATCH of absolute values (the activation time is fixed on the first attempt).
    return run_step(self, run_id, "update_salesforce", steps.update_salesforce)
