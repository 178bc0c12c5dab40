"""E-mail step task."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from provisioning.email import steps
from provisioning.step.chain import Step
from tasks.app import ProvisioningTask
from tasks.steps import register, run_step

register(Step.SEND_EMAIL, steps.send_email)


@shared_task(name=Step.SEND_EMAIL.task_name, bind=True, base=ProvisioningTask)
def send_email(self: ProvisioningTask, run_id: str) -> dict[str, Any]:
    # Idempotent: the ledger's outbox (sending -> sent) and a Message-ID derived from the Order;
    # an unknown outcome follows EMAIL_RESEND_POLICY (default: resend with the same Message-ID).
    return run_step(self, run_id, Step.SEND_EMAIL)
