"""WhmcsClient against the real WHMCS simulator over TLS, plus a few transport-level cases."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
import urllib3
from pydantic import SecretStr
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.http import make_pool
from provisioning.core.settings import ConfigError, Settings
from provisioning.whmcs.client import PayMethod, WhmcsClient, note_matches
from provisioning.whmcs.errors import (
    WhmcsAuthError,
    WhmcsClientNotFound,
    WhmcsError,
    WhmcsOrderNotPending,
    WhmcsPermanentError,
    WhmcsTransientError,
)

from .conftest import WhmcsSandbox

ACTIVE_CLIENT = 1
CLOSED_CLIENT = 2
PRODUCT = 10


def seeded(box: WhmcsSandbox) -> WhmcsSandbox:
    box.admin("POST", "products", [{"pid": PRODUCT, "name": "eSIM 10 GB", "price": "12.50"}])
    box.admin(
        "POST",
        "clients",
        [
            {
                "id": ACTIVE_CLIENT,
                "firstname": "Ada",
                "lastname": "L",
                "email": "ada@example.com",
                "paymethods": [
                    {"type": "CreditCard", "expiry_date": "01/20", "description": "old card"},
                    {"type": "RemoteCreditCard", "expiry_date": "12/39", "card_last_four": "4242"},
                    {"type": "BankAccount", "bank_name": "Sandbox Bank"},
                ],
            },
            {
                "id": CLOSED_CLIENT,
                "firstname": "Bob",
                "lastname": "B",
                "email": "bob@example.com",
                "status": "Closed",
            },
        ],
    )
    box.admin("POST", "calls/reset")
    return box


@pytest.fixture
def whmcs(start_whmcs: Callable[..., WhmcsSandbox]) -> WhmcsSandbox:
    return seeded(start_whmcs())


def place(client: WhmcsClient, note: str = "run-1", qty: int = 1) -> int:
    return client.add_order(
        client_id=ACTIVE_CLIENT, payment_method="stripe", items=[(PRODUCT, qty)], notes=note
    ).order_id


# -- actions ------------------------------------------------------------------------------------


def test_get_client_reads_the_status(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    details = client.get_client(ACTIVE_CLIENT)
    assert (details.id, details.status) == (ACTIVE_CLIENT, "Active")
    assert client.get_client(CLOSED_CLIENT).status == "Closed"


def test_an_unknown_client_is_client_not_found(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    with pytest.raises(WhmcsClientNotFound, match="Client Not Found") as caught:
        client.get_client(999)
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(WhmcsClientNotFound):
        client.get_pay_methods(999)


def test_pay_methods_come_typed_and_filtered(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    methods = client.get_pay_methods(ACTIVE_CLIENT)
    assert [m.type for m in methods] == ["CreditCard", "RemoteCreditCard", "BankAccount"]
    old, current, bank = methods
    assert old.is_expired(date(2025, 6, 1))
    assert not current.is_expired(date(2025, 6, 1))
    assert not bank.is_expired(date(2025, 6, 1))
    assert current.card_last_four == "4242"
    assert [m.type for m in client.get_pay_methods(ACTIVE_CLIENT, kind="BankAccount")] == ["BankAccount"]
    assert client.get_pay_methods(CLOSED_CLIENT) == []


def test_add_order_coerces_ids_and_turns_the_emails_off(whmcs: WhmcsSandbox) -> None:
    result = whmcs.client().add_order(
        client_id=ACTIVE_CLIENT, payment_method="stripe", items=[(PRODUCT, 2)], notes="run-7"
    )
    [order] = whmcs.orders()
    assert result.order_id == order["id"]
    assert result.service_ids == [s["id"] for s in order["services"]]
    assert len(result.service_ids) == 2
    assert result.invoice_id == order["invoiceid"]
    assert order["notes"] == "run-7"
    assert order["flags"] == {"noemail": True, "noinvoiceemail": True}


@pytest.mark.parametrize(
    ("client_id", "payment_method", "pid", "error", "message"),
    [
        (999, "stripe", PRODUCT, WhmcsClientNotFound, "Client ID Not Found"),
        (
            CLOSED_CLIENT,
            "stripe",
            PRODUCT,
            WhmcsPermanentError,
            "Unable to add order when client status is Closed",
        ),
        (
            ACTIVE_CLIENT,
            "cash",
            PRODUCT,
            WhmcsPermanentError,
            "Invalid Payment Method. Valid options include",
        ),
        (ACTIVE_CLIENT, "stripe", 404, WhmcsPermanentError, "No items remain in the cart"),
    ],
)
def test_add_order_refusals_are_permanent(
    whmcs: WhmcsSandbox, client_id: int, payment_method: str, pid: int, error: type[WhmcsError], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        whmcs.client().add_order(
            client_id=client_id, payment_method=payment_method, items=[(pid, 1)], notes="n"
        )
    assert type(caught.value) is error
    assert caught.value.api_message is not None
    assert caught.value.api_message.startswith(message)
    assert whmcs.orders() == []


def test_add_order_without_items_is_refused_before_calling(whmcs: WhmcsSandbox) -> None:
    with pytest.raises(ValueError, match="at least one"):
        whmcs.client().add_order(client_id=ACTIVE_CLIENT, payment_method="stripe", items=[], notes="n")
    assert whmcs.calls("AddOrder") == 0


def test_accept_order_activates_and_a_repeat_is_order_not_pending(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    order_id = place(client)
    client.accept_order(order_id)
    [order] = whmcs.orders()
    assert order["accepted"] == {"autosetup": True, "sendemail": False}
    with pytest.raises(WhmcsOrderNotPending):
        client.accept_order(order_id)
    [confirmed] = client.get_orders(order_id=order_id)
    assert confirmed.status == "Active"


def test_get_orders_filters_pages_and_coerces(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    ids = [place(client, note=f"run-{i}") for i in range(3)]
    client.accept_order(ids[0])
    orders = client.get_orders(client_id=ACTIVE_CLIENT)
    assert [o.id for o in orders] == ids[::-1]
    newest = orders[0]
    assert (newest.user_id, newest.status, newest.payment_status, newest.notes) == (
        ACTIVE_CLIENT,
        "Pending",
        "Unpaid",
        "run-2",
    )
    assert newest.amount == Decimal("12.50")
    assert newest.invoice_id is not None
    assert len(newest.service_ids) == 1
    assert [o.id for o in client.get_orders(client_id=ACTIVE_CLIENT, limit=1, offset=1)] == [ids[1]]
    assert [o.id for o in client.get_orders(status="Active")] == [ids[0]]
    assert client.get_orders(client_id=CLOSED_CLIENT) == []
    assert client.get_orders(order_id=999) == []


def test_find_order_by_note_pages_back_to_an_older_order(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    wanted = place(client, note="provisioning run 801xx:key-1")
    for i in range(4):
        place(client, note=f"provisioning run 801xx:key-1{i}")
    whmcs.admin("POST", "calls/reset")
    found = client.find_order_by_note(ACTIVE_CLIENT, "801xx:key-1", page_size=2)
    assert found is not None
    assert found.id == wanted
    assert whmcs.calls("GetOrders") == 3
    assert client.find_order_by_note(ACTIVE_CLIENT, "801xx:key-9", page_size=2) is None
    assert client.find_order_by_note(CLOSED_CLIENT, "801xx:key-1") is None


def test_note_matching_needs_the_whole_note() -> None:
    assert note_matches("run 801:a", "801:a")
    assert note_matches("801:a\nsecond line", "801:a")
    assert not note_matches("run 801:ab", "801:a")
    assert not note_matches("run x801:a", "801:a")


# -- auth ---------------------------------------------------------------------------------------


def test_a_wrong_secret_is_an_auth_error_tried_once(whmcs: WhmcsSandbox) -> None:
    with pytest.raises(WhmcsAuthError, match="Authentication Failed") as caught:
        whmcs.client(secret="not-the-secret").get_orders()
    assert isinstance(caught.value, PermanentError)
    assert whmcs.calls("GetOrders") == 1


def test_an_unknown_identifier_is_an_auth_error(whmcs: WhmcsSandbox) -> None:
    with pytest.raises(WhmcsAuthError, match="Invalid or missing credentials"):
        whmcs.client(identifier="someone-else").get_client(ACTIVE_CLIENT)


def test_three_bad_logins_ban_the_ip_and_the_client_never_retries(
    start_whmcs: Callable[..., WhmcsSandbox],
) -> None:
    whmcs = seeded(start_whmcs(ban_s=60.0))
    bad = whmcs.client(secret="not-the-secret")
    messages = []
    for _ in range(3):
        with pytest.raises(WhmcsAuthError) as caught:
            bad.get_client(ACTIVE_CLIENT)
        messages.append(caught.value.api_message)
    assert messages == ["Authentication Failed"] * 3
    assert whmcs.calls("GetClientsDetails") == 3
    with pytest.raises(WhmcsAuthError, match="IP Banned"):
        whmcs.client().get_client(ACTIVE_CLIENT)
    assert whmcs.calls("GetClientsDetails") == 4


def test_an_ip_outside_the_allow_list_is_an_auth_error(whmcs: WhmcsSandbox) -> None:
    whmcs.admin("POST", "access", {"allowed_ips": ["192.0.2.1"]})
    with pytest.raises(WhmcsAuthError, match=r"Invalid IP 127\.0\.0\.1"):
        whmcs.client().get_orders()


# -- faults -------------------------------------------------------------------------------------


def test_an_ambiguous_add_order_applies_exactly_one_order_which_the_note_finds(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    whmcs.admin("POST", "faults", {"force": {"AddOrder": ["ambiguous"]}})
    with pytest.raises(WhmcsTransientError) as caught:
        place(client, note="run 801amb:default")
    assert isinstance(caught.value, TransientError)
    assert whmcs.calls("AddOrder") == 1  # a write is never resent after the request went out
    [order] = whmcs.orders()
    found = client.find_order_by_note(ACTIVE_CLIENT, "801amb:default")
    assert found is not None
    assert found.id == order["id"]
    assert found.status == "Pending"


def test_a_reset_add_order_is_transient_and_not_resent(whmcs: WhmcsSandbox) -> None:
    whmcs.admin("POST", "faults", {"force": {"AddOrder": ["reset"]}})
    with pytest.raises(WhmcsTransientError, match="connection failed"):
        place(whmcs.client())
    assert whmcs.calls("AddOrder") == 1
    assert whmcs.orders() == []


def test_a_read_is_resent_once_after_a_dropped_connection(whmcs: WhmcsSandbox) -> None:
    client = whmcs.client()
    whmcs.admin("POST", "faults", {"force": {"GetClientsDetails": ["reset"]}})
    assert client.get_client(ACTIVE_CLIENT).id == ACTIVE_CLIENT
    assert whmcs.calls("GetClientsDetails") == 2
    whmcs.admin("POST", "faults", {"force": {"GetClientsDetails": ["reset", "reset"]}})
    with pytest.raises(WhmcsTransientError):
        client.get_client(ACTIVE_CLIENT)
    assert whmcs.calls("GetClientsDetails") == 4


@pytest.mark.parametrize("status", [503, 429, 500])
def test_an_http_error_status_is_transient(whmcs: WhmcsSandbox, status: int) -> None:
    whmcs.admin("POST", "faults", {"error_status": status, "force": {"GetOrders": ["error"]}})
    with pytest.raises(WhmcsTransientError, match=f"HTTP {status}") as caught:
        whmcs.client().get_orders()
    assert caught.value.status == status
    assert whmcs.calls("GetOrders") == 1


def test_a_database_error_in_the_envelope_is_transient(whmcs: WhmcsSandbox) -> None:
    whmcs.admin("POST", "faults", {"error_status": 200, "force": {"AcceptOrder": ["error"]}})
    client = whmcs.client()
    order_id = place(client)
    with pytest.raises(WhmcsTransientError, match="SQLSTATE") as caught:
        client.accept_order(order_id)
    assert caught.value.status == 200
    client.accept_order(order_id)


def test_a_slow_answer_is_a_transient_timeout_and_not_resent(whmcs: WhmcsSandbox) -> None:
    whmcs.admin("POST", "faults", {"latency_ms": 400, "operations": ["GetOrders"]})
    with pytest.raises(WhmcsTransientError, match="timed out"):
        whmcs.client(read_timeout_s=0.05).get_orders()
    assert whmcs.calls("GetOrders") == 1


def test_a_closed_port_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = WhmcsClient(
        session=make_pool(),
        url=f"https://127.0.0.1:{port}",
        identifier=SecretStr("i"),
        secret=SecretStr("s"),
    )
    with pytest.raises(WhmcsTransientError, match="connection failed"):
        client.get_orders()


def test_an_untrusted_certificate_is_permanent(whmcs: WhmcsSandbox) -> None:
    # The default CA bundle (REQUESTS_CA_BUNDLE's, else certifi's: public CAs), which lacks the sandbox CA.
    client = WhmcsClient(session=make_pool(), url=whmcs.url, identifier=SecretStr("i"), secret=SecretStr("s"))
    with pytest.raises(WhmcsPermanentError, match="TLS certificate verification failed"):
        client.get_orders()


# -- configuration and secrets ------------------------------------------------------------------


def test_from_settings_builds_a_working_client_from_the_simulator_env(
    whmcs: WhmcsSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in whmcs.sim.env(whmcs.url + "/").items():
        monkeypatch.setenv(name, value)
    client = WhmcsClient.from_settings(Settings(_env_file=None), whmcs.pool)
    assert client.endpoint == f"{whmcs.url}/includes/api.php"
    assert client.get_client(ACTIVE_CLIENT).status == "Active"
    monkeypatch.delenv("WHMCS_SECRET")
    with pytest.raises(ConfigError, match="WHMCS_SECRET"):
        WhmcsClient.from_settings(Settings(_env_file=None), whmcs.pool)


def test_secrets_never_show_in_reprs_or_errors(whmcs: WhmcsSandbox) -> None:
    secret, identifier = "s3cr3t-value-xyz", whmcs.sim.identifier
    client = whmcs.client(secret=secret)
    errors: list[WhmcsError] = []
    with pytest.raises(WhmcsAuthError) as auth:
        client.get_orders()
    errors.append(auth.value)
    whmcs.admin("POST", "faults", {"force": {"GetOrders": ["reset", "reset"]}})
    with pytest.raises(WhmcsTransientError) as transport:
        whmcs.client().get_orders()
    errors.append(transport.value)
    texts = [repr(client), str(client), *(str(e) for e in errors), *(repr(e) for e in errors)]
    for text in texts:
        assert secret not in text
        assert whmcs.sim.secret not in text
        assert identifier not in text


def test_errors_keep_their_attributes_through_pickling() -> None:
    error = WhmcsOrderNotPending("WHMCS AcceptOrder: x", action="AcceptOrder", status=200, api_message="x")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own object, round trip)
    assert type(copy) is WhmcsOrderNotPending
    assert (str(copy), copy.action, copy.status, copy.api_message) == (
        "WHMCS AcceptOrder: x",
        "AcceptOrder",
        200,
        "x",
    )


# -- transport-level cases the simulator does not produce ---------------------------------------


class CannedPool(urllib3.PoolManager):
    """The transport layer, canned: answers each request with the next (status, body, headers) or raises it."""

    def __init__(self, *answers: tuple[int, str, dict[str, str]] | Exception) -> None:
        super().__init__()
        self.answers = list(answers)
        self.sent: list[tuple[str, str | bytes]] = []

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> urllib3.BaseHTTPResponse:
        self.sent.append((url, kw.get("body") or b""))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, body, headers = answer
        return urllib3.HTTPResponse(body=body.encode(), status=status, headers=headers, preload_content=True)


def canned_client(*answers: tuple[int, str, dict[str, str]] | Exception) -> tuple[WhmcsClient, CannedPool]:
    pool = CannedPool(*answers)
    client = WhmcsClient(
        session=pool,
        url="https://whmcs.test/billing",
        identifier=SecretStr("ident-1"),
        secret=SecretStr("secret-1"),
    )
    return client, pool


JSON = {"Content-Type": "application/json"}


def test_every_call_asks_for_json_with_the_credentials() -> None:
    client, adapter = canned_client((200, '{"result":"success","totalresults":"0","numreturned":0}', JSON))
    assert client.get_orders(client_id=5) == []
    [(url, sent)] = adapter.sent
    assert url == "https://whmcs.test/billing/includes/api.php"
    body = sent.decode() if isinstance(sent, bytes) else sent
    for field in (
        "action=GetOrders",
        "responsetype=json",
        "identifier=ident-1",
        "secret=secret-1",
        "userid=5",
    ):
        assert field in body


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        ((200, "<html>Maintenance</html>", {"Content-Type": "text/html"}), WhmcsTransientError, "not JSON"),
        ((200, "[]", JSON), WhmcsTransientError, "not a JSON object"),
        ((200, '{"totalresults": 1}', JSON), WhmcsTransientError, "without a result"),
        ((302, "", {"Location": "https://whmcs.test/login"}), WhmcsPermanentError, "redirect"),
        ((403, "Forbidden", {}), WhmcsAuthError, "HTTP 403"),
        ((404, "Not Found", {}), WhmcsPermanentError, "HTTP 404"),
        ((200, '{"result":"error","message":"Access Denied"}', JSON), WhmcsAuthError, "Access Denied"),
    ],
)
def test_odd_answers_are_classified(
    answer: tuple[int, str, dict[str, str]], error: type[WhmcsError], message: str
) -> None:
    client, _ = canned_client(answer)
    with pytest.raises(error, match=message) as caught:
        client.get_orders()
    assert type(caught.value) is error


def test_a_read_timeout_is_transient_and_not_resent() -> None:
    client, adapter = canned_client(
        ReadTimeoutError(None, "/", "read timed out"),  # type: ignore[arg-type]
        (200, '{"result":"success"}', JSON),
    )
    with pytest.raises(WhmcsTransientError, match="timed out"):
        client.get_orders()
    assert len(adapter.sent) == 1


def test_a_write_is_resent_only_when_no_connection_was_opened() -> None:
    refused = NewConnectionError(None, "refused")  # type: ignore[arg-type]
    client, adapter = canned_client(refused, (200, '{"result":"success"}', JSON))
    client.accept_order(1)
    assert len(adapter.sent) == 2
    client, adapter = canned_client(
        ProtocolError("Connection aborted.", ConnectionResetError("reset by peer")),
        (200, '{"result":"success"}', JSON),
    )
    with pytest.raises(WhmcsTransientError):
        client.accept_order(1)
    assert len(adapter.sent) == 1


def test_a_message_quoting_the_credentials_is_scrubbed() -> None:
    client, _ = canned_client((200, '{"result":"error","message":"bad secret-1 for ident-1"}', JSON))
    with pytest.raises(WhmcsPermanentError) as caught:
        client.get_orders()
    assert str(caught.value) == "WHMCS GetOrders: bad *** for ***"


def test_pay_method_expiry_accepts_four_digit_years() -> None:
    card = PayMethod(id=1, type="CreditCard", expiry_date="05/2026")
    assert not card.is_expired(date(2026, 5, 31))
    assert card.is_expired(date(2026, 6, 1))
