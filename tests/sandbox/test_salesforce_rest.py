"""The simulator's REST API as simple-salesforce (and our client) sees it."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
import requests
from simple_salesforce.api import Salesforce, SFType
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from provisioning.sandbox.salesforce import ids
from provisioning.sandbox.salesforce.driver import SalesforceDriver

# The worker's one query (ARCHITECTURE section 3).
ORDER_QUERY = (
    "SELECT Id, OrderNumber, Activation_Status__c, Account.WHMCS_Client_ID__c, BillToContact.Email, "
    "BillToContact.FirstName, SIM_Type__c, EID__c, "
    "(SELECT Quantity, Product2.WHMCS_Product_ID__c FROM OrderItems) FROM Order WHERE Id = '{id}'"
)
UNKNOWN_ORDER_ID = ids.IdFactory(random.Random(99)).new(ids.PREFIX_ORDER)


def sobject(api: Salesforce, name: str) -> SFType:
    return cast(SFType, getattr(api, name))


def errors(exc: pytest.ExceptionInfo[Any]) -> list[dict[str, Any]]:
    """The Salesforce error array simple-salesforce parsed into the exception."""
    return cast(list[dict[str, Any]], exc.value.content)


@pytest.fixture
def api(sf: SalesforceDriver) -> Salesforce:
    return Salesforce(instance_url=sf.url, session_id=sf.login(), session=sf.session, version=sf.version)


def seed_full(sf: SalesforceDriver) -> str:
    return sf.seed(
        whmcs_client_id="42",
        email="ann@example.com",
        first_name="Ann",
        sim_type="eSIM",
        eid="89049032000000000000000000000026",
        items=[{"quantity": 2, "whmcs_product_id": "7"}, {"quantity": 1, "whmcs_product_id": "8"}],
    )


def test_the_order_query_returns_salesforces_nested_record_shape(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    result = api.query(ORDER_QUERY.format(id=order_id))
    assert result["totalSize"] == 1
    assert result["done"] is True
    record = result["records"][0]
    assert record["attributes"] == {"type": "Order", "url": f"/services/data/v64.0/sobjects/Order/{order_id}"}
    assert record["Id"] == order_id
    assert record["Activation_Status__c"] == "Activating"
    assert record["SIM_Type__c"] == "eSIM"
    assert record["EID__c"] == "89049032000000000000000000000026"
    assert record["Account"]["attributes"]["type"] == "Account"
    assert record["Account"]["WHMCS_Client_ID__c"] == "42"
    assert set(record["Account"]) == {"attributes", "WHMCS_Client_ID__c"}
    assert record["BillToContact"]["Email"] == "ann@example.com"
    assert record["BillToContact"]["FirstName"] == "Ann"
    items = record["OrderItems"]
    assert items["totalSize"] == 2
    assert items["done"] is True
    assert [(i["Quantity"], i["Product2"]["WHMCS_Product_ID__c"]) for i in items["records"]] == [
        (2.0, "7"),
        (1.0, "8"),
    ]
    assert items["records"][0]["attributes"]["type"] == "OrderItem"


def test_a_15_character_id_finds_the_order_and_the_answer_carries_the_18_character_one(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    result = api.query(ORDER_QUERY.format(id=order_id[:15]))
    assert result["records"][0]["Id"] == order_id


def test_an_order_without_items_account_or_contact_has_null_relationships(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = sf.seed(items=[], account=None, contact=None)
    record = api.query(ORDER_QUERY.format(id=order_id))["records"][0]
    assert record["OrderItems"] is None
    assert record["Account"] is None
    assert record["BillToContact"] is None


def test_an_unknown_order_id_gives_no_records(sf: SalesforceDriver, api: Salesforce) -> None:
    assert api.query(ORDER_QUERY.format(id=UNKNOWN_ORDER_ID)) == {"totalSize": 0, "done": True, "records": []}


def test_an_id_that_is_not_an_id_is_an_invalid_query_filter(api: Salesforce) -> None:
    with pytest.raises(SalesforceMalformedRequest) as caught:
        api.query(ORDER_QUERY.format(id="801-not-an-id"))
    assert errors(caught)[0]["errorCode"] == "INVALID_QUERY_FILTER_OPERATOR"
    assert "invalid ID field: 801-not-an-id" in errors(caught)[0]["message"]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("SELECT Id FROM Account", "MALFORMED_QUERY"),
        ("SELECT Id FROM Order WHERE Status = 'Draft' OR Status = 'Activated'", "MALFORMED_QUERY"),
        (
            "SELECT Id FROM Order WHERE LastModifiedDate < '2024-01-01T00:00:00Z'",
            "INVALID_QUERY_FILTER_OPERATOR",
        ),
        ("SELECT Id FROM Order WHERE Activation_Status__c < 'x'", "INVALID_QUERY_FILTER_OPERATOR"),
        ("SELECT Id FROM Order ORDER BY Nope__c", "INVALID_FIELD"),
        ("SELECT Id FROM Order WHERE", "MALFORMED_QUERY"),
        ("SELECT Nope__c FROM Order", "INVALID_FIELD"),
        ("SELECT Account.Nope__c FROM Order", "INVALID_FIELD"),
        ("SELECT Id, (SELECT Id FROM Lines) FROM Order", "INVALID_TYPE"),
    ],
)
def test_queries_outside_the_subset_are_refused_with_salesforce_error_codes(
    api: Salesforce, query: str, code: str
) -> None:
    with pytest.raises(SalesforceMalformedRequest) as caught:
        api.query(query)
    assert errors(caught)[0]["errorCode"] == code


def test_field_names_are_case_insensitive_and_answered_in_api_case(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    query = "select id, account.whmcs_client_id__c from order where ID = '{}' limit 1"
    record = api.query(query.format(order_id))["records"][0]
    assert record["Id"] == order_id
    assert record["Account"]["WHMCS_Client_ID__c"] == "42"


def test_get_returns_the_order_record(sf: SalesforceDriver, api: Salesforce) -> None:
    order_id = seed_full(sf)
    record = sobject(api, "Order").get(order_id)
    assert record["attributes"]["type"] == "Order"
    assert record["Id"] == order_id
    assert record["Activation_Status__c"] == "Activating"
    assert record["AccountId"].startswith("001")


def test_update_answers_204_and_writes_each_field_once(sf: SalesforceDriver, api: Salesforce) -> None:
    order_id = seed_full(sf)
    status = sobject(api, "Order").update(
        order_id,
        {
            "Activation_Status__c": "Activated",
            "WHMCS_Order_ID__c": "1234",
            "ESIM_ICCID__c": "8988303000000000017",
            "Activation_Error__c": None,
            "Activated_At__c": "2024-05-01T10:00:00Z",
        },
    )
    assert status == 204
    order = sf.order(order_id)
    assert order["Activation_Status__c"] == "Activated"
    assert order["WHMCS_Order_ID__c"] == "1234"
    assert order["ESIM_ICCID__c"] == "8988303000000000017"
    assert order["Activated_At__c"] == "2024-05-01T10:00:00.000+0000"
    assert len(order["patches"]) == 1
    assert sobject(api, "Order").get(order_id)["Activated_At__c"] == "2024-05-01T10:00:00.000+0000"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"Nope__c": "x"}, "INVALID_FIELD"),
        ({"OrderNumber": "1"}, "INVALID_FIELD_FOR_INSERT_UPDATE"),
        ({"Activation_Status__c": "Done"}, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"),
        ({"Activation_Error__c": "x" * 256}, "STRING_TOO_LONG"),
        ({"Activated_At__c": "yesterday"}, "JSON_PARSER_ERROR"),
    ],
)
def test_a_bad_update_is_refused_and_changes_nothing(
    sf: SalesforceDriver, api: Salesforce, body: dict[str, Any], code: str
) -> None:
    order_id = seed_full(sf)
    with pytest.raises(SalesforceMalformedRequest) as caught:
        sobject(api, "Order").update(order_id, {"Activation_Status__c": "Failed", **body})
    assert errors(caught)[0]["errorCode"] == code
    order = sf.order(order_id)
    assert order["Activation_Status__c"] == "Activating"
    assert order["patches"] == []


def test_record_ids_in_the_path_are_checked_like_salesforce(sf: SalesforceDriver, api: Salesforce) -> None:
    order_id = seed_full(sf)
    with pytest.raises(SalesforceResourceNotFound) as not_an_id:
        sobject(api, "Order").get("not-an-id")
    assert (
        errors(not_an_id)[0]["message"]
        == "Provided external ID field does not exist or is not accessible: not-an-id"
    )
    with pytest.raises(SalesforceMalformedRequest) as bad_checksum:
        sobject(api, "Order").update(order_id[:15] + "AAA", {"Activation_Status__c": "Failed"})
    assert errors(bad_checksum)[0]["errorCode"] == "MALFORMED_ID"
    account_id = sf.order(order_id)["AccountId"]
    with pytest.raises(SalesforceMalformedRequest) as other_object:
        sobject(api, "Order").get(account_id)
    assert errors(other_object)[0]["errorCode"] == "MALFORMED_ID"
    with pytest.raises(SalesforceResourceNotFound) as unknown_order:
        sobject(api, "Order").get(UNKNOWN_ORDER_ID)
    assert errors(unknown_order) == [
        {"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}
    ]


def test_creating_the_platform_event_publishes_it_on_the_channel(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    result = sobject(api, "OrderProvisionRequested__e").create(
        {"OrderId__c": order_id, "IdemKey__c": "attempt-1"}
    )
    assert result["success"] is True
    assert result["errors"] == []
    assert result["id"].startswith("e00")
    bus = sf.ok("GET", "events")
    [event] = bus["events"]
    assert event["channel"] == "/event/OrderProvisionRequested__e"
    payload = event["data"]["payload"]
    assert payload["OrderId__c"] == order_id
    assert payload["IdemKey__c"] == "attempt-1"
    assert payload["CreatedById"].startswith("005")
    assert payload["CreatedDate"].endswith("Z")
    assert isinstance(event["data"]["event"]["replayId"], int)
    assert bus["channels"]["/event/OrderProvisionRequested__e"]["retained"] == 1


def test_an_event_without_its_required_order_id_is_refused(api: Salesforce) -> None:
    with pytest.raises(SalesforceMalformedRequest) as caught:
        sobject(api, "OrderProvisionRequested__e").create({"IdemKey__c": "k"})
    assert errors(caught)[0]["errorCode"] == "REQUIRED_FIELD_MISSING"


def test_every_answer_carries_the_api_usage_and_calls_are_counted(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    api.query(ORDER_QUERY.format(id=order_id))
    usage = api.api_usage["api-usage"]
    assert (usage.used, usage.total) == (1, 100_000)
    sobject(api, "Order").get(order_id)
    sobject(api, "Order").update(order_id, {"Activation_Status__c": "Activated"})
    sobject(api, "OrderProvisionRequested__e").create({"OrderId__c": order_id})
    missing = sf.rest("GET", "sobjects/Order/not-an-id", sf.login())
    assert missing.headers["Sforce-Limit-Info"] == "api-usage=5/100000"
    calls = sf.calls()
    assert {k: calls[k] for k in ("query", "order_get", "order_patch", "event_publish")} == {
        "query": 1,
        "order_get": 2,
        "order_patch": 1,
        "event_publish": 1,
    }


def test_the_daily_request_limit_refuses_calls_with_request_limit_exceeded(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    sf.ok("POST", "limits", {"api_used": 10, "api_limit": 10})
    with pytest.raises(SalesforceRefusedRequest) as caught:
        sobject(api, "Order").get(order_id)
    assert errors(caught) == [
        {"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}
    ]


def test_an_expired_session_raises_for_a_direct_session_client(sf: SalesforceDriver, api: Salesforce) -> None:
    order_id = seed_full(sf)
    sf.ok("POST", "tokens/revoke")
    with pytest.raises(SalesforceExpiredSession):
        sobject(api, "Order").get(order_id)


def test_injected_errors_use_salesforce_error_arrays(sf: SalesforceDriver, api: Salesforce) -> None:
    order_id = seed_full(sf)
    sf.ok("POST", "faults", {"error_rate": 1.0, "error_status": 200, "operations": ["order_patch"]})
    with pytest.raises(SalesforceMalformedRequest) as locked:
        sobject(api, "Order").update(order_id, {"Activation_Status__c": "Activated"})
    assert errors(locked)[0]["errorCode"] == "UNABLE_TO_LOCK_ROW"
    sf.ok("POST", "faults", {"error_rate": 1.0, "error_status": 503, "operations": ["query"]})
    response = sf.rest("GET", "query", sf.login(), params={"q": ORDER_QUERY.format(id=order_id)})
    assert response.status_code == 503
    assert response.json()[0]["errorCode"] == "SERVER_UNAVAILABLE"
    assert sf.order(order_id)["patches"] == []


def test_an_ambiguous_patch_failure_applies_the_update_exactly_once(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    order_id = seed_full(sf)
    sf.ok("POST", "faults", {"force": {"order_patch": ["ambiguous"]}})
    with pytest.raises(requests.ConnectionError):
        sobject(api, "Order").update(
            order_id, {"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": "77"}
        )
    order = sf.order(order_id)
    assert order["Activation_Status__c"] == "Activated"
    assert [p["fields"] for p in order["patches"]] == [
        {"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": "77"}
    ]
    assert sf.ok("GET", "calls")["injected"] == {"order_patch:ambiguous": 1}


def test_admin_can_set_fields_without_counting_an_api_call(sf: SalesforceDriver) -> None:
    order_id = seed_full(sf)
    view = sf.ok(
        "PATCH", f"orders/{order_id}", {"activation_status": "Failed", "Activation_Error__c": "card declined"}
    )
    assert view["Activation_Status__c"] == "Failed"
    assert view["Activation_Error__c"] == "card declined"
    assert view["patches"][0]["source"] == "admin"
    assert sf.ok("GET", "limits")["api_used"] == 0
    assert sf.admin("POST", "orders", {"colour": "red"}).status_code == 400
    listed = sf.ok("GET", "orders")["orders"]
    assert [o["Id"] for o in listed] == [order_id]


def test_the_backfill_query_finds_activating_orders_modified_before_a_time_oldest_first(
    sf: SalesforceDriver, api: Salesforce
) -> None:
    waiting = [sf.seed(activation_status="Activating") for _ in range(3)]
    sf.seed(activation_status="Activated")
    sf.ok("PATCH", f"orders/{waiting[0]}", {"activation_status": "Activating"})
    query = (
        "SELECT Id, LastModifiedDate FROM Order WHERE Activation_Status__c = 'Activating' "
        "AND LastModifiedDate < {} ORDER BY LastModifiedDate LIMIT 10"
    )
    found = api.query(query.format("2999-01-01T00:00:00Z"))
    # The one modified last (the PATCH) comes last; the Activated Order is not there.
    assert [r["Id"] for r in found["records"]] == [waiting[1], waiting[2], waiting[0]]
    assert api.query(query.format("2000-01-01T00:00:00Z"))["records"] == []


def test_a_large_answer_comes_in_pages_behind_next_records_url(sf: SalesforceDriver, api: Salesforce) -> None:
    sf.ok("POST", "limits", {"query_page_size": 2})
    seeded = [sf.seed() for _ in range(5)]
    first = api.query("SELECT Id FROM Order")
    assert first["totalSize"] == 5
    assert first["done"] is False
    assert len(first["records"]) == 2
    every = list(api.query_all_iter("SELECT Id FROM Order"))
    assert sorted(r["Id"] for r in every) == sorted(seeded)
    calls = sf.calls()
    assert calls["query"] == 2
    assert calls["query_more"] == 2  # pages 2 and 3 of the second query, one API call each
