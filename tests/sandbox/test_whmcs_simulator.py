"""The WHMCS simulator's External API contract, driven with plain requests over HTTPS."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from provisioning.core.http import make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.whmcs import TRANSIENT_DB_ERROR, WhmcsSimulator


class Whmcs:
    def __init__(self, sim: WhmcsSimulator, thread: ServerThread, session: requests.Session) -> None:
        self.sim, self.thread, self.session = sim, thread, session
        self.base = thread.url("whmcs")

    def raw(self, fields: dict[str, str], *, auth: bool = True) -> requests.Response:
        data = ({"identifier": self.sim.identifier, "secret": self.sim.secret} if auth else {}) | fields
        return self.session.post(f"{self.base}/includes/api.php", data=data, timeout=5)

    def api(self, action: str, **fields: str) -> dict[str, Any]:
        response = self.raw({"action": action, "responsetype": "json", **fields})
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        return response.json()  # type: ignore[no-any-return]

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> requests.Response:
        return self.session.request(
            method, f"{self.base}/__admin/{path}", json=body, params=params, timeout=5
        )

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        response = self.admin(method, path, body, **params)
        assert response.status_code == 200, response.text
        return response.json()

    def add_order(self, client_id: int | str = 1, notes: str = "", **fields: str) -> dict[str, Any]:
        base = {
            "clientid": str(client_id),
            "paymentmethod": "stripe",
            "pid[0]": "10",
            "qty[0]": "1",
            "notes": notes,
        }
        return self.api("AddOrder", **(base | fields))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("whmcs-tls"))


def start(tls: SandboxTLS, **options: Any) -> tuple[Whmcs, ServerThread]:
    sim = WhmcsSimulator(seed=7, **options)
    thread = ServerThread(ssl_context=tls.server_context)
    thread.add_app("whmcs", sim.build_app())
    thread.start()
    whmcs = Whmcs(sim, thread, make_session(tls.ca_bundle))
    whmcs.ok(
        "POST",
        "products",
        [{"pid": 10, "name": "eSIM 10 GB", "price": "12.50"}, {"pid": 11, "name": "Free SIM", "price": 0}],
    )
    whmcs.ok(
        "POST",
        "clients",
        [
            {
                "id": 1,
                "firstname": "Ada",
                "lastname": "L",
                "email": "ada@example.com",
                "paymethods": [{"type": "CreditCard", "expiry_date": "12/30"}],
            },
            {"id": 2, "firstname": "Bob", "lastname": "B", "email": "bob@example.com", "status": "Closed"},
            {
                "id": 3,
                "firstname": "Cy",
                "lastname": "C",
                "email": "cy@example.com",
                "status": "Inactive",
                "paymethods": [{"type": "BankAccount"}],
            },
        ],
    )
    return whmcs, thread


@pytest.fixture
def whmcs(tls: SandboxTLS) -> Iterator[Whmcs]:
    whmcs, thread = start(tls)
    yield whmcs
    whmcs.session.close()
    thread.stop()


@pytest.fixture
def quick_ban_whmcs(tls: SandboxTLS) -> Iterator[Whmcs]:
    whmcs, thread = start(tls, ban_s=0.3)
    yield whmcs
    whmcs.session.close()
    thread.stop()


# -- transport and envelope ---------------------------------------------------------------------


def test_the_action_name_ignores_case_and_punctuation(whmcs: Whmcs) -> None:
    for spelling in ("GetClientsDetails", "getclientsdetails", "GET-clients_details"):
        assert whmcs.api(spelling, clientid="1")["result"] == "success"
    assert whmcs.api("GetClientsData", clientid="1")["id"] == 1  # legacy alias


def test_errors_come_at_http_200_in_the_envelope(whmcs: Whmcs) -> None:
    answer = whmcs.api("GetClientsDetails", clientid="999")
    assert answer == {"result": "error", "message": "Client Not Found"}


def test_an_unknown_action_is_named_in_the_error(whmcs: Whmcs) -> None:
    answer = whmcs.api("Do-Magic")
    assert answer == {"result": "error", "message": 'Invalid API Action: "domagic" is not a valid API action'}


def test_without_responsetype_a_plain_action_answers_nvp(whmcs: Whmcs) -> None:
    response = whmcs.raw({"action": "AcceptOrder", "orderid": "404"})
    assert response.status_code == 200
    assert response.text == "result=error;message=Order ID not found or Status not Pending"
    details = whmcs.raw({"action": "GetClientsDetails", "clientid": "1"}).text
    assert details.startswith("result=success;userid=1;")
    assert ";status=Active;" in details
    assert "client=" not in details  # the nested copy is only for structured formats


def test_without_responsetype_a_list_action_answers_xml(whmcs: Whmcs) -> None:
    whmcs.add_order(notes="run-1")
    response = whmcs.raw({"action": "GetOrders"})
    root = ET.fromstring(response.content)  # noqa: S314 (our own simulator's answer)
    assert root.tag == "whmcsapi"
    assert root.findtext("action") == "getorders"
    assert root.findtext("result") == "success"
    assert [o.findtext("notes") for o in root.iter("order")] == ["run-1"]


def test_a_list_action_refuses_nvp_and_unknown_formats_are_named(whmcs: Whmcs) -> None:
    nvp = whmcs.raw({"action": "GetOrders", "responsetype": "nvp"}).text
    assert nvp == "result=error;message=This API action only supports the XML or JSON response type formats"
    odd = whmcs.raw({"action": "GetOrders", "responsetype": "yaml"}).text
    assert (
        odd
        == 'result=error;message=Unsupported API response type format "yaml". Supported formats include: json, xml, nvp'
    )


# -- authentication and bans --------------------------------------------------------------------


def test_missing_or_unknown_credentials_are_refused_without_counting_a_failure(whmcs: Whmcs) -> None:
    assert whmcs.raw({"action": "GetOrders", "responsetype": "json"}, auth=False).json()["message"] == (
        "Invalid or missing credentials"
    )
    for _ in range(4):
        answer = whmcs.raw(
            {"action": "GetOrders", "responsetype": "json", "identifier": "nobody", "secret": "x"}, auth=False
        )
        assert answer.json() == {"result": "error", "message": "Invalid or missing credentials"}
    assert whmcs.ok("GET", "access")["banned"] == {}
    assert whmcs.api("GetOrders")["result"] == "success"


def test_a_non_ascii_secret_is_just_a_wrong_secret(whmcs: Whmcs) -> None:
    answer = whmcs.raw({"action": "GetOrders", "responsetype": "json", "secret": "geheim-ü"})
    assert answer.json() == {"result": "error", "message": "Authentication Failed"}


def test_three_wrong_secrets_ban_the_ip_even_for_good_credentials(quick_ban_whmcs: Whmcs) -> None:
    whmcs = quick_ban_whmcs
    bad = {"action": "GetOrders", "responsetype": "json", "secret": "wrong"}
    messages = [whmcs.raw(bad).json()["message"] for _ in range(4)]
    assert messages == ["Authentication Failed"] * 3 + ["IP Banned"]
    assert whmcs.api("GetClientsDetails", clientid="1") == {"result": "error", "message": "IP Banned"}
    assert "127.0.0.1" in whmcs.ok("GET", "access")["banned"]
    time.sleep(0.35)  # ban_s=0.3
    assert whmcs.api("GetClientsDetails", clientid="1")["result"] == "success"


def test_the_admin_route_lifts_a_ban(whmcs: Whmcs) -> None:
    for _ in range(3):
        whmcs.raw({"action": "GetOrders", "responsetype": "json", "secret": "wrong"})
    assert whmcs.api("GetOrders")["message"] == "IP Banned"
    assert whmcs.ok("POST", "bans/reset") == {"allowed_ips": None, "banned": {}, "failures": {}}
    assert whmcs.api("GetOrders")["result"] == "success"


def test_an_ip_outside_the_allow_list_is_refused(whmcs: Whmcs) -> None:
    whmcs.ok("POST", "access", {"allowed_ips": ["10.9.8.7"]})
    assert whmcs.api("GetOrders") == {"result": "error", "message": "Invalid IP 127.0.0.1"}
    whmcs.ok("POST", "access", {"allowed_ips": None})
    assert whmcs.api("GetOrders")["result"] == "success"


# -- clients and pay methods ----------------------------------------------------------------------


def test_client_details_are_flat_and_nested_with_their_status(whmcs: Whmcs) -> None:
    answer = whmcs.api("GetClientsDetails", clientid="3")
    assert answer["result"] == "success"
    assert (answer["id"], answer["status"], answer["email"]) == (3, "Inactive", "cy@example.com")
    assert answer["client"]["status"] == "Inactive"
    assert answer["client"]["id"] == 3
    assert whmcs.api("GetClientsDetails", email="ADA@example.com")["id"] == 1
    assert whmcs.api("GetClientsDetails")["message"] == "Either clientid Or email Is Required"


def test_pay_methods_are_listed_and_filtered_by_type(whmcs: Whmcs) -> None:
    answer = whmcs.api("GetPayMethods", clientid="1")
    assert answer["clientid"] == "1"
    [card] = answer["paymethods"]
    assert card["type"] == "CreditCard"
    assert card["expiry_date"] == "12/30"
    assert {"id", "description", "gateway_name", "card_last_four", "card_type", "last_updated"} <= set(card)
    assert whmcs.api("GetPayMethods", clientid="1", type="BankAccount")["paymethods"] == []
    assert (
        whmcs.api("GetPayMethods", clientid="3", type="bankaccount")["paymethods"][0]["type"] == "BankAccount"
    )
    assert whmcs.api("GetPayMethods", clientid="2")["paymethods"] == []


def test_pay_method_errors_use_the_real_messages(whmcs: Whmcs) -> None:
    assert whmcs.api("GetPayMethods", clientid="999")["message"] == "Client Not Found"
    assert whmcs.api("GetPayMethods")["message"] == "Client ID Is Required"
    assert whmcs.api("GetPayMethods", clientid="1", type="Cash")["message"] == (
        "Invalid Pay Method Type. Should be 'BankAccount' or 'CreditCard'"
    )


def test_the_admin_routes_fix_a_client(whmcs: Whmcs) -> None:
    assert whmcs.add_order(client_id=2)["message"] == "Unable to add order when client status is Closed"
    client = whmcs.ok("PATCH", "clients/2", {"status": "Active", "add_paymethods": [{"type": "CreditCard"}]})
    assert client["status"] == "Active"
    assert len(client["paymethods"]) == 1
    pm = whmcs.ok("POST", "clients/2/paymethods", {"type": "RemoteBankAccount", "bank_name": "X"})
    assert [p["id"] for p in whmcs.api("GetPayMethods", clientid="2")["paymethods"]][-1] == pm["id"]
    assert whmcs.add_order(client_id=2)["result"] == "success"
    assert whmcs.admin("PATCH", "clients/77", {"status": "Active"}).status_code == 404
    assert whmcs.admin("PATCH", "clients/2", {"status": "Sleeping"}).status_code == 400


# -- orders ---------------------------------------------------------------------------------------


def test_add_order_answers_ids_as_strings_and_creates_services_and_an_invoice(whmcs: Whmcs) -> None:
    answer = whmcs.add_order(notes="run-A", **{"pid[1]": "11", "qty[0]": "2"})
    assert answer["result"] == "success"
    assert all(isinstance(answer[k], str) for k in ("orderid", "serviceids", "productids", "invoiceid"))
    assert len(answer["serviceids"].split(",")) == 3  # 2 x pid 10, 1 x pid 11
    [order] = whmcs.ok("GET", "orders")["orders"]
    assert order["notes"] == "run-A"
    assert order["status"] == "Pending"
    assert order["amount"] == "25.00"
    assert order["flags"] == {"noemail": False, "noinvoiceemail": False}
    [invoice] = whmcs.ok("GET", "invoices")["invoices"]
    assert (invoice["id"], invoice["status"], invoice["total"]) == (
        int(answer["invoiceid"]),
        "Unpaid",
        "25.00",
    )


def test_add_order_flags_follow_php_truthiness(whmcs: Whmcs) -> None:
    answer = whmcs.add_order(noinvoice="0", noemail="false", noinvoiceemail="1")
    assert "invoiceid" in answer  # "0" is false
    assert whmcs.ok("GET", "orders")["orders"][0]["flags"] == {"noemail": True, "noinvoiceemail": True}
    assert "invoiceid" not in whmcs.add_order(noinvoice="1")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clientid": "999"}, "Client ID Not Found"),
        ({"clientid": "2"}, "Unable to add order when client status is Closed"),
        (
            {"paymentmethod": "cash"},
            "Invalid Payment Method. Valid options include banktransfer,mailin,paypal,stripe",
        ),
        ({"pid[0]": ""}, "No items added to cart so order cannot proceed"),
        ({"pid[0]": "404"}, "No items remain in the cart. Order cannot proceed."),
    ],
)
def test_add_order_errors_use_the_real_messages(whmcs: Whmcs, fields: dict[str, str], message: str) -> None:
    assert whmcs.add_order(**fields) == {"result": "error", "message": message}
    assert whmcs.ok("GET", "orders")["count"] == 0


def test_an_inactive_client_may_still_order(whmcs: Whmcs) -> None:
    assert whmcs.add_order(client_id=3)["result"] == "success"


def test_accept_order_only_works_once_from_pending(whmcs: Whmcs) -> None:
    order_id = whmcs.add_order()["orderid"]
    assert whmcs.api("AcceptOrder", orderid=order_id, autosetup="1", sendemail="0") == {"result": "success"}
    again = whmcs.api("AcceptOrder", orderid=order_id)
    assert again == {"result": "error", "message": "Order ID not found or Status not Pending"}
    [order] = whmcs.ok("GET", "orders")["orders"]
    assert order["status"] == "Active"
    assert order["accepted"] == {"autosetup": True, "sendemail": False}
    assert {s["status"] for s in order["services"]} == {"Active"}


def test_get_orders_is_newest_first_with_paging_and_filters(whmcs: Whmcs) -> None:
    ids = [whmcs.add_order(client_id=1 if i < 3 else 3, notes=f"n{i}")["orderid"] for i in range(4)]
    whmcs.api("AcceptOrder", orderid=ids[0])
    page = whmcs.api("GetOrders", userid="1", limitstart="1", limitnum="1")
    assert (page["totalresults"], page["startnumber"], page["numreturned"]) == ("3", 1, 1)
    assert [o["id"] for o in page["orders"]["order"]] == [ids[1]]
    every = whmcs.api("GetOrders")["orders"]["order"]
    assert [o["id"] for o in every] == ids[::-1]
    active = whmcs.api("GetOrders", status="active")["orders"]["order"]
    assert [(o["id"], o["status"]) for o in active] == [(ids[0], "Active")]
    order = whmcs.api("GetOrders", id=ids[2])["orders"]["order"][0]
    assert order["notes"] == "n2"
    assert order["paymentstatus"] == "Unpaid"
    assert [item["type"] for item in order["lineitems"]["lineitem"]] == ["product"]


def test_get_orders_without_a_match_has_no_orders_key(whmcs: Whmcs) -> None:
    answer = whmcs.api("GetOrders", userid="1")
    assert answer == {"result": "success", "totalresults": "0", "startnumber": 0, "numreturned": 0}


# -- invoices -------------------------------------------------------------------------------------


def test_get_invoice_reports_status_and_balance(whmcs: Whmcs) -> None:
    invoice_id = whmcs.add_order()["invoiceid"]
    unpaid = whmcs.api("GetInvoice", invoiceid=invoice_id)
    assert (unpaid["status"], unpaid["total"], unpaid["balance"], unpaid["datepaid"]) == (
        "Unpaid",
        "12.50",
        "12.50",
        "0000-00-00 00:00:00",
    )
    assert unpaid["transactions"] == ""
    whmcs.ok("POST", f"invoices/{invoice_id}/pay")
    paid = whmcs.api("GetInvoice", invoiceid=invoice_id)
    assert (paid["status"], paid["balance"]) == ("Paid", "0.00")
    assert len(paid["transactions"]["transaction"]) == 1


def test_a_free_order_gets_a_paid_invoice(whmcs: Whmcs) -> None:
    invoice_id = whmcs.add_order(**{"pid[0]": "11"})["invoiceid"]
    assert whmcs.api("GetInvoice", invoiceid=invoice_id)["status"] == "Paid"


def test_an_unknown_invoice_uses_the_status_key_quirk(whmcs: Whmcs) -> None:
    assert whmcs.api("GetInvoice", invoiceid="404") == {"status": "error", "message": "Invoice ID Not Found"}


# -- faults ---------------------------------------------------------------------------------------


def test_an_injected_server_error_is_an_html_page(whmcs: Whmcs) -> None:
    whmcs.ok("POST", "faults", {"error_status": 503, "force": {"GetOrders": ["error"]}})
    response = whmcs.raw({"action": "GetOrders", "responsetype": "json"})
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Service Unavailable" in response.text
    assert whmcs.api("GetOrders")["result"] == "success"


def test_an_injected_error_at_200_is_a_database_error_envelope(whmcs: Whmcs) -> None:
    whmcs.ok("POST", "faults", {"error_status": 200, "force": {"AddOrder": ["error"]}})
    assert whmcs.add_order() == {"result": "error", "message": TRANSIENT_DB_ERROR}
    assert whmcs.ok("GET", "orders")["count"] == 0


def test_an_ambiguous_add_order_applies_the_order_and_drops_the_answer(whmcs: Whmcs) -> None:
    whmcs.ok("POST", "faults", {"force": {"AddOrder": ["ambiguous"]}})
    with pytest.raises(requests.ConnectionError):
        whmcs.add_order(notes="lost-answer")
    assert [o["notes"] for o in whmcs.ok("GET", "orders")["orders"]] == ["lost-answer"]


def test_calls_are_counted_under_the_canonical_action_name(whmcs: Whmcs) -> None:
    whmcs.ok("POST", "calls/reset")
    whmcs.api("getorders")
    whmcs.api("GET_ORDERS")
    whmcs.add_order()
    assert whmcs.ok("GET", "calls")["calls"] == {"GetOrders": 2, "AddOrder": 1}


def test_the_reset_route_forgets_the_data_but_not_the_credentials(whmcs: Whmcs) -> None:
    whmcs.add_order()
    whmcs.ok("POST", "reset")
    assert whmcs.ok("GET", "orders")["count"] == 0
    assert whmcs.ok("GET", "clients")["clients"] == []
    assert whmcs.api("GetOrders")["totalresults"] == "0"


def test_credentials_are_random_unless_given_and_env_names_them() -> None:
    first, second = WhmcsSimulator(), WhmcsSimulator()
    assert first.secret != second.secret
    assert len(first.secret) >= 24
    fixed = WhmcsSimulator(identifier="id", secret="s3")
    assert fixed.env("https://127.0.0.1:1") == {
        "WHMCS_URL": "https://127.0.0.1:1",
        "WHMCS_IDENTIFIER": "id",
        "WHMCS_SECRET": "s3",
    }


# -- cancelling: CancelOrder of a Pending order, ModuleTerminate of an accepted one's services ----------


def test_cancel_order_cancels_a_pending_order_its_services_and_invoice_and_only_once(whmcs: Whmcs) -> None:
    order_id = whmcs.add_order()["orderid"]
    assert whmcs.api("CancelOrder", orderid=order_id, noemail="1") == {"result": "success"}
    again = whmcs.api("CancelOrder", orderid=order_id)
    assert again == {"result": "error", "message": "Order ID not found or Status not Pending"}
    (order,) = whmcs.ok("GET", "orders")["orders"]
    assert (order["status"], order["cancelled"]) == ("Cancelled", {"noemail": True})
    assert {s["status"] for s in order["services"]} == {"Cancelled"}
    assert {i["status"] for i in whmcs.ok("GET", "invoices")["invoices"]} == {"Cancelled"}


def test_an_accepted_order_cannot_be_cancelled_and_its_services_are_terminated_once_each(
    whmcs: Whmcs,
) -> None:
    added = whmcs.add_order(**{"pid[1]": "11", "qty[1]": "1"})
    whmcs.api("AcceptOrder", orderid=added["orderid"])
    refused = whmcs.api("CancelOrder", orderid=added["orderid"])
    assert refused["message"] == "Order ID not found or Status not Pending"
    service_ids = [int(s) for s in added["serviceids"].split(",")]
    for service_id in service_ids:
        assert whmcs.api("ModuleTerminate", serviceid=str(service_id)) == {"result": "success"}
    repeat = whmcs.api("ModuleTerminate", serviceid=str(service_ids[0]))
    assert repeat["message"] == "Module command failed: the service is Terminated, not Active or Suspended"
    assert whmcs.api("ModuleTerminate", serviceid="999")["message"] == "Service ID not found"
    assert whmcs.api("ModuleTerminate")["message"] == "Service ID is required"
    assert whmcs.ok("GET", "terminations") == {"count": 2, "service_ids": service_ids}
    (order,) = whmcs.ok("GET", "orders")["orders"]
    assert {s["status"] for s in order["services"]} == {"Terminated"}
