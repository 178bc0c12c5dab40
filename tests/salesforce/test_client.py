from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs

import pytest
import requests
import urllib3

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import OrderFieldNames, SalesforceClient
from provisioning.salesforce.errors import (
    InvalidSalesforceId,
    OrderNotFound,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceError,
    SalesforceRequestError,
    SalesforceUnavailable,
)

from .fake import API_VERSION, INSTANCE_URL, FakeSalesforce

ORDER_ID = "a0RE000000IJmcNMAT"


def order_record(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "attributes": {"type": "Order"},
        "Id": ORDER_ID,
        "OrderNumber": "00000100",
        "Activation_Status__c": "Activating",
        "Account": {"attributes": {"type": "Account"}, "WHMCS_Client_ID__c": 42.0},
        "BillToContact": {"attributes": {"type": "Contact"}, "Email": "ann@example.com", "FirstName": "Ann"},
        "SIM_Type__c": "eSIM",
        "EID__c": "89049032000000000000000000000001",
        "OrderItems": {
            "totalSize": 2,
            "done": True,
            "records": [
                {"Quantity": 1.0, "Product2": {"WHMCS_Product_ID__c": "7"}},
                {"Quantity": 2.0, "Product2": {"WHMCS_Product_ID__c": 9.0}},
            ],
        },
    }
    record.update(overrides)
    return record


@pytest.fixture
def client(auth: JWTBearerAuth, session: requests.Session, fake: FakeSalesforce) -> SalesforceClient:
    fake.records[ORDER_ID] = order_record()
    return SalesforceClient(auth=auth, session=session, api_version=API_VERSION)


def rest_calls(fake: FakeSalesforce) -> list[str]:
    return [f"{s.method} {s.path}" for s in fake.seen if s.path.startswith("/services/data/")]


def test_fetch_order_reads_the_order_and_its_items_with_one_query(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    order = client.fetch_order(ORDER_ID[:15])
    assert order.id == ORDER_ID
    assert order.order_number == "00000100"
    assert order.activation_status == "Activating"
    assert order.whmcs_client_id == "42"
    assert order.email == "ann@example.com"
    assert order.first_name == "Ann"
    assert order.sim_type == "eSIM"
    assert order.eid == "89049032000000000000000000000001"
    assert [(i.quantity, i.whmcs_product_id) for i in order.items] == [(1, "7"), (2, "9")]
    assert rest_calls(fake) == [f"GET /services/data/v{API_VERSION}/query/"]
    assert client.api_calls == 1


def test_the_query_uses_the_configured_field_names(
    auth: JWTBearerAuth, session: requests.Session, fake: FakeSalesforce
) -> None:
    names = OrderFieldNames(activation_status="Status2__c", whmcs_product_id="Plan__c")
    fake.records[ORDER_ID] = order_record(Status2__c="Activating", Activation_Status__c=None)
    client = SalesforceClient(auth=auth, session=session, api_version=API_VERSION, field_names=names)
    assert client.fetch_order(ORDER_ID).activation_status == "Activating"
    (query,) = [s for s in fake.seen if s.path.endswith("/query/")]
    soql = parse_qs(query.query)["q"][0]
    assert soql.startswith("SELECT Id, OrderNumber, Status2__c, ")
    assert "(SELECT Quantity, Product2.Plan__c FROM OrderItems)" in soql
    assert soql.endswith(f"FROM Order WHERE Id = '{ORDER_ID}'")


def test_field_names_must_be_api_names() -> None:
    with pytest.raises(ValueError, match="not a Salesforce API name"):
        OrderFieldNames(eid="EID__c FROM Account WHERE Id != null --")


def test_field_names_come_from_the_settings() -> None:
    settings = Settings(_env_file=None, sf_field_eid="Chip_EID__c")
    assert OrderFieldNames.from_settings(settings).eid == "Chip_EID__c"


def test_a_client_built_without_settings_has_the_defaults_of_the_settings(
    auth: JWTBearerAuth, session: requests.Session
) -> None:
    defaults = Settings(_env_file=None)
    client = SalesforceClient(auth=auth, session=session)
    assert client.api_version == defaults.sf_api_version
    assert client.field_names == OrderFieldNames.from_settings(defaults)
    assert f"/event/{client.event_object}" == defaults.sf_provision_event_channel


def test_the_order_id_is_validated_before_any_call(client: SalesforceClient, fake: FakeSalesforce) -> None:
    with pytest.raises(InvalidSalesforceId):
        client.fetch_order("801' OR Id != '")
    assert fake.seen == []


def test_an_order_that_does_not_exist_is_order_not_found(client: SalesforceClient) -> None:
    with pytest.raises(OrderNotFound) as caught:
        client.fetch_order("801000000000001")
    assert isinstance(caught.value, PermanentError)


def test_an_order_without_account_contact_or_items_reads_as_empty_values(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    fake.records[ORDER_ID] = order_record(Account=None, BillToContact=None, OrderItems=None)
    order = client.fetch_order(ORDER_ID)
    assert (order.whmcs_client_id, order.email, order.first_name, order.items) == (None, None, None, ())


def test_the_order_repr_shows_no_email_or_name(client: SalesforceClient) -> None:
    text = repr(client.fetch_order(ORDER_ID))
    assert "ann@example.com" not in text
    assert "Ann" not in text


def test_update_order_is_one_patch_of_the_given_fields(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    fields = OrderFieldNames().patch(
        activation_status="Activated", whmcs_order_id="77", activation_error=None, activated_at=when
    )
    client.update_order(ORDER_ID, fields)
    assert rest_calls(fake) == [f"PATCH /services/data/v{API_VERSION}/sobjects/Order/{ORDER_ID}"]
    assert fake.patches == [
        (
            ORDER_ID,
            {
                "Activation_Status__c": "Activated",
                "WHMCS_Order_ID__c": "77",
                "Activation_Error__c": None,
                "Activated_At__c": "2025-01-02T03:04:05.000Z",
            },
        )
    ]


def test_patch_cuts_a_long_activation_error_and_refuses_unknown_fields() -> None:
    names = OrderFieldNames()
    assert len(str(names.patch(activation_error="x" * 1000)["Activation_Error__c"])) == 255
    with pytest.raises(ValueError, match="unknown Order field"):
        names.patch(colour="red")


def test_updating_an_order_that_does_not_exist_is_order_not_found(client: SalesforceClient) -> None:
    with pytest.raises(OrderNotFound):
        client.update_order("801000000000001", {"Activation_Status__c": "Failed"})


def test_publish_event_posts_the_platform_event(client: SalesforceClient, fake: FakeSalesforce) -> None:
    event_id = client.publish_event(ORDER_ID, "k1")
    assert event_id == "e00fake000000001AAA"
    assert fake.events[-1]["payload"] == {"OrderId__c": ORDER_ID, "IdemKey__c": "k1"}
    assert rest_calls(fake) == [f"POST /services/data/v{API_VERSION}/sobjects/OrderProvisionRequested__e/"]


def test_an_expired_session_logs_in_again_once_and_repeats_the_call(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    client.fetch_order(ORDER_ID)
    fake.revoke_tokens()
    assert client.fetch_order(ORDER_ID).id == ORDER_ID
    assert fake.logins == 2
    assert client.api_calls == 3


def test_a_second_401_after_a_fresh_login_is_an_auth_error(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    client.fetch_order(ORDER_ID)
    fake.revoke_tokens()
    fake.rest_script.append(
        (401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
    )
    with pytest.raises(SalesforceAuthError, match="INVALID_SESSION_ID") as caught:
        client.fetch_order(ORDER_ID)
    assert isinstance(caught.value, PermanentError)
    assert fake.logins == 2


@pytest.mark.parametrize(
    ("status", "body", "error", "kind"),
    [
        (
            403,
            [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            SalesforceUnavailable,
            TransientError,
        ),
        (
            400,
            [{"message": "unable to obtain exclusive access", "errorCode": "UNABLE_TO_LOCK_ROW"}],
            SalesforceUnavailable,
            TransientError,
        ),
        (
            503,
            [{"message": "Server unavailable", "errorCode": "SERVER_UNAVAILABLE"}],
            SalesforceUnavailable,
            TransientError,
        ),
        (500, "<html>oops</html>", SalesforceUnavailable, TransientError),
        (
            400,
            [{"message": "invalid id", "errorCode": "MALFORMED_ID", "fields": ["Id"]}],
            SalesforceRequestError,
            PermanentError,
        ),
        (
            400,
            [{"message": "No such column 'Nope__c'", "errorCode": "INVALID_FIELD"}],
            SalesforceRequestError,
            PermanentError,
        ),
        (
            400,
            [{"message": "EID required", "errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "fields": []}],
            SalesforceRequestError,
            PermanentError,
        ),
        (
            403,
            [{"message": "no access", "errorCode": "INSUFFICIENT_ACCESS"}],
            SalesforceRequestError,
            PermanentError,
        ),
    ],
)
def test_salesforce_errors_become_transient_or_permanent_errors_with_their_code(
    client: SalesforceClient,
    fake: FakeSalesforce,
    status: int,
    body: object,
    error: type[SalesforceError],
    kind: type,
) -> None:
    client.fetch_order(ORDER_ID)
    fake.rest_script.append((status, body))
    with pytest.raises(error) as caught:
        client.update_order(ORDER_ID, {"Activation_Status__c": "Activated"})
    assert isinstance(caught.value, kind)
    assert caught.value.status == status
    if isinstance(body, list):
        assert caught.value.error_code == body[0]["errorCode"]
        assert body[0]["message"] in str(caught.value)


@pytest.mark.parametrize(
    "exc",
    [
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
        urllib3.exceptions.ReadTimeoutError(None, "/services/data", "Read timed out."),
    ],
)
def test_connection_errors_and_timeouts_are_transient(
    client: SalesforceClient, fake: FakeSalesforce, exc: Exception
) -> None:
    client.fetch_order(ORDER_ID)
    fake.rest_script.append((0, exc))
    with pytest.raises(SalesforceConnectionError) as caught:
        client.fetch_order(ORDER_ID)
    assert isinstance(caught.value, TransientError)


def test_an_answer_that_is_not_json_is_a_permanent_error_that_says_what_to_check(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    client.fetch_order(ORDER_ID)
    fake.rest_script.append((200, "<html>Sign in to the proxy</html>"))
    with pytest.raises(SalesforceRequestError, match="not JSON") as caught:
        client.fetch_order(ORDER_ID)
    assert isinstance(caught.value, PermanentError)
    assert "SF_LOGIN_URL" in str(caught.value)


def test_every_call_carries_a_timeout(client: SalesforceClient, fake: FakeSalesforce) -> None:
    client.fetch_order(ORDER_ID)
    client.update_order(ORDER_ID, {"Activation_Status__c": "Activated"})
    client.publish_event(ORDER_ID)
    assert all(s.timeout is not None for s in fake.seen)


def test_from_settings_builds_auth_and_client(key_file: object, tmp_path: object) -> None:
    settings = Settings(
        _env_file=None,
        sf_login_url="https://login.fake.test",
        sf_client_id="cid",
        sf_username="u",
        sf_private_key_file=key_file,
        sf_provision_event_channel="/event/Other__e",
        sf_api_version="61.0",
    )
    client = SalesforceClient.from_settings(settings)
    assert client.event_object == "Other__e"
    assert client.api_version == "61.0"
    assert "cid" not in repr(client)
    assert INSTANCE_URL not in repr(client)


def test_the_api_usage_of_the_last_answer_is_kept_on_the_client(
    client: SalesforceClient, fake: FakeSalesforce
) -> None:
    assert client.api_usage() is None
    client.fetch_order(ORDER_ID)
    first = client.api_usage()
    client.update_order(ORDER_ID, {"Activation_Status__c": "Activated"})
    second = client.api_usage()
    # The fake counts every request it has seen (the login included) as used, of 15,000.
    assert first is not None
    assert second is not None
    assert first[1] == second[1] == 15000
    assert second[0] > first[0]


def test_an_error_answer_s_api_usage_is_kept_too(client: SalesforceClient, fake: FakeSalesforce) -> None:
    client.fetch_order(ORDER_ID)
    fake.rest_script.append((400, [{"message": "invalid", "errorCode": "MALFORMED_ID"}]))
    before = client.api_usage()
    with pytest.raises(SalesforceRequestError):
        client.update_order(ORDER_ID, {"Activation_Status__c": "Activated"})
    assert client.api_usage() is not None
    assert client.api_usage() != before


def test_the_fields_the_client_writes_are_exactly_those_the_service_s_patches_name() -> None:
    from tests.salesforce_metadata.project import logical_fields_written

    assert logical_fields_written() == OrderFieldNames.WRITTEN
    with pytest.raises(ValueError, match="to write"):
        OrderFieldNames().patch(sim_type="eSIM")


def test_the_fields_used_are_the_query_s_columns_and_the_patch_s_keys_in_the_org_s_names(
    auth: JWTBearerAuth, session: requests.Session
) -> None:
    names = OrderFieldNames(activation_status="Status2__c", whmcs_client_id="Client__c")
    client = SalesforceClient(auth=auth, session=session, field_names=names)
    used = {(u.sobject, u.name): u for u in client.fields_used()}
    soql = client.order_query(ORDER_ID)
    for sobject, name in used:
        if not name.endswith("Id") or name == "Id":
            assert name in soql or not used[(sobject, name)].reads, name
    status = used[("Order", "Status2__c")]
    assert (status.reads, status.writes, status.setting) == (True, True, "SF_FIELD_ACTIVATION_STATUS")
    assert used[("Account", "Client__c")].setting == "SF_FIELD_WHMCS_CLIENT_ID"
    assert used[("Order", "Activation_Error__c")].reads is False
    assert used[("Order", "Activation_Error__c")].writes is True
    assert used[("Contact", "Email")].logical is None
    assert ("Order", "BillToContactId") in used
