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


def validate_event(event: Event) -> RunId | Rejected:
    """The run a well-formed event asks for, or why it is malformed (checked before any call is spent)."""
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
    idem_key = payload.get("IdemKey__c")
    if idem_key is not None and not isinstance(idem_key, str):
        return Rejected(f"IdemKey__c is a {type(idem_key).__name__}, not text")
    if idem_key is not None and len(idem_key) > IDEM_KEY_MAX_CHARS:
        return Rejected(f"IdemKey__c is longer than {IDEM_KEY_MAX_CHARS} characters")
    return RunId.for_event(order_id, idem_key)
