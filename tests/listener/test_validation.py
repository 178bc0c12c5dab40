"""Event validation (the fast tier): what the listener quarantines, and the run a good event asks for."""

from __future__ import annotations

import random

import pytest

from provisioning.core.run_id import RunId
from provisioning.listener.validation import CancelRequest, Rejected, validate_event
from provisioning.salesforce.events import Event, ReplayId
from provisioning.sandbox.salesforce import ids

pytestmark = pytest.mark.fast

ORDER_ID = ids.IdFactory(random.Random(5)).new(ids.PREFIX_ORDER)
ACCOUNT_ID = ids.IdFactory(random.Random(6)).new(ids.PREFIX_ACCOUNT)


def _event(payload: object, decode_error: str | None = None) -> Event:
    return Event(replay_id=ReplayId.cometd(1), uuid="u", payload=payload, decode_error=decode_error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"IdemKey__c": "k"}, "OrderId__c is missing"),
        ({"OrderId__c": ""}, "OrderId__c is missing"),
        ({"OrderId__c": 801}, "OrderId__c is a int, not text"),
        ({"OrderId__c": "801Dn0000HeJ6rrIQX"}, "not a valid Salesforce Id"),
        ({"OrderId__c": "not-an-id"}, "not a valid Salesforce Id"),
        ({"OrderId__c": ACCOUNT_ID}, "the Id of another kind of record (key prefix 001)"),
        ({"OrderId__c": ORDER_ID, "IdemKey__c": 7}, "IdemKey__c is a int, not text"),
        ({"OrderId__c": ORDER_ID, "IdemKey__c": "x" * 81}, "IdemKey__c is longer than 80 characters"),
        (["not", "an", "object"], "payload is not an object"),
        ({"OrderId__c": ORDER_ID, "Action__c": "delete"}, "Action__c 'delete' is neither"),
        ({"OrderId__c": ORDER_ID, "Action__c": 1}, "Action__c is a int, not text"),
        ({"OrderId__c": ORDER_ID, "Action__c": "cancel", "Reason__c": 3}, "Reason__c is a int, not text"),
        ({"OrderId__c": ORDER_ID, "IdemKey__c": "cancel:g1"}, "kept for cancellations"),
    ],
)
def test_a_malformed_event_is_rejected_with_a_reason_that_names_the_field(
    payload: object, reason: str
) -> None:
    checked = validate_event(_event(payload))
    assert isinstance(checked, Rejected)
    assert reason in checked.reason


def test_a_payload_that_did_not_decode_is_rejected_with_the_decoder_s_reason() -> None:
    checked = validate_event(_event(None, decode_error="schema 7: truncated record"))
    assert checked == Rejected("payload does not decode: schema 7: truncated record")


@pytest.mark.parametrize(
    ("key", "run"),
    [("approval-1", "approval-1"), (None, "default"), ("  ", "default"), (" k ", "k")],
)
def test_a_good_event_asks_for_the_run_of_its_order_and_key(key: str | None, run: str) -> None:
    payload = {"OrderId__c": ORDER_ID[:15], **({"IdemKey__c": key} if key is not None else {})}
    assert validate_event(_event(payload)) == RunId(ORDER_ID, run)


def test_an_event_with_action_cancel_asks_for_the_orders_cancellation_with_its_reason() -> None:
    asked = validate_event(
        _event({"OrderId__c": ORDER_ID, "Action__c": "Cancel", "Reason__c": " payment reversed "})
    )
    assert asked == CancelRequest(ORDER_ID, "payment reversed")
    plain = validate_event(_event({"OrderId__c": ORDER_ID, "Action__c": "cancel"}))
    assert plain == CancelRequest(ORDER_ID, "cancelled in Salesforce")
    provision = validate_event(_event({"OrderId__c": ORDER_ID, "IdemKey__c": "k", "Action__c": "provision"}))
    assert provision == RunId(ORDER_ID, "k")
