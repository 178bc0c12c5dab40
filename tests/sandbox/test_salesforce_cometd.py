"""A raw CometD (Bayeux long-polling) conversation with the simulator's Streaming API, over requests."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from provisioning.sandbox.salesforce.driver import SalesforceDriver

StartSalesforce = Callable[..., SalesforceDriver]
CHANNEL = "/event/OrderProvisionRequested__e"
ORDER_ID = "801Dn000000AbCdIAK"


class Bayeux:
    """One CometD client: its own cookie jar, token and clientId."""

    def __init__(self, sf: SalesforceDriver, token: str | None = None) -> None:
        self.sf = sf
        self.session: requests.Session = sf.new_session()
        self.token = token or sf.login()
        self.client_id: str | None = None
        self._ids = 0

    def message(self, channel: str, **fields: Any) -> dict[str, Any]:
        self._ids += 1
        base = {"channel": channel, "id": str(self._ids)}
        if self.client_id is not None and channel != "/meta/handshake":
            base["clientId"] = self.client_id
        return base | fields

    def send(self, *messages: dict[str, Any], timeout: float = 10.0) -> requests.Response:
        return self.sf.bayeux(self.session, self.token, list(messages), timeout=timeout)

    def call(self, *messages: dict[str, Any], timeout: float = 10.0) -> list[dict[str, Any]]:
        response = self.send(*messages, timeout=timeout)
        assert response.status_code == 200, response.text
        return list(response.json())

    def handshake(self, replay: bool = True) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "version": "1.0",
            "minimumVersion": "1.0",
            "supportedConnectionTypes": ["long-polling"],
        }
        if replay:
            fields["ext"] = {"replay": True}
        [reply] = self.call(self.message("/meta/handshake", **fields))
        if reply["successful"]:
            self.client_id = reply["clientId"]
        return reply

    def subscribe(self, replay: Any = -1, replay_map: Any = None, channel: str = CHANNEL) -> dict[str, Any]:
        mapping = {channel: replay} if replay_map is None else replay_map
        [reply] = self.call(self.message("/meta/subscribe", subscription=channel, ext={"replay": mapping}))
        return reply

    def connect(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        replies = self.call(self.message("/meta/connect", connectionType="long-polling"), timeout=timeout)
        *events, reply = replies
        assert reply["channel"] == "/meta/connect"
        return events, reply

    def start(self, replay: Any = -1) -> None:
        """Handshake, subscribe and make the first (immediate) connect."""
        assert self.handshake()["successful"]
        assert self.subscribe(replay)["successful"], "subscribe failed"
        self.first_events, self.first_reply = self.connect()


def publish(sf: SalesforceDriver, count: int, key: str = "k") -> list[int]:
    return sf.publish([{"OrderId__c": ORDER_ID, "IdemKey__c": f"{key}{i}"} for i in range(count)])


def keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["payload"]["IdemKey__c"] for e in events]


# -- handshake and transport ----------------------------------------------------------------------


def test_a_handshake_with_replay_gets_a_client_id_replay_ext_and_the_browser_cookie(
    sf: SalesforceDriver,
) -> None:
    client = Bayeux(sf)
    reply = client.handshake()
    assert reply["successful"] is True
    assert reply["channel"] == "/meta/handshake"
    assert reply["id"] == "1"
    assert reply["ext"]["replay"] is True
    assert reply["supportedConnectionTypes"] == ["long-polling"]
    [cookie] = [c for c in client.session.cookies if c.name == "BAYEUX_BROWSER"]
    assert cookie.path == "/cometd/"
    assert cookie.secure


def test_a_handshake_without_the_replay_extension_does_not_announce_it(sf: SalesforceDriver) -> None:
    reply = Bayeux(sf).handshake(replay=False)
    assert reply["successful"] is True
    assert "replay" not in reply["ext"]


def test_a_bare_object_body_is_a_bad_request(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    response = client.session.post(
        f"{sf.url}/cometd/{sf.version}",
        json={"channel": "/meta/handshake", "version": "1.0"},
        headers={"Authorization": f"Bearer {client.token}"},
        timeout=10,
    )
    assert response.status_code == 400


def test_a_request_without_a_bearer_token_is_refused(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.token = None  # type: ignore[assignment]
    response = client.send(client.message("/meta/handshake", version="1.0"))
    assert response.status_code == 401
    assert response.json()[0]["error"] == "401::Request requires authentication"


def test_a_handshake_with_a_revoked_token_is_denied_with_the_failure_reason(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    sf.ok("POST", "tokens/revoke")
    reply = client.handshake()
    assert reply["successful"] is False
    assert reply["error"] == "403::Handshake denied"
    assert reply["ext"]["sfdc"]["failureReason"] == "401::Authentication invalid"
    assert reply["advice"]["reconnect"] == "none"


def test_only_the_first_connect_carries_advice_and_it_is_answered_at_once(start_sf: StartSalesforce) -> None:
    sf = start_sf(long_poll_s=30.0)
    client = Bayeux(sf)
    client.start()
    assert client.first_reply["successful"] is True
    assert client.first_reply["advice"] == {"interval": 0, "timeout": 30000, "reconnect": "retry"}
    publish(sf, 1)
    events, reply = client.connect()
    assert len(events) == 1
    assert reply["successful"] is True
    assert "advice" not in reply


def test_messages_without_the_browser_cookie_are_refused(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.handshake()
    client.session.cookies.clear()
    reply = client.subscribe(-1)
    assert reply["successful"] is False
    assert reply["error"] == (
        f"400::Client {client.client_id} has established a session, but no BAYEUX_BROWSER cookie present"
    )


def test_an_unknown_client_id_must_handshake_again(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.handshake()
    client.client_id = "doesnotexist"
    _, reply = client.connect()
    assert reply["successful"] is False
    assert reply["error"] == "403::Unknown client"
    assert reply["advice"]["reconnect"] == "handshake"


def test_a_disconnected_client_is_forgotten(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start()
    [reply] = client.call(client.message("/meta/disconnect"))
    assert reply["successful"] is True
    _, after = client.connect()
    assert after["error"] == "403::Unknown client"


def test_an_unsubscribed_channel_delivers_nothing_more(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    [reply] = client.call(client.message("/meta/unsubscribe", subscription=CHANNEL))
    assert reply["successful"] is True
    publish(sf, 2)
    events, _ = client.connect()
    assert events == []


# -- replay -----------------------------------------------------------------------------------


def test_replay_minus_one_delivers_only_events_published_after_subscribing(sf: SalesforceDriver) -> None:
    publish(sf, 2, "old")
    client = Bayeux(sf)
    client.start(-1)
    assert client.first_events == []
    publish(sf, 2, "new")
    events, _ = client.connect()
    assert keys(events) == ["new0", "new1"]


def test_replay_minus_two_delivers_every_retained_event(sf: SalesforceDriver) -> None:
    publish(sf, 3, "old")
    client = Bayeux(sf)
    client.start(-2)
    assert keys(client.first_events) == ["old0", "old1", "old2"]


def test_replay_n_delivers_the_events_after_n(sf: SalesforceDriver) -> None:
    replay_ids = publish(sf, 5)
    client = Bayeux(sf)
    client.start(replay_ids[1])
    assert keys(client.first_events) == ["k2", "k3", "k4"]
    assert [e["data"]["event"]["replayId"] for e in client.first_events] == replay_ids[2:]


def test_several_events_arrive_in_order_in_one_connect_response_before_the_connect_reply(
    sf: SalesforceDriver,
) -> None:
    client = Bayeux(sf)
    client.start(-1)
    replay_ids = publish(sf, 30)
    replies = client.call(client.message("/meta/connect", connectionType="long-polling"))
    assert [r["channel"] for r in replies] == [CHANNEL] * 30 + ["/meta/connect"]
    delivered = [r["data"]["event"]["replayId"] for r in replies[:-1]]
    assert delivered == replay_ids == sorted(replay_ids)
    steps = {b - a for a, b in itertools.pairwise(delivered)}
    assert steps <= {1, 2, 3}
    assert steps != {1}, "replay ids must not be contiguous"
    event = replies[0]
    assert set(event["data"]) == {"schema", "payload", "event"}
    assert set(event["data"]["payload"]) == {"CreatedDate", "CreatedById", "OrderId__c", "IdemKey__c"}
    assert set(event["data"]["event"]) == {"replayId", "EventUuid"}


def test_a_large_backlog_is_delivered_in_batches_each_event_exactly_once(sf: SalesforceDriver) -> None:
    publish(sf, 1200)
    client = Bayeux(sf)
    client.start(-2)
    batches = [client.first_events]
    while len(batches[-1]) == 500:
        batches.append(client.connect()[0])
    assert [len(b) for b in batches] == [500, 500, 200]
    assert keys([e for b in batches for e in b]) == [f"k{i}" for i in range(1200)]


def test_two_clients_each_get_every_event_once(sf: SalesforceDriver) -> None:
    first, second = Bayeux(sf), Bayeux(sf)
    first.start(-1)
    second.start(-1)
    publish(sf, 3)
    assert keys(first.connect()[0]) == keys(second.connect()[0]) == ["k0", "k1", "k2"]
    assert sf.ok("GET", "stats")["events_delivered"] == 6


def test_an_unknown_replay_id_fails_the_subscription_with_salesforces_message(sf: SalesforceDriver) -> None:
    replay_ids = publish(sf, 3)
    unknown = max(replay_ids) + 50
    client = Bayeux(sf)
    client.handshake()
    reply = client.subscribe(unknown)
    assert reply["successful"] is False
    assert reply["subscription"] == CHANNEL
    assert reply["error"] == (
        f"400::The replayId {{{unknown}}} you provided was invalid.  Please provide a valid ID, "
        "-2 to replay all events, or -1 to replay only new events."
    )


def test_replay_ids_older_than_the_window_become_invalid_when_it_is_expired(sf: SalesforceDriver) -> None:
    replay_ids = publish(sf, 3)
    client = Bayeux(sf)
    client.handshake()
    assert client.subscribe(replay_ids[0])["successful"] is True
    sf.ok("POST", "streaming", {"expire_retention": True})
    reply = client.subscribe(replay_ids[0])
    assert reply["successful"] is False
    assert "you provided was invalid" in reply["error"]
    assert client.subscribe(-2)["successful"] is True
    events, _ = client.connect()
    assert events == []


def test_events_older_than_the_retention_are_not_replayed(start_sf: StartSalesforce) -> None:
    # Long enough that "new" is still retained when a loaded machine gets round to subscribing.
    sf = start_sf(retention_s=3.0)
    publish(sf, 2, "old")
    time.sleep(3.1)
    publish(sf, 1, "new")
    client = Bayeux(sf)
    client.start(-2)
    assert keys(client.first_events) == ["new0"]


def test_a_replay_map_without_the_subscribed_channel_fails_the_subscription(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.handshake()
    reply = client.subscribe(replay_map={})
    assert reply["successful"] is False
    assert reply["error"].startswith(
        f"400::The replayId for channel {{{CHANNEL}}} wasn't found using the provided replay ID map {{{{}}}}."
    )


def test_subscribing_to_an_event_the_org_does_not_have_fails_with_salesforces_message(
    sf: SalesforceDriver,
) -> None:
    client = Bayeux(sf)
    client.handshake()
    reply = client.subscribe(channel="/event/NotDeployed__e")
    assert reply["successful"] is False
    assert reply["subscription"] == "/event/NotDeployed__e"
    assert reply["error"] == (
        "400::The channel you requested to subscribe to does not exist {/event/NotDeployed__e}"
    )
    assert sf.ok("GET", "stats")["subscribe_failures"] == 1
    assert client.subscribe()["successful"] is True


# -- streaming faults -------------------------------------------------------------------------


def test_the_unknown_client_fault_drops_the_client_and_its_subscription(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    sf.ok("POST", "streaming", {"unknown_client": 1})
    _, reply = client.connect()
    assert reply["successful"] is False
    assert reply["error"] == "403::Unknown client"
    assert reply["advice"] == {"reconnect": "handshake", "interval": 0}
    _, again = client.connect()
    assert again["error"] == "403::Unknown client"
    client.start(-1)
    publish(sf, 1)
    assert keys(client.connect()[0]) == ["k0"]


def test_the_auth_invalid_fault_ends_the_session_and_its_token(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    sf.ok("POST", "streaming", {"auth_invalid": 1})
    _, reply = client.connect()
    assert reply["successful"] is False
    assert reply["error"] == "401::Authentication invalid"
    assert reply["advice"]["reconnect"] == "none"
    assert client.handshake()["error"] == "403::Handshake denied"
    client.token = sf.login()
    client.start(-1)
    assert client.first_reply["successful"] is True


def test_a_revoked_token_gets_authentication_invalid_on_connect(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    sf.ok("POST", "tokens/revoke")
    _, reply = client.connect()
    assert reply["error"] == "401::Authentication invalid"


def test_the_daily_limit_fault_is_one_shot_or_sticky_until_cleared(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    sf.ok("POST", "streaming", {"daily_limit": 1})
    _, reply = client.connect()
    assert reply["successful"] is False
    assert reply["error"] == "403::Organization total events daily limit exceeded"
    publish(sf, 1, "a")
    assert keys(client.connect()[0]) == ["a0"]
    assert sf.ok("POST", "streaming", {"daily_limit": True})["daily_limit"] is True
    for _ in range(2):
        assert client.connect()[1]["error"] == "403::Organization total events daily limit exceeded"
    sf.ok("POST", "streaming", {"daily_limit": False})
    publish(sf, 1, "b")
    assert keys(client.connect()[0]) == ["b0"]


def test_unknown_streaming_settings_are_refused(sf: SalesforceDriver) -> None:
    assert sf.admin("POST", "streaming", {"unkown_client": 1}).status_code == 400


# -- long polling -----------------------------------------------------------------------------


def test_a_held_connect_returns_when_an_event_is_published(start_sf: StartSalesforce) -> None:
    sf = start_sf(long_poll_s=60.0)
    client = Bayeux(sf)
    client.start(-1)
    result: dict[str, Any] = {}
    poll = threading.Thread(target=lambda: result.update(reply=client.connect(timeout=30)))
    poll.start()
    time.sleep(0.2)  # let the connect be held first
    api_token = sf.login()
    created = sf.rest(
        "POST",
        "sobjects/OrderProvisionRequested__e",
        api_token,
        json={"OrderId__c": ORDER_ID, "IdemKey__c": "live"},
    )
    assert created.status_code == 201
    poll.join(30)
    events, reply = result["reply"]
    assert keys(events) == ["live"]
    assert reply["successful"] is True


def test_a_held_connect_notices_a_streaming_fault_at_once(start_sf: StartSalesforce) -> None:
    sf = start_sf(long_poll_s=60.0)
    client = Bayeux(sf)
    client.start(-1)
    result: dict[str, Any] = {}
    poll = threading.Thread(target=lambda: result.update(reply=client.connect(timeout=30)))
    poll.start()
    time.sleep(0.2)
    sf.ok("POST", "streaming", {"unknown_client": 1})
    poll.join(30)
    assert result["reply"][1]["error"] == "403::Unknown client"


def test_an_idle_connect_is_answered_empty_after_the_long_poll(start_sf: StartSalesforce) -> None:
    sf = start_sf(long_poll_s=0.5)
    client = Bayeux(sf)
    client.start(-1)
    started = time.monotonic()
    events, reply = client.connect()
    assert events == []
    assert reply["successful"] is True
    assert time.monotonic() - started >= 0.45  # it was held, not answered at once


def test_streaming_gets_no_random_faults_unless_named(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    sf.ok("POST", "faults", {"error_rate": 1.0, "error_status": 503})
    client.start(-1)
    assert client.first_reply["successful"] is True
    sf.ok("POST", "faults", {"error_rate": 0.0, "force": {"cometd_connect": ["error"]}})
    response = client.send(client.message("/meta/connect", connectionType="long-polling"))
    assert response.status_code == 503
    calls = sf.calls()
    assert calls["cometd_handshake"] == 1
    assert calls["cometd_connect"] == 2


def test_stats_show_the_conversation(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    stats = sf.ok("GET", "stats")
    assert (stats["handshakes"], stats["subscribes"], stats["connects"]) == (1, 1, 1)
    [entry] = stats["clients"]
    assert entry["clientId"] == client.client_id
    assert CHANNEL in entry["subscriptions"]


def test_reset_forgets_orders_events_clients_and_faults(sf: SalesforceDriver) -> None:
    client = Bayeux(sf)
    client.start(-1)
    sf.seed()
    publish(sf, 2)
    sf.ok("POST", "faults", {"latency_ms": 5, "force": {"query": ["reset"]}})
    sf.ok("POST", "streaming", {"unknown_client": 3})
    sf.ok("POST", "reset")
    stats = sf.ok("GET", "stats")
    assert (stats["orders"], stats["clients"], stats["connects"]) == (0, [], 0)
    assert sf.ok("GET", "events")["events"] == []
    knobs = sf.ok("GET", "streaming")
    assert {k: knobs[k] for k in ("unknown_client", "auth_invalid", "daily_limit")} == {
        "unknown_client": 0,
        "auth_invalid": 0,
        "daily_limit": 0,
    }
    faults = sf.ok("GET", "faults")
    assert faults["latency_ms"] == 0
    assert faults["force"] == {}
    assert sf.calls() == {}
