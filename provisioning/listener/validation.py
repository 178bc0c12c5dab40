"""What makes an event well-formed, and which run it asks for."""

from __future__ import annotations

from dataclasses import dataclass

from provisioning.core.run_id import RunId
from provisioning.salesforce.events import Event
from provisioning.salesforce.ids import normalize_id

IDEM_KEY_MAX_CHARS = 80
# The key prefix of Order Ids: another object's valid Id (an Account's 001...) is not an Order.
ORDER_KEY_PREFIX = "801"


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class CancelRequest:
    """The event asks to cancel the Order (``Action__c = cancel``: the Order_PublishCancelRequest flow)."""

    order_id: str
    reason: str


# Action__c: empty or "provision" asks for a provisioning run; "cancel" for the Order's cancellation.
ACTION_PROVISION = "provision"
ACTION_CANCEL = "cancel"
REASON_MAX_CHARS = 255
# Idempotency keys the service keeps for itself (the cancellation's run: runs/cancellation.py).
RESERVED_IDEM_KEY_PREFIX = "cancel:"


def validate_event(event: Event) -> RunId | CancelRequest | Rejected:
    """The run (or the cancellation) a well-formed event asks for, or why it is malformed (checked before
    any call is spent)."""
    if event.payload is None:
        return Rejected(f"payload does not decode: {event.decode_error or 'unknown reason'}")
    payload = event.payload
    if not isinstance(payload, dict):
        return Rejected("payload is not an object")
    order_id = payload.get("OrderId__c")
    if order_id is None or order_id == "":
        return Rejected("OrderId__c is missing")
    if not isinstance(order_id, str):
        return Rejected(f"OrderId__c is a {type(order_id).__name__}, not text")
    try:
        order_id = normalize_id(order_id)
    except ValueError as exc:
        return Rejected(f"OrderId__c is not a valid Salesforce Id: {exc}")
    if not order_id.startswith(ORDER_KEY_PREFIX):
        return Rejected(
            f"OrderId__c {order_id} is the Id of another kind of record (key prefix {order_id[:3]}), "
            f"not of an Order ({ORDER_KEY_PREFIX}): fix the Flow that publishes the event"
        )
    action = payload.get("Action__c")
    if action is not None and not isinstance(action, str):
        return Rejected(f"Action__c is a {type(action).__name__}, not text")
    action = (action or ACTION_PROVISION).strip().lower()
    if action not in (ACTION_PROVISION, ACTION_CANCEL):
        return Rejected(f"Action__c {action!r} is neither {ACTION_PROVISION!r} nor {ACTION_CANCEL!r}")
    if action == ACTION_CANCEL:
        reason = payload.get("Reason__c")
        if reason is not None and not isinstance(reason, str):
            return Rejected(f"Reason__c is a {type(reason).__name__}, not text")
        return CancelRequest(order_id, (reason or "").strip()[:REASON_MAX_CHARS] or "cancelled in Salesforce")
    idem_key = payload.get("IdemKey__c")
    if idem_key is not None and not isinstance(idem_key, str):
        return Rejected(f"IdemKey__c is a {type(idem_key).__name__}, not text")
    if idem_key is not None and len(idem_key) > IDEM_KEY_MAX_CHARS:
        return Rejected(f"IdemKey__c is longer than {IDEM_KEY_MAX_CHARS} characters")
    if idem_key is not None and idem_key.strip().startswith(RESERVED_IDEM_KEY_PREFIX):
        return Rejected(
            f"IdemKey__c {idem_key!r} starts with {RESERVED_IDEM_KEY_PREFIX!r}, kept for cancellations"
        )
    return RunId.for_event(order_id, idem_key)
