"""The simulated org as salesforce/ deploys it: describe, limits, the Tooling API's flows, the knobs that
take pieces away, and an approval that does what the flow files say."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest
from simple_salesforce.api import Salesforce
from simple_salesforce.format import format_soql

from provisioning.core.settings import DEFAULT_PROVISION_EVENT
from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.sandbox.salesforce.driver import SalesforceDriver
from provisioning.sandbox.salesforce.model import parse_datetime
from tests.salesforce_metadata.project import MD, SOURCE, FieldDefinition, child, children, parse
from tests.salesforce_metadata.test_flows import AFTER_SAVE, BEFORE_SAVE, evaluate, idem_key_formula, start_of

from .test_salesforce_cometd import Bayeux

TOPIC = f"/event/{DEFAULT_PROVISION_EVENT}"


@pytest.fixture
def api(sf: SalesforceDriver) -> Salesforce:
    return Salesforce(
        instance_url=sf.url,
        session_id=sf.login(),
        session=sf.session,
        version=sf.version,
        object_pairs_hook=dict,
    )


def declared_fields(sobject: str) -> dict[str, FieldDefinition]:
    folder = SOURCE / "objects" / sobject / "fields"
    return {d.name: d for d in (FieldDefinition.load(p) for p in sorted(folder.glob("*.field-meta.xml")))}


def describe(api: Salesforce, sobject: str) -> dict[str, dict[str, Any]]:
    answer = api.restful(f"sobjects/{sobject}/describe")
    assert answer is not None
    return {f["name"]: f for f in answer["fields"]}


DESCRIBE_TYPE = {"Text": "string", "Picklist": "picklist", "DateTime": "datetime"}


@pytest.mark.parametrize("sobject", ["Order", "Account", "Product2", DEFAULT_PROVISION_EVENT])
def test_describe_answers_every_field_the_project_declares_with_its_type_length_and_values(
    api: Salesforce, sobject: str
) -> None:
    fields = describe(api, sobject)
    for name, declared in declared_fields(sobject).items():
        field = fields[name]
        assert field["type"] == DESCRIBE_TYPE[declared.type], name
        assert field["custom"] is True
        if declared.length is not None:
            assert field["length"] == declared.length, name
        assert [v["value"] for v in field["picklistValues"]] == list(declared.picklist_values), name
        assert field["nillable"] is not declared.required, name


def test_describe_says_updateable_as_the_permission_set_grants_edit(api: Salesforce) -> None:
    permission_set = parse(SOURCE / "permissionsets" / "Provisioning_Integration.permissionset-meta.xml")
    editable = {
        child(f, "field"): child(f, "editable") == "true"
        for f in children(permission_set, "fieldPermissions")
    }
    fields = describe(api, "Order")
    for name in declared_fields("Order"):
        assert fields[name]["updateable"] is editable[f"Order.{name}"], name
    assert describe(api, "Account")["WHMCS_Client_ID__c"]["updateable"] is False


def test_describe_of_an_object_the_org_does_not_have_is_not_found(sf: SalesforceDriver) -> None:
    answer = sf.rest("GET", "sobjects/OrderProvisonRequested__e/describe", sf.login())
    assert answer.status_code == 404
    assert answer.json()[0]["errorCode"] == "NOT_FOUND"


def test_limits_say_the_daily_api_requests_left_and_move_with_every_call(sf: SalesforceDriver) -> None:
    token = sf.login()
    first = sf.rest("GET", "limits", token)
    second = sf.rest("GET", "limits/", token)
    assert first.json()["DailyApiRequests"] == {"Max": 100_000, "Remaining": 100_000 - 1}
    assert second.json()["DailyApiRequests"]["Remaining"] == 100_000 - 2
    assert second.headers["Sforce-Limit-Info"] == "api-usage=2/100000"


def test_every_new_rest_answer_carries_the_api_usage_of_the_org_s_own_counter(sf: SalesforceDriver) -> None:
    token = sf.login()
    paths = ["sobjects/Order/describe", "limits", "tooling/query?q=SELECT+Id+FROM+FlowDefinition", "nope"]
    usages = [sf.rest("GET", path, token).headers["Sforce-Limit-Info"] for path in paths]
    assert usages == [f"api-usage={n}/100000" for n in range(1, len(paths) + 1)]


def test_the_tooling_api_lists_both_flows_of_the_project_active(api: Salesforce) -> None:
    flows = {p.name.removesuffix(".flow-meta.xml") for p in (SOURCE / "flows").glob("*.flow-meta.xml")}
    answer = api.toolingexecute(
        "query/", params={"q": "SELECT DeveloperName, ActiveVersionId, LatestVersionId FROM FlowDefinition"}
    )
    records = {r["DeveloperName"]: r for r in answer["records"]}
    assert set(records) == flows
    assert all(r["ActiveVersionId"] == r["LatestVersionId"] is not None for r in records.values())
    assert all(r["attributes"]["type"] == "FlowDefinition" for r in records.values())


def test_a_flow_left_inactive_has_no_active_version_in_either_tooling_object(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    sf.ok("POST", "org", {"inactive_flows": ["Order_PublishProvisionRequest"]})
    one = api.toolingexecute(
        "query/",
        params={
            "q": "SELECT DeveloperName, ActiveVersionId FROM FlowDefinition "
            "WHERE DeveloperName = 'Order_PublishProvisionRequest'"
        },
    )
    assert [r["ActiveVersionId"] for r in one["records"]] == [None]
    view = api.toolingexecute(
        "query/",
        params={
            "q": "SELECT ApiName, IsActive FROM FlowDefinitionView WHERE ApiName IN "
            "('Order_PublishProvisionRequest', 'Order_SetActivatingOnApproval')"
        },
    )
    assert {r["ApiName"]: r["IsActive"] for r in view["records"]} == {
        "Order_PublishProvisionRequest": False,
        "Order_SetActivatingOnApproval": True,
    }


def test_a_tooling_query_outside_the_sandbox_s_subset_is_refused_with_salesforce_s_codes(
    sf: SalesforceDriver,
) -> None:
    token = sf.login()
    unknown = sf.rest("GET", "tooling/query", token, params={"q": "SELECT Id FROM ApexClass"})
    column = sf.rest("GET", "tooling/query", token, params={"q": "SELECT Nope FROM FlowDefinition"})
    assert (unknown.status_code, unknown.json()[0]["errorCode"]) == (400, "INVALID_TYPE")
    assert (column.status_code, column.json()[0]["errorCode"]) == (400, "INVALID_FIELD")


# -- the knobs -------------------------------------------------------------------------------------


def test_a_removed_field_is_gone_from_describe_the_query_and_the_patch(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = sf.seed()
    sf.ok("POST", "org", {"removed_fields": ["Order.EID__c"]})
    assert "EID__c" not in describe(api, "Order")
    query = sf.rest(
        "GET",
        "query",
        sf.login(),
        params={"q": format_soql("SELECT Id, EID__c FROM Order WHERE Id = {}", order_id)},
    )
    assert query.json()[0]["errorCode"] == "INVALID_FIELD"
    patch = sf.rest("PATCH", f"sobjects/Order/{order_id}", sf.login(), json={"EID__c": "1"})
    assert (patch.status_code, patch.json()[0]["errorCode"]) == (400, "INVALID_FIELD")


def test_a_field_the_user_may_not_edit_is_not_updateable_and_its_patch_is_refused(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = sf.seed()
    sf.ok("POST", "org", {"read_only_fields": ["Order.WHMCS_Order_ID__c"]})
    assert describe(api, "Order")["WHMCS_Order_ID__c"]["updateable"] is False
    patch = sf.rest("PATCH", f"sobjects/Order/{order_id}", sf.login(), json={"WHMCS_Order_ID__c": "7"})
    assert patch.json()[0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
    assert sf.order(order_id)["WHMCS_Order_ID__c"] is None


def test_an_event_the_user_may_not_read_cannot_be_described_or_subscribed_on_either_transport(
    sf: SalesforceDriver,
) -> None:
    sf.ok("POST", "org", {"unreadable_objects": [DEFAULT_PROVISION_EVENT]})
    assert sf.rest("GET", f"sobjects/{DEFAULT_PROVISION_EVENT}/describe", sf.login()).status_code == 404
    stub, md = sf.pubsub_stub(), sf.pubsub_metadata()
    assert stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md).can_subscribe is False
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(stub.Subscribe(iter([pb.FetchRequest(topic_name=TOPIC, num_requested=1)]), metadata=md)))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    client = Bayeux(sf)
    client.handshake()
    reply = client.subscribe()
    assert reply["successful"] is False
    assert reply["error"].startswith("403::")


def test_unknown_knob_names_are_refused_and_reset_restores_the_org(sf: SalesforceDriver) -> None:
    wrong = sf.admin("POST", "org", {"removed_fields": ["Order.Nope__c"]})
    assert wrong.status_code == 400
    assert "Order.Nope__c" in wrong.json()["error"]
    sf.ok("POST", "org", {"inactive_flows": ["Order_SetActivatingOnApproval"]})
    sf.ok("POST", "reset")
    org = sf.ok("GET", "org")
    assert org["inactive_flows"] == []
    assert all(org["flows"].values())


# -- the approval follows the flow files ----------------------------------------------------------


def test_an_approval_does_what_the_two_flow_files_say(sf: SalesforceDriver) -> None:
    before_save, after_save = parse(BEFORE_SAVE), parse(AFTER_SAVE)
    # The filter both start on, as the files say it: the approval sets that field to that value.
    ((field, operator, value),) = start_of(BEFORE_SAVE)["filters"]
    assert start_of(AFTER_SAVE)["filters"] == [(field, operator, value)]
    assert operator == "EqualTo"
    order_id = sf.seed(status="Draft", activation_status="Pending", activation_error="an earlier failure")
    approved = sf.ok("POST", f"orders/{order_id}/approve")
    order = approved["order"]
    assert order[field] == value
    # The before-save flow's assignments, as written.
    for item in (i for a in children(before_save, "assignments") for i in children(a, "assignmentItems")):
        target = (child(item, "assignToReference") or "").removeprefix("$Record.")
        literal = child(item.find(MD + "value"), "stringValue")
        expected = None if literal is None else literal  # $GlobalConstant.EmptyString is stored as null
        assert order[target] == expected, target
    # The after-save flow's event: its object, OrderId__c the Order's Id, IdemKey__c the formula's value.
    creates = {child(c, "object"): c for c in children(after_save, "recordCreates")}
    assert DEFAULT_PROVISION_EVENT in creates
    (event,) = approved["events"]
    assert event["channel"] == f"/event/{DEFAULT_PROVISION_EVENT}"
    last_modified = parse_datetime(order["LastModifiedDate"])
    key = evaluate(idem_key_formula(), {"$Record.LastModifiedDate": last_modified})
    assert event["payload"]["OrderId__c"] == order_id
    assert event["payload"]["IdemKey__c"] == key
    assert sorted(approved["flows"]) == ["Order_PublishProvisionRequest", "Order_SetActivatingOnApproval"]
    # Both flows need the change: approving an approved Order starts nothing.
    again = sf.ok("POST", f"orders/{order_id}/approve")
    assert (again["flows"], again["events"]) == ([], [])


def test_a_re_approval_publishes_a_new_key_and_an_inactive_flow_does_not_run(sf: SalesforceDriver) -> None:
    order_id = sf.seed(status="Draft")
    first = sf.ok("POST", f"orders/{order_id}/approve")["events"][0]["payload"]["IdemKey__c"]
    sf.ok("PATCH", f"orders/{order_id}", {"status": "Draft"})
    # The key has a second's resolution: a later approval is a later second.
    time.sleep(1.1)
    second = sf.ok("POST", f"orders/{order_id}/approve")["events"][0]["payload"]["IdemKey__c"]
    assert second != first
    sf.ok("PATCH", f"orders/{order_id}", {"status": "Draft", "activation_status": "Failed"})
    sf.ok("POST", "org", {"inactive_flows": ["Order_PublishProvisionRequest"]})
    third = sf.ok("POST", f"orders/{order_id}/approve")
    assert third["flows"] == ["Order_SetActivatingOnApproval"]
    assert third["events"] == []
    assert third["order"]["Activation_Status__c"] == "Activating"


def test_the_pubsub_schema_carries_the_event_s_declared_fields(sf: SalesforceDriver) -> None:
    stub, md = sf.pubsub_stub(), sf.pubsub_metadata()
    schema_id = stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md).schema_id
    schema = json.loads(stub.GetSchema(pb.SchemaRequest(schema_id=schema_id), metadata=md).schema_json)
    fields = {f["name"]: f for f in schema["fields"]}
    for name, declared in declared_fields(DEFAULT_PROVISION_EVENT).items():
        assert fields[name]["doc"] == f"Data:{declared.type}:{declared.length}"


def test_the_order_model_takes_its_custom_fields_lengths_from_the_project(sf: SalesforceDriver) -> None:
    order_id = sf.seed()
    length = declared_fields("Order")["WHMCS_Order_ID__c"].length
    assert length is not None
    fits = sf.rest(
        "PATCH", f"sobjects/Order/{order_id}", sf.login(), json={"WHMCS_Order_ID__c": "9" * length}
    )
    too_long = sf.rest(
        "PATCH", f"sobjects/Order/{order_id}", sf.login(), json={"WHMCS_Order_ID__c": "9" * (length + 1)}
    )
    assert fits.status_code == 204
    assert too_long.json()[0]["errorCode"] == "STRING_TOO_LONG"
