"""The WHMCS steps: validate payment, then create and accept the order, once per Order."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from provisioning.core.errors import OrderRejected
from provisioning.core.logs import get_logger
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import PaymentChecked, WhmcsCancelled, WhmcsOrderCreated
from provisioning.step.spec import Adoption
from provisioning.whmcs.errors import WhmcsOrderNotPending, WhmcsPermanentError

log = get_logger(__name__)

NOTE_PREFIX = "provisioning order "


def order_note(key: str) -> str:
    """The text put in the WHMCS order's notes (the Order's effect key): how a lost answer is found again."""
    return f"{NOTE_PREFIX}{key}"


def _client_id(order: Order) -> int:
    raw = (order.whmcs_client_id or "").strip()
    if not raw:
        raise OrderRejected("the Order's Account has no WHMCS client id (Account.WHMCS_Client_ID__c)")
    try:
        return int(float(raw))
    except ValueError:
        raise OrderRejected(f"the Account's WHMCS client id {raw!r} is not a number") from None


def _items(order: Order) -> list[tuple[int, int]]:
    items = []
    for item in order.items:
        raw = (item.whmcs_product_id or "").strip()
        if not raw:
            raise OrderRejected(
                "an Order item's product has no WHMCS product id (Product2.WHMCS_Product_ID__c)"
            )
        try:
            items.append((int(float(raw)), int(item.quantity)))
        except ValueError:
            raise OrderRejected(f"the WHMCS product id {raw!r} is not a number") from None
    if not items:
        raise OrderRejected("the Order has no items")
    return items


def validate_payment(ctx: StepContext) -> PaymentChecked:
    """Read-only: the Order is complete, the WHMCS client is Active and has a usable pay method."""
    order = ctx.order()
    client_id = _client_id(order)
    _items(order)
    if not order.email:
        raise OrderRejected("the Order's bill-to contact has no e-mail address (BillToContact.Email)")
    whmcs = ctx.services.whmcs
    client = whmcs.get_client(client_id)
    if client.status != "Active":
        raise OrderRejected(f"WHMCS client {client_id} is {client.status}, not Active")
    today = datetime.now(UTC).date()
    methods = [m for m in whmcs.get_pay_methods(client_id) if not m.is_expired(today)]
    if not methods:
        raise OrderRejected(f"no valid payment method: WHMCS client {client_id} has none that is not expired")
    return PaymentChecked(whmcs_client_id=client_id, pay_methods=len(methods))


def adopt_payment(order: Order) -> Adoption:
    """An Order the ledger forgot but that shows its WHMCS order: its payment was checked then."""
    return Adoption(PaymentChecked(adopted=True))


def adopt_order(order: Order) -> Adoption:
    """The WHMCS order the Order shows, created and accepted before the ledger forgot it."""
    return Adoption(
        WhmcsOrderCreated(whmcs_order_id=int(order.whmcs_order_id or 0)), {WHMCS_ACCEPTED_MARKER: "1"}
    )


# The intent recorded before AddOrder: set by the step's claim (its row's ``stamp``).
WHMCS_INTENT_MARKER = "whmcs_intent"
# The order AddOrder made, and that AcceptOrder accepted it.
WHMCS_ORDER_MARKER = "whmcs_order_id"
WHMCS_ACCEPTED_MARKER = "whmcs_accepted"


def intent_stamp() -> str:
    """The intent's value: when the try began, unique to the try (the Order's lease serialises them)."""
    return repr(time.time())


def create_whmcs_order(ctx: StepContext) -> WhmcsOrderCreated:
    """AddOrder once (intent record + run id in notes + lookup), then AcceptOrder once."""
    order = ctx.order()
    client_id = _client_id(order)
    whmcs = ctx.services.whmcs
    note = order_note(ctx.effect_key)

    order_id_text = ctx.marker(WHMCS_ORDER_MARKER)
    if order_id_text is None:
        found = None
        if not ctx.stamped_by_this_try(WHMCS_INTENT_MARKER):
            # An earlier try's intent: it may have created the order and lost the answer: adopt it.
            found = whmcs.find_order_by_note(client_id, note)
            if found is not None:
                log.warning("whmcs_order_adopted", whmcs_order_id=found.id)
        if found is not None:
            whmcs_order_id = found.id
        else:
            # The intent is in the ledger (the step's claim stamped it); with replicas, on one
            # before AddOrder: a failover must not forget that it may have happened.
            ctx.confirm_stamp(WHMCS_INTENT_MARKER, intent_stamp)
            ctx.renew()
            created = whmcs.add_order(
                client_id=client_id,
                payment_method=ctx.settings.whmcs_payment_method,
                items=_items(order),
                notes=note,
            )
            whmcs_order_id = created.order_id
        # With the step's end: a worker dying before it leaves the intent, and the next try finds the order.
        ctx.record_marker(WHMCS_ORDER_MARKER, str(whmcs_order_id))
    else:
        whmcs_order_id = int(order_id_text)

    if ctx.marker(WHMCS_ACCEPTED_MARKER) is None:
        ctx.renew()
        try:
            whmcs.accept_order(whmcs_order_id)
        except WhmcsOrderNotPending:
            # A repeat after a lost answer: fine if the order is Active now.
            orders = whmcs.get_orders(order_id=whmcs_order_id)
            if not orders or orders[0].status != "Active":
                status = orders[0].status if orders else "missing"
                raise WhmcsPermanentError(
                    f"WHMCS order {whmcs_order_id} cannot be accepted: it is {status}"
                ) from None
        # With the step's end: a repeat AcceptOrder answers "not Pending", checked above.
        ctx.record_marker(WHMCS_ACCEPTED_MARKER, "1")
    return WhmcsOrderCreated(whmcs_order_id=whmcs_order_id)


# -- the Order's cancellation ----------------------------------------------------------------------

# Service statuses a termination leaves alone: there is nothing left to undo.
ENDED_SERVICE_STATUSES = frozenset({"Terminated", "Cancelled", "Fraud"})


def cancel_whmcs_order(ctx: StepContext) -> WhmcsCancelled:
    """Undo the Order's WHMCS order: CancelOrder while it is Pending; once accepted, ModuleTerminate of
    its services (WHMCS_CANCEL_ACCEPTED=terminate) or a report for a person (manual).

    Safe to repeat: the order (and each service) is read with GetOrders before anything is called, and
    what is Cancelled or Terminated already is not called again. An AddOrder whose answer was lost (the
    intent without an order id) is found by its note, as the forward step would find it.
    """
    whmcs = ctx.services.whmcs
    whmcs_order_id = _whmcs_order_of(ctx)
    if whmcs_order_id is None:
        return WhmcsCancelled(outcome="nothing")
    orders = whmcs.get_orders(order_id=whmcs_order_id)
    if not orders:
        return WhmcsCancelled(
            outcome="manual",
            whmcs_order_id=whmcs_order_id,
            reason=f"WHMCS order {whmcs_order_id} was not found: check WHMCS by hand",
        )
    found = orders[0]
    if found.status == "Cancelled":
        return WhmcsCancelled(outcome="undone", whmcs_order_id=whmcs_order_id, action="cancelled")
    if found.status == "Pending":
        ctx.renew()
        try:
            whmcs.cancel_order(whmcs_order_id)
        except WhmcsOrderNotPending:
            again = whmcs.get_orders(order_id=whmcs_order_id)
            if not again or again[0].status != "Cancelled":
                raise
        log.info("whmcs_order_cancelled", whmcs_order_id=whmcs_order_id)
        return WhmcsCancelled(outcome="undone", whmcs_order_id=whmcs_order_id, action="cancelled")
    if ctx.settings.whmcs_cancel_accepted == "manual":
        return WhmcsCancelled(
            outcome="manual",
            whmcs_order_id=whmcs_order_id,
            reason=f"WHMCS order {whmcs_order_id} is {found.status} (accepted); WHMCS_CANCEL_ACCEPTED=manual: "
            "terminate its services and cancel it in WHMCS",
        )
    for service_id in found.service_ids:
        if found.service_statuses.get(service_id) in ENDED_SERVICE_STATUSES:
            continue
        ctx.renew()
        whmcs.terminate_service(service_id)
        log.info("whmcs_service_terminated", whmcs_order_id=whmcs_order_id, service_id=service_id)
    return WhmcsCancelled(
        outcome="undone",
        whmcs_order_id=whmcs_order_id,
        action="terminated",
        terminated_service_ids=sorted(found.service_ids),
    )


def _whmcs_order_of(ctx: StepContext) -> int | None:
    """The Order's WHMCS order: recorded, or found by its note after an AddOrder whose answer was lost."""
    created = ctx.result(WhmcsOrderCreated)
    if created is not None:
        return created.whmcs_order_id
    recorded = ctx.marker(WHMCS_ORDER_MARKER)
    if recorded is not None:
        return int(recorded)
    if ctx.marker(WHMCS_INTENT_MARKER) is None:
        return None
    payment = ctx.result(PaymentChecked)
    client_id = payment.whmcs_client_id if payment is not None else None
    if client_id is None:
        client_id = _client_id(ctx.order())
    found = ctx.services.whmcs.find_order_by_note(client_id, order_note(ctx.effect_key))
    return found.id if found is not None else None
