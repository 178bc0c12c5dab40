"""The Salesforce step: one PATCH of absolute values marks the Order Activated (naturally idempotent).

Every run does it (a run exists because the Order says Activating), with the
Order's effects, so a later run of an Order writes back the very same ids.
"""

from __future__ import annotations

from datetime import UTC, datetime

from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import EsimActivated, OrderWrittenBack, WhmcsOrderCreated
from provisioning.step.spec import Adoption

# The Order's activation time: set when the step is first claimed for the Order (its row's
# ``stamp``), or adopted from the Order itself.
ACTIVATED_AT_MARKER = "activated_at"


def salesforce_now() -> str:
    """Now, as a Salesforce DateTime field takes it (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def adopt(order: Order) -> Adoption:
    """Every run writes the Order back itself; what it keeps is the activation time the Order shows."""
    return Adoption(markers={ACTIVATED_AT_MARKER: order.activated_at} if order.activated_at else {})


def update_salesforce(ctx: StepContext) -> OrderWrittenBack:
    # The time is fixed on the Order's first activation, so every write sends the very same values.
    activated_at = ctx.marker(ACTIVATED_AT_MARKER)
    if activated_at is None:
        # Not claimed through the lifecycle (which stamps it): fix it now, before the write.
        activated_at = salesforce_now()
        ctx.set_marker(ACTIVATED_AT_MARKER, activated_at)
    salesforce = ctx.services.salesforce
    whmcs = ctx.result(WhmcsOrderCreated)
    esim = ctx.result(EsimActivated)
    if whmcs is None:
        raise RuntimeError("update_salesforce ran before create_whmcs_order recorded its order")
    fields = salesforce.field_names.patch(
        activation_status="Activated",
        whmcs_order_id=str(whmcs.whmcs_order_id),
        esim_iccid=esim.iccid if esim else None,
        activation_error=None,
        activated_at=activated_at,
    )
    ctx.renew()
    salesforce.update_order(ctx.order_id, fields)
    return OrderWrittenBack(activated_at=activated_at)
