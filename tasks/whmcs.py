"""WHMCS step tasks."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.step.chain import Step
from provisioning.whmcs import steps
from tasks.app import ProvisioningTask
from tasks.steps import register, run_step

register(Step.VALIDATE_PAYMENT, steps.validate_payment)
register(Step.CREATE_WHMCS_ORDER, steps.create_whmcs_order)


@shared_task(name=Step.VALIDATE_PAYMENT.task_name, bind=True, base=ProvisioningTask)
def validate_payment(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: read-only calls; the ledger records the outcome once per Order.
    return run_step(self, run_id, Step.VALIDATE_PAYMENT)


@shared_task(name=Step.CREATE_WHMCS_ORDER.task_name, bind=True, base=ProvisioningTask)
def create_whmcs_order(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: an intent record before AddOrder, the Order's effect key in the order's notes and a
    # GetOrders lookup before any second AddOrder; AcceptOrder's "not Pending" is checked with GetOrders.
    return run_step(self, run_id, Step.CREATE_WHMCS_ORDER)
