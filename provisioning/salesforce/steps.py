"""The Salesforce steps: one PATCH of absolute values marks the Order Activated (naturally idempotent);
another, the cancellation's last step, marks it Cancelled with what was undone.

Every run does it (a run exists because the Order says Activating), with the
Order's effects, so a later run of an Order writes back the very same ids.
"""

from __future__ import annotations

from datetime import UTC, datetime

from provisioning.core.errors import PermanentError
from provisioning.core.logs import get_logger
from provisioning.salesforce.client import OrderFieldNames
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import (
    EsimActivated,
    EsimCancelled,
    OrderCancelled,
    OrderWrittenBack,
    WhmcsCancelled,
    WhmcsOrderCreated,
)
from provisioning.step.spec import Adoption

log = get_logger(__name__)

# The Order's activation time: set when the step is first claimed for the Order (its row's
# ``stamp``), or adopted from the Order itself.
ACTIVATED_AT_MARKER = "activated_at"


def salesforce_now() -> str:
    """Now, as a Salesforce DateTime field takes it (UTC, milliseconds)."""
    return salesforce_time(datetime.now(UTC).timestamp())


def salesforce_time(epoch_s: float) -> str:
    """A moment, as a Salesforce DateTime field takes it (UTC, milliseconds)."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    # The profile's state as the ledger has it now (Released on a first activation).
    status = ctx.services.ledger.esim_status.get(esim.iccid) if esim and esim.iccid else None
    fields = salesforce.field_names.patch(
        activation_status="Activated",
        whmcs_order_id=str(whmcs.whmcs_order_id),
        esim_iccid=esim.iccid if esim else None,
        activation_error=None,
        activated_at=activated_at,
        esim_status=status.state.label if status else None,
        esim_status_at=salesforce_time(status.changed_at) if status else None,
    )
    if status is None:  # no eSIM state known here: leave the Order's as it is
        _leave_esim_fields(salesforce.field_names, fields)
    ctx.renew()
    salesforce.update_order(ctx.order_id, fields)
    return OrderWrittenBack(activated_at=activated_at)


# -- the Order's cancellation ----------------------------------------------------------------------


def write_cancelled(ctx: StepContext) -> OrderCancelled:
    """One PATCH of absolute values: Cancelled, and in Activation_Error__c what was undone and what is
    left to a person. A refusal for good is reported (``manual``), not retried: the effects are undone."""
    cancel = ctx.provisioning.cancel
    if cancel is None:
        raise RuntimeError("write_cancelled ran for an Order that was not cancelled")
    cancelled_at = salesforce_time(cancel.at)
    summary = cancellation_summary(cancel.reason, ctx.result(EsimCancelled), ctx.result(WhmcsCancelled))
    esim = ctx.result(EsimCancelled)
    salesforce = ctx.services.salesforce
    fields = salesforce.field_names.patch(
        activation_status="Cancelled",
        activation_error=summary,
        esim_status="Cancelled",
        esim_status_at=cancelled_at,
    )
    if esim is None or esim.outcome != "undone":  # the profile was not cancelled: its state stays
        _leave_esim_fields(salesforce.field_names, fields)
    ctx.renew()
    try:
        salesforce.update_order(ctx.order_id, fields)
    except PermanentError as exc:
        log.error("order_cancelled_not_written", error=str(exc))
        return OrderCancelled(outcome="manual", cancelled_at=cancelled_at, summary=summary, reason=str(exc))
    return OrderCancelled(outcome="undone", cancelled_at=cancelled_at, summary=summary)


def _leave_esim_fields(names: OrderFieldNames, fields: dict[str, object]) -> None:
    fields.pop(names.esim_status, None)
    fields.pop(names.esim_status_at, None)


def cancellation_summary(reason: str, esim: EsimCancelled | None, whmcs: WhmcsCancelled | None) -> str:
    """What the Order is told: why, what was undone, what a person must do (short: the field is 255)."""
    parts = []
    if esim is not None and esim.outcome == "undone":
        parts.append(f"eSIM {esim.iccid} cancelled and back in stock")
    elif esim is not None and esim.outcome == "manual":
        parts.append(f"MANUAL: eSIM {esim.iccid} was downloaded, not cancelled")
    if whmcs is not None and whmcs.outcome == "undone":
        what = "cancelled" if whmcs.action == "cancelled" else "services terminated"
        parts.append(f"WHMCS order {whmcs.whmcs_order_id} {what}")
    elif whmcs is not None and whmcs.outcome == "manual":
        parts.append(f"MANUAL: WHMCS order {whmcs.whmcs_order_id or '?'} left as is")
    undone = "; ".join(parts) if parts else "nothing had been provisioned"
    return f"Cancelled ({reason}): {undone}"
