"""The Salesforce step: one PATCH of absolute values marks the Order Activated (naturally idempotent).

Every run does it (a run exists because the Order says Activating), with the
Order's effects, so a later run of an Order writes back the very same ids.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from provisioning.chain import Step
from provisioning.context import StepContext


def update_salesforce(ctx: StepContext) -> dict[str, Any]:
    # The time is fixed on the Order's first activation, so every write sends the very same values.
    activated_at = ctx.marker("activated_at")
    if activated_at is None:
        activated_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        ctx.set_marker("activated_at", activated_at)
    salesforce = ctx.services.salesforce
    fields = salesforce.field_names.patch(
        activation_status="Activated",
        whmcs_order_id=str(ctx.result(Step.CREATE_WHMCS_ORDER).get("whmcs_order_id")),
        esim_iccid=ctx.result(Step.ACTIVATE_ESIM).get("iccid"),
        activation_error=None,
        activated_at=activated_at,
    )
    ctx.renew()
    salesforce.update_order(ctx.order_id, fields)
    return {"activated_at": activated_at}
