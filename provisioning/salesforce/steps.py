"""The Salesforce step: one PATCH of absolute values marks the Order Activated (naturally idempotent)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from provisioning.ledger import RunRecord
from provisioning.runs import StepContext
from provisioning.salesforce.client import OrderFieldNames


def _result(run: RunRecord, step: str, key: str) -> Any:
    return (run.step(step).result or {}).get(key)


def update_salesforce(ctx: StepContext) -> dict[str, Any]:
    run = ctx.services.ledger.get(ctx.run_id)
    assert run is not None
    # The time is fixed on the first attempt, so every retry sends the very same values.
    activated_at = ctx.marker("activated_at")
    if activated_at is None:
        activated_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        ctx.set_marker("activated_at", activated_at)
    names = OrderFieldNames.from_settings(ctx.settings)
    fields = names.patch(
        activation_status="Activated",
        whmcs_order_id=str(_result(run, "create_whmcs_order", "whmcs_order_id")),
        esim_iccid=_result(run, "activate_esim", "iccid"),
        activation_error=None,
        activated_at=activated_at,
    )
    ctx.renew()
    ctx.services.salesforce.update_order(ctx.order_id, fields)
    return {"activated_at": activated_at}
