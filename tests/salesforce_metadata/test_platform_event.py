"""The Platform Event in salesforce/ is the one the listener's contract expects, and the flow fills it."""

from __future__ import annotations

import pytest

from provisioning.core.run_id import ORDER_ID_CHARS
from provisioning.core.settings import DEFAULT_PROVISION_EVENT, Settings
from provisioning.listener.validation import ACTION_CANCEL, IDEM_KEY_MAX_CHARS, REASON_MAX_CHARS
from tests.salesforce_metadata.project import MD, SOURCE, FieldDefinition, child, children, parse

pytestmark = pytest.mark.fast

EVENT_DIR = SOURCE / "objects" / DEFAULT_PROVISION_EVENT
PUBLISHING_FLOW = SOURCE / "flows" / "Order_PublishProvisionRequest.flow-meta.xml"
CANCEL_FLOW = SOURCE / "flows" / "Order_PublishCancelRequest.flow-meta.xml"


def test_the_event_the_listener_subscribes_to_is_a_high_volume_event_published_after_commit():
    assert Settings.model_fields["sf_provision_event_channel"].default == f"/event/{DEFAULT_PROVISION_EVENT}"
    event = parse(EVENT_DIR / f"{DEFAULT_PROVISION_EVENT}.object-meta.xml")
    assert child(event, "eventType") == "HighVolume"
    # After commit: the listener must find the Order already Activating, and no event for a rolled-back approval.
    assert child(event, "publishBehavior") == "PublishAfterCommit"
    assert child(event, "deploymentStatus") == "Deployed"


def test_the_events_fields_are_the_contract_an_order_id_a_key_and_an_optional_action_and_reason():
    fields = {
        f.name: f for f in map(FieldDefinition.load, sorted((EVENT_DIR / "fields").glob("*.field-meta.xml")))
    }
    assert set(fields) == {"OrderId__c", "IdemKey__c", "Action__c", "Reason__c"}
    order_id, idem_key = fields["OrderId__c"], fields["IdemKey__c"]
    assert (order_id.type, order_id.length, order_id.required) == ("Text", ORDER_ID_CHARS, True)
    assert (idem_key.type, idem_key.length, idem_key.required) == ("Text", IDEM_KEY_MAX_CHARS, False)
    action, reason = fields["Action__c"], fields["Reason__c"]
    assert (action.type, action.required) == ("Text", False)
    assert action.length >= len(ACTION_CANCEL)
    assert (reason.type, reason.length, reason.required) == ("Text", REASON_MAX_CHARS, False)


def test_the_cancel_flow_publishes_the_event_with_action_cancel_when_the_order_says_cancelling():
    flow = parse(CANCEL_FLOW)
    creates = [c for c in children(flow, "recordCreates") if child(c, "object") == DEFAULT_PROVISION_EVENT]
    assert len(creates) == 1
    assigned = {}
    for assignment in children(creates[0], "inputAssignments"):
        (value,) = children(assignment, "value")
        assigned[child(assignment, "field")] = child(value, "elementReference") or child(value, "stringValue")
    formulas = {child(f, "name") for f in children(flow, "formulas")}
    assert assigned["Action__c"] == ACTION_CANCEL
    assert assigned["OrderId__c"] == "$Record.Id"
    assert {assigned["IdemKey__c"], assigned["Reason__c"]} <= formulas
    (start,) = children(flow, "start")
    (condition,) = children(start, "filters")
    assert (child(condition, "field"), child(condition, "operator")) == ("Activation_Status__c", "EqualTo")
    assert child(condition.find(MD + "value"), "stringValue") == "Cancelling"
    assert child(start, "doesRequireRecordChangedToMeetCriteria") == "true"


def test_the_flow_publishes_the_event_with_the_orders_id_and_the_approvals_key():
    flow = parse(PUBLISHING_FLOW)
    creates = [c for c in children(flow, "recordCreates") if child(c, "object") == DEFAULT_PROVISION_EVENT]
    assert len(creates) == 1, "one Create Records element publishes the event"
    assigned = {}
    for assignment in children(creates[0], "inputAssignments"):
        (value,) = children(assignment, "value")
        assigned[child(assignment, "field")] = child(value, "elementReference")
    formulas = {child(f, "name") for f in children(flow, "formulas")}
    assert assigned["OrderId__c"] == "$Record.Id"
    assert assigned["IdemKey__c"] in formulas
    assert set(assigned) == {"OrderId__c", "IdemKey__c"}
