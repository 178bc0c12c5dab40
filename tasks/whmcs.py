"""WHMCS step tasks."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.whmcs import steps
from tasks.app import ProvisioningTask
from tasks.steps import run_step


@shared_task(name="provisioning.validate_payment", bind=True, base=ProvisioningTask)
def validate_payment(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: read-only calls; the ledger records the outcome once.
    return run_step(self, run_id, "validate_payment", steps.validate_payment)


@shared_task(name="provisioning.create_whmcs_order", bind=True, base=ProvisioningTask)
def create_whmcs_order(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: an intent record before AddOrder, the run id in the order's notes and a
    # GetOrders lookup before any second AddOrder; AcceptOrder's "not Pending" is checked with GetOrders.
    return run_step(self, run_id, "create_whmcs_order", steps.create_whmcs_order)
