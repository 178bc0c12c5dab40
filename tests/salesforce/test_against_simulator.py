"""Our Salesforce clients against the Salesforce simulator, over HTTPS, with REQUESTS_CA_BUNDLE set."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from provisioning.core.errors import PermanentError
from provisioning.core.http import make_session
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import SalesforceClient
from provisioning.salesforce.errors import (
    InvalidSalesforceId,
    OrderNotFound,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceEndpointError,
    SalesforceRequestError,
    SalesforceUnavailable,
)
from provisioning.salesforce.events import EARLIEST, LATEST, ReplayPreset
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.salesforce.streaming import StreamingClient
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.salesforce import EVENT_CHANNEL, SalesforceSimulator

from .conftest import wait_until

# Short long polls keep the tests fast; the stop test holds a long one on purpose.
TEST_LONG_POLL_S = 1.0


@dataclass
class Org:
    sim: SalesforceSimulator
    server: ServerThread
    url: str
    settings: Settings
    admin: requests.Session
    pubsub_endpoint: str

    def post(self, path: str, body: Any) -> Any:
        response = self.admin.post(self.url + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any:
        response = self.admin.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def seed_order(self, **fields: Any) -> str:
        return str(self.post("/__admin/orders", fields)["ids"][0])

    def calls(self) -> dict[str, int]:
        return dict(self.get("/__admin/calls")["calls"])

    def publish(self, keys: list[str], order_id: str = "801000000000001AAA") -> None:
        self.post("/__admin/events", [{"OrderId__c": order_id, "IdemKey__c": k} for k in keys])

    def streaming(self, **knobs: Any) -> Any:
        return self.post("/__admin/streaming", knobs)


def start_org(workdir: Path, **sim_options: Any) -> Org:
    """The Salesforce simulator over TLS: HTTPS (OAuth, REST, CometD) and the Pub/Sub API (gRPC)."""
    tls = SandboxTLS.create(workdir)
    sim = SalesforceSimulator(workdir, seed=7, **sim_options)
    server = ServerThread(ssl_context=tls.server_context)
    server.add_app("salesforce", sim.build_app())
    server.add_server(
        "pubsub", sim.pubsub.starter("127.0.0.1", 0, tls.server_cert_chain_pem, tls.server_key_pem)
    )
    server.start()
    url = server.url("salesforce")
    pubsub_endpoint = f"127.0.0.1:{server.ports['pubsub']}"
    env = sim.env(url, pubsub_endpoint)
    settings = Settings(
        _env_file=None,
        tls_ca_bundle=tls.ca_bundle,
        sf_login_url=env["SF_LOGIN_URL"],
        sf_client_id=env["SF_CLIENT_ID"],
        sf_username=env["SF_USERNAME"],
        sf_private_key_file=Path(env["SF_PRIVATE_KEY_FILE"]),
        sf_api_version=env["SF_API_VERSION"],
        sf_pubsub_endpoint=env["SF_PUBSUB_ENDPOINT"],
    )
    return Org(sim, server, url, settings, make_session(tls.ca_bundle), pubsub_endpoint)


@pytest.fixture
def org(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Org]:
    # As on CI: the environment's bundle must not override ours.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    started = start_org(tmp_path, long_poll_s=TEST_LONG_POLL_S)
    yield started
    started.server.stop()


@pytest.fixture
def auth(org: Org) -> JWTBearerAuth:
    return JWTBearerAuth.from_settings(org.settings)


@pytest.fixture
def client(org: Org, auth: JWTBearerAuth) -> SalesforceClient:
    return SalesforceClient.from_settings(org.settings, auth=auth)


def streaming_client(org: Org, auth: JWTBearerAuth, fallback: ReplayPreset = EARLIEST) -> StreamingClient:
    return StreamingClient(
        auth=auth,
        session=make_session(org.settings.tls_ca_bundle),
        api_version=org.settings.sf_api_version,
        channel=org.settings.sf_provision_event_channel,
        replay_fallback=fallback,
        reconnect=ReconnectPolicy(base_s=0.05, cap_s=0.2, delivery_limit_wait_s=0.2),
    )


def keys_of(consumer: Any) -> list[str]:
    return [e.payload["IdemKey__c"] for e in consumer.events]


# -- auth and REST --------------------------------------------------------------------------


def test_jwt_login_against_the_simulator(org: Org, auth: JWTBearerAuth) -> None:
    token = auth.token()
    assert token.instance_url == org.url
    assert org.calls() == {"token": 1}


def test_fetch_then_update_is_exactly_two_api_calls(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order(
        sim_type="eSIM",
        whmcs_client_id="12",
        email="ann@example.com",
        first_name="Ann",
        items=[{"quantity": 2, "whmcs_product_id": "5"}],
    )
    order = client.fetch_order(order_id)
    assert (order.id, order.activation_status, order.whmcs_client_id, order.sim_type) == (
        order_id,
        "Activating",
        "12",
        "eSIM",
    )
    assert order.email == "ann@example.com"
    assert [(i.quantity, i.whmcs_product_id) for i in order.items] == [(2, "5")]
    assert order.eid is not None
    client.update_order(
        order_id,
        client.field_names.patch(
            activation_status="Activated",
            whmcs_order_id="901",
            esim_iccid="8944000000000000001",
            activation_error=None,
            activated_at="2025-01-02T03:04:05.000Z",
        ),
    )
    calls = org.calls()
    assert calls.pop("token") == 1
    assert calls == {"query": 1, "order_patch": 1}
    assert client.api_calls == 2
    view = org.get(f"/__admin/orders/{order_id}")
    assert view["Activation_Status__c"] == "Activated"
    assert view["WHMCS_Order_ID__c"] == "901"
    assert [p["source"] for p in view["patches"]] == ["api"]


def test_a_revoked_token_mid_use_logs_in_again_and_succeeds(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order()
    client.fetch_order(order_id)
    org.post("/__admin/tokens/revoke", {})
    client.update_order(order_id, {"Activation_Status__c": "Activated"})
    assert org.calls() == {"token": 2, "query": 1, "order_patch": 2}
    assert org.get(f"/__admin/orders/{order_id}")["Activation_Status__c"] == "Activated"


def test_an_expired_token_logs_in_again_and_succeeds(tmp_path: Path) -> None:
    org = start_org(tmp_path, token_lifetime_s=0.3)
    try:
        client = SalesforceClient.from_settings(org.settings)
        order_id = org.seed_order()
        client.fetch_order(order_id)
        threading.Event().wait(0.4)
        assert client.fetch_order(order_id).id == order_id
        assert org.calls()["token"] == 2
    finally:
        org.server.stop()


def test_twenty_threads_meeting_a_revoked_token_cause_one_login(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order()
    client.fetch_order(order_id)
    org.post("/__admin/tokens/revoke", {})
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def fetch() -> None:
        barrier.wait()
        try:
            client.fetch_order(order_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert org.calls()["token"] == 2


def test_an_unknown_order_is_order_not_found(org: Org, client: SalesforceClient) -> None:
    with pytest.raises(OrderNotFound):
        client.fetch_order("801000000000001")
    with pytest.raises(OrderNotFound):
        client.update_order("801000000000001", {"Activation_Status__c": "Failed"})


def test_an_id_with_a_bad_checksum_is_refused_before_any_call(org: Org, client: SalesforceClient) -> None:
    with pytest.raises(InvalidSalesforceId):
        client.fetch_order("801000000000001ZZZ")
    assert org.calls() == {}


def test_a_bad_value_is_a_permanent_error_naming_the_salesforce_code(
    org: Org, client: SalesforceClient
) -> None:
    order_id = org.seed_order()
    with pytest.raises(SalesforceRequestError) as caught:
        client.update_order(order_id, {"Activation_Status__c": "Sleeping"})
    assert caught.value.error_code == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("error_status", "code"),
    [
        (503, "SERVER_UNAVAILABLE"),
        (429, "REQUEST_LIMIT_EXCEEDED"),
        (200, "UNABLE_TO_LOCK_ROW"),
        (500, "UNKNOWN_EXCEPTION"),
    ],
)
def test_injected_salesforce_failures_are_transient(
    org: Org, client: SalesforceClient, error_status: int, code: str
) -> None:
    order_id = org.seed_order()
    org.post("/__admin/faults", {"error_status": error_status, "force": {"order_patch": ["error"]}})
    with pytest.raises(SalesforceUnavailable) as caught:
        client.update_order(order_id, {"Activation_Status__c": "Activated"})
    assert caught.value.error_code == code


def test_a_reset_connection_is_a_transient_connection_error(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order()
    org.post("/__admin/faults", {"force": {"query": ["reset"]}})
    with pytest.raises(SalesforceConnectionError):
        client.fetch_order(order_id)


def test_the_daily_api_limit_is_transient(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order()
    org.post("/__admin/limits", {"api_used": 100, "api_limit": 100})
    with pytest.raises(SalesforceUnavailable) as caught:
        client.fetch_order(order_id)
    assert caught.value.error_code == "REQUEST_LIMIT_EXCEEDED"


def test_a_wrong_username_is_refused_with_its_likely_cause(org: Org) -> None:
    settings = org.settings.model_copy(update={"sf_username": "someone@else.example"})
    with pytest.raises(SalesforceAuthError, match="not pre-authorized"):
        JWTBearerAuth.from_settings(settings).token()


# -- streaming ------------------------------------------------------------------------------


def test_an_event_published_over_rest_reaches_the_subscriber(
    org: Org, auth: JWTBearerAuth, client: SalesforceClient, consume: Any
) -> None:
    stream = streaming_client(org, auth)
    order_id = org.seed_order()
    client.publish_event(order_id, "k1")
    (event,) = consume(stream, EARLIEST).wait_for(1)
    assert event.payload["OrderId__c"] == order_id
    assert event.payload["IdemKey__c"] == "k1"
    assert event.uuid
    assert event.created_at is not None


def test_a_thousand_events_arrive_in_order_once_across_faults_and_a_restart(
    org: Org, auth: JWTBearerAuth, client: SalesforceClient, consume: Any
) -> None:
    stream = streaming_client(org, auth)
    expected: list[str] = []

    def publish(round_no: int, over_rest: bool = False) -> None:
        keys = [f"r{round_no}-{i:03d}" for i in range(100)]
        expected.extend(keys)
        if over_rest:
            order_id = org.seed_order()
            for key in keys:
                client.publish_event(order_id, key)
        else:
            org.publish(keys)

    consumer = consume(stream, EARLIEST)
    publish(0, over_rest=True)
    consumer.wait_for(100)
    for round_no in range(1, 6):
        org.streaming(unknown_client=1)
        publish(round_no)
        consumer.wait_for(len(expected))
    for round_no in range(6, 8):
        org.streaming(auth_invalid=1)
        publish(round_no)
        consumer.wait_for(len(expected))
    consumer.stop()
    delivered_before_stop = keys_of(consumer)
    publish(8)
    restarted = consume(stream, stream.last_acked)
    publish(9)
    restarted.wait_for(200)

    delivered = delivered_before_stop + keys_of(restarted)
    assert len(expected) == 1000
    assert delivered == expected
    replay_ids = [e.replay_id for e in consumer.events + restarted.events]
    assert len(set(replay_ids)) == 1000
    stats = org.get("/__admin/stats")
    assert stats["unknown_client"] == 5
    assert stats["auth_invalid"] == 2
    assert stream.counters()["events"] == 1000
    assert stream.counters.auth_renewals == 2
    assert stream.counters.reconnects == 7
    assert stream.counters.handshakes == 9


def test_injected_streaming_faults_lose_and_duplicate_nothing(
    org: Org, auth: JWTBearerAuth, consume: Any
) -> None:
    stream = streaming_client(org, auth)
    org.publish([f"a{i}" for i in range(50)])
    org.post(
        "/__admin/faults",
        {
            "force": {
                "cometd_handshake": ["reset", "error"],
                "cometd_subscribe": ["error", "reset"],
                "cometd_connect": ["ambiguous", "reset", "error", "ambiguous"],
            }
        },
    )
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(50)
    org.publish([f"b{i}" for i in range(50)])
    consumer.wait_for(100)
    assert keys_of(consumer) == [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)]
    assert org.get("/__admin/faults")["force"] == {}
    assert stream.counters.network_errors == 8


def test_a_replay_id_older_than_retention_falls_back_and_logs_one_error_line(
    org: Org, auth: JWTBearerAuth, consume: Any, log_lines: Any
) -> None:
    stream = streaming_client(org, auth, fallback=EARLIEST)
    org.publish(["a", "b"])
    first = consume(stream, EARLIEST)
    first.wait_for(2)
    first.stop()
    checkpoint = stream.last_acked
    org.streaming(expire_retention=True)
    restarted = consume(stream, checkpoint)
    wait_until(lambda: stream.counters.subscribes == 2)
    org.publish(["c"])
    restarted.wait_for(1)
    assert keys_of(restarted) == ["c"]
    assert stream.counters.replay_fallbacks == 1
    errors = log_lines.at("error")
    assert len(errors) == 1
    assert errors[0]["event"] == "streaming_replay_id_invalid"
    assert errors[0]["channel"] == EVENT_CHANNEL
    assert checkpoint is not None
    assert errors[0]["replay_id"] == checkpoint.number
    assert errors[0]["fallback"] == -2
    assert errors[0]["fallback_name"] == "EARLIEST"


def test_the_daily_limit_keeps_the_subscriber_down_until_it_lifts(
    org: Org, auth: JWTBearerAuth, consume: Any
) -> None:
    stream = streaming_client(org, auth, fallback=LATEST)
    consumer = consume(stream, EARLIEST)
    org.publish(["a"])
    consumer.wait_for(1)
    org.streaming(daily_limit=True)
    wait_until(lambda: stream.counters.delivery_limit_backoffs >= 2)
    org.publish(["b"])
    org.streaming(daily_limit=False)
    consumer.wait_for(2)
    assert keys_of(consumer) == ["a", "b"]


def test_stop_from_another_thread_ends_a_held_long_poll_within_a_second(tmp_path: Path, consume: Any) -> None:
    org = start_org(tmp_path, long_poll_s=30.0)
    try:
        stream = streaming_client(org, JWTBearerAuth.from_settings(org.settings))
        consumer = consume(stream, LATEST)
        wait_until(lambda: any(c["holding"] for c in org.get("/__admin/stats")["clients"]))
        stream.stop()
        consumer.thread.join(1.0)
        assert not consumer.thread.is_alive()
        assert consumer.error is None
    finally:
        org.server.stop()


def test_the_rest_calls_trust_tls_ca_bundle_whatever_requests_ca_bundle_and_curl_ca_bundle_say(
    org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both point at the system's CAs, which do not know the sandbox's: TLS_CA_BUNDLE must win.
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    client = SalesforceClient.from_settings(org.settings)
    order_id = org.seed_order()
    client.update_order(order_id, {"WHMCS_Order_ID__c": "5"})
    assert client.fetch_order(order_id).whmcs_order_id == "5"


def test_without_tls_ca_bundle_the_rest_calls_take_the_environment_s_bundle(
    org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_id = org.seed_order()
    settings = org.settings.model_copy(update={"tls_ca_bundle": None})
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(org.settings.tls_ca_bundle))
    auth = JWTBearerAuth.from_settings(org.settings)
    assert SalesforceClient.from_settings(settings, auth=auth).fetch_order(order_id).id == order_id
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(SalesforceEndpointError, match="certificate"):
        SalesforceClient.from_settings(settings, auth=auth).fetch_order(order_id)


def test_every_rest_answer_moves_the_api_usage_the_client_keeps(org: Org, client: SalesforceClient) -> None:
    order_id = org.seed_order()
    client.fetch_order(order_id)
    used, limit = client.api_usage() or (0, 0)
    assert (used, limit) == (org.sim.api_used, org.sim.api_limit)
    with pytest.raises(OrderNotFound):
        client.update_order("801000000000001", {"WHMCS_Order_ID__c": "1"})
    assert client.api_usage() == (used + 1, limit)
