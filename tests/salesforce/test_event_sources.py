"""The EventSource contract, for both transports, against the sandbox's Salesforce simulator.

Every test that applies to both runs against the Pub/Sub API client (gRPC) and the Streaming
API client (CometD) on one simulated org; the ones that only concern Pub/Sub (flow control,
schema change, the silent stall, decode errors, permissions) follow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.http import make_session
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.errors import SalesforceEventNotFound, SalesforceEventPermissionError
from provisioning.salesforce.events import EARLIEST, LATEST, EventSource, ReplayId, ReplayPreset, ReplayStart
from provisioning.salesforce.pubsub import PubSubClient
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.salesforce.streaming import StreamingClient
from provisioning.sandbox.salesforce import EVENT_CHANNEL

from .conftest import Consumer, wait_until
from .test_against_simulator import Org, start_org

# Short server timings keep the suite fast: CometD long polls of 1 s, Pub/Sub keepalives every 0.5 s.
LONG_POLL_S = 1.0
KEEPALIVE_S = 0.5
# The client's stall watchdog: three missed keepalives.
KEEPALIVE_TIMEOUT_S = 1.5
RECONNECT = ReconnectPolicy(base_s=0.05, cap_s=0.2)
RECEIVE_TIMEOUT_S = 20.0
# stop() must end an iteration within this: the seam promises about 0.1-0.5 s; the margin is for a
# machine shared with other test runs.
STOP_DEADLINE_S = 1.0
TRANSPORTS = ("pubsub", "cometd")


@dataclass
class Kit:
    """One org and one event source on it, with the faults the transport knows."""

    transport: str
    org: Org
    auth: JWTBearerAuth
    make: Callable[..., EventSource]
    source: EventSource = field(init=False)

    def __post_init__(self) -> None:
        self.source = self.make()

    def publish(self, keys: list[str]) -> None:
        self.org.publish(keys)

    def subscribed(self) -> bool:
        """The server has registered the subscription (so LATEST has a position)."""
        stats = self.org.get("/__admin/stats")
        if self.transport == "pubsub":
            return bool(stats["pubsub"]["open_streams"])
        return any(client["subscriptions"] for client in stats["clients"])

    def break_stream(self) -> None:
        """What a transport's stream suffers in normal operation: killed streams, reset connections."""
        if self.transport == "pubsub":
            self.org.streaming(pubsub_kill_streams=True)
        else:
            self.org.post("/__admin/faults", {"force": {"cometd_connect": ["reset", "reset"]}})


def _make(transport: str, org: Org, auth: JWTBearerAuth) -> Callable[..., EventSource]:
    def make(fallback: ReplayPreset = EARLIEST, channel: str = EVENT_CHANNEL, **options: Any) -> EventSource:
        if transport == "pubsub":
            return PubSubClient(
                auth=auth,
                endpoint=org.pubsub_endpoint,
                topic=channel,
                ca_bundle=org.settings.tls_ca_bundle,
                keepalive_timeout_s=options.pop("keepalive_timeout_s", KEEPALIVE_TIMEOUT_S),
                replay_fallback=fallback,
                reconnect=RECONNECT,
                **options,
            )
        return StreamingClient(
            auth=auth,
            session=make_session(org.settings.tls_ca_bundle),
            api_version=org.settings.sf_api_version,
            channel=channel,
            replay_fallback=fallback,
            reconnect=RECONNECT,
            **options,
        )

    return make


@pytest.fixture
def org(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Org]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    started = start_org(tmp_path, long_poll_s=LONG_POLL_S, pubsub_keepalive_s=KEEPALIVE_S)
    yield started
    started.server.stop()


@pytest.fixture(params=TRANSPORTS)
def kit(request: pytest.FixtureRequest, org: Org) -> Iterator[Kit]:
    auth = JWTBearerAuth.from_settings(org.settings)
    made = Kit(request.param, org, auth, _make(request.param, org, auth))
    yield made
    made.source.stop()


@pytest.fixture
def pubsub(org: Org) -> Iterator[Kit]:
    auth = JWTBearerAuth.from_settings(org.settings)
    made = Kit("pubsub", org, auth, _make("pubsub", org, auth))
    yield made
    made.source.stop()


def keys(consumer: Consumer) -> list[str]:
    return [str(e.payload["IdemKey__c"]) for e in consumer.events if e.payload is not None]


def take(source: EventSource, start: ReplayStart, want: int) -> Consumer:
    """Consume (acking every batch) until ``want`` events arrived, then stop."""
    consumer = Consumer(source, start)
    consumer.wait_for(want, RECEIVE_TIMEOUT_S)
    consumer.stop()
    return consumer


# -- the contract, on both transports ----------------------------------------------------------


def test_earliest_delivers_every_retained_event_in_order_once(kit: Kit) -> None:
    kit.publish([f"k{i}" for i in range(30)])
    consumer = take(kit.source, EARLIEST, 30)
    assert keys(consumer) == [f"k{i}" for i in range(30)]
    assert len({e.replay_id for e in consumer.events}) == 30
    assert all(isinstance(e.replay_id, ReplayId) for e in consumer.events)
    assert all(e.replay_id.transport == kit.transport for e in consumer.events)
    assert all(e.uuid and e.created_at and e.decode_error is None for e in consumer.events)
    batch = consumer.batches[-1]
    assert batch.position == batch.events[-1].replay_id
    assert kit.source.transport == kit.transport
    assert kit.source.counters()["events"] == 30
    assert kit.source.last_response_at is not None


def test_latest_delivers_only_what_is_published_after_subscribing(kit: Kit, consume: Any) -> None:
    kit.publish(["old-1", "old-2"])
    consumer = consume(kit.source, LATEST)
    wait_until(kit.subscribed)
    kit.publish(["new-1", "new-2"])
    consumer.wait_for(2, RECEIVE_TIMEOUT_S)
    assert keys(consumer) == ["new-1", "new-2"]


def test_a_stored_replay_id_resumes_after_it(kit: Kit) -> None:
    kit.publish(["a", "b", "c"])
    first = take(kit.source, EARLIEST, 3)
    stored = first.events[0].replay_id
    kit.publish(["d"])
    again = take(kit.source, stored, 3)
    assert keys(again) == ["b", "c", "d"]


def test_a_new_iteration_resumes_after_the_last_acknowledged_batch(kit: Kit) -> None:
    kit.publish(["a", "b"])
    first = take(kit.source, EARLIEST, 2)
    assert first.batches[-1].position is not None
    kit.publish(["c"])
    later = take(kit.source, first.batches[-1].position, 1)
    assert keys(later) == ["c"]


def test_an_unacknowledged_batch_is_delivered_again_after_the_stream_breaks(kit: Kit) -> None:
    kit.publish(["a"])
    iterator = kit.source.batches(EARLIEST)
    try:
        batch = next(iterator)
        assert [e.payload["IdemKey__c"] for e in batch.events if e.payload] == ["a"]
        kit.break_stream()
        kit.publish(["b"])
        seen: list[str] = []
        while "b" not in seen:
            seen += [str(e.payload["IdemKey__c"]) for e in next(iterator).events if e.payload]
    finally:
        iterator.close()
    assert seen == ["a", "b"]
    assert kit.source.counters()["reconnects"] >= 1


def test_a_broken_stream_resubscribes_from_the_last_ack_without_loss_or_duplicates(
    kit: Kit, consume: Any
) -> None:
    consumer = consume(kit.source, EARLIEST)
    expected: list[str] = []
    for round_no in range(3):
        batch = [f"r{round_no}-{i}" for i in range(20)]
        expected += batch
        kit.publish(batch)
        consumer.wait_for(len(expected), RECEIVE_TIMEOUT_S)
        kit.break_stream()
    kit.publish(["last"])
    consumer.wait_for(len(expected) + 1, RECEIVE_TIMEOUT_S)
    assert keys(consumer) == [*expected, "last"]
    assert kit.source.counters()["reconnects"] >= 3


def test_a_revoked_token_is_renewed_and_the_stream_resumes_without_loss(kit: Kit, consume: Any) -> None:
    consumer = consume(kit.source, EARLIEST)
    kit.publish(["a"])
    consumer.wait_for(1, RECEIVE_TIMEOUT_S)
    kit.org.post("/__admin/tokens/revoke", {})
    kit.publish(["b", "c"])
    consumer.wait_for(3, RECEIVE_TIMEOUT_S)
    assert keys(consumer) == ["a", "b", "c"]
    assert kit.source.counters()["auth_renewals"] >= 1
    assert kit.org.get("/__admin/stats")["tokens_issued"] == 2


@pytest.mark.parametrize("fallback", [EARLIEST, LATEST])
def test_an_expired_replay_id_falls_back_with_one_error_line_and_a_count(
    kit: Kit, fallback: ReplayPreset, consume: Any, log_lines: Any
) -> None:
    kit.publish(["a", "b"])
    stored = take(kit.source, EARLIEST, 2).batches[-1].position
    assert stored is not None
    kit.org.streaming(expire_retention=True)
    kit.publish(["c"])
    source = kit.make(fallback)
    consumer = consume(source, stored)
    if fallback is LATEST:
        # This source's own subscription: the server may still list the first source's.
        wait_until(lambda: source.connected and kit.subscribed())
        kit.publish(["d"])
    consumer.wait_for(1, RECEIVE_TIMEOUT_S)
    assert keys(consumer) == (["c"] if fallback is EARLIEST else ["d"])
    assert source.counters()["replay_fallbacks"] == 1
    errors = log_lines.at("error")
    assert len(errors) == 1
    assert errors[0]["event"] in ("pubsub_replay_id_invalid", "streaming_replay_id_invalid")
    assert fallback.value in (errors[0]["fallback"], errors[0].get("fallback_name"))


def test_stop_from_another_thread_ends_an_idle_iteration_promptly(kit: Kit, consume: Any) -> None:
    consumer = consume(kit.source, LATEST)
    wait_until(kit.subscribed)
    started = time.monotonic()
    kit.source.stop()
    consumer.thread.join(STOP_DEADLINE_S)
    assert not consumer.thread.is_alive(), f"still iterating {time.monotonic() - started:.2f} s after stop()"
    assert consumer.error is None
    assert not kit.source.connected


def test_a_channel_the_org_does_not_have_is_refused_not_found_with_the_remedy(
    kit: Kit, log_lines: Any
) -> None:
    source = kit.make(channel="/event/NotDeployed__e")
    with pytest.raises(SalesforceEventNotFound) as caught:
        next(source.batches(LATEST))
    assert caught.value.remedy is not None
    assert "deploy the Platform Event NotDeployed__e" in caught.value.remedy
    assert "SF_PROVISION_EVENT_CHANNEL" in caught.value.remedy
    assert not source.connected
    assert log_lines.at("error") == []  # the source raises; its caller logs (once)


def test_the_counters_hold_the_names_metrics_expect(kit: Kit) -> None:
    counters = kit.source.counters()
    expected = {
        "events",
        "reconnects",
        "replay_fallbacks",
        "auth_renewals",
        "stalls",
        "decode_errors",
        "network_errors",
        "delivery_limit_backoffs",
    }
    assert expected <= set(counters)
    assert all(isinstance(v, int) for v in counters.values())


def test_one_published_event_reaches_both_transports(org: Org) -> None:
    auth = JWTBearerAuth.from_settings(org.settings)
    org.publish(["both"])
    received = [take(_make(t, org, auth)(), EARLIEST, 1).events[0] for t in TRANSPORTS]
    assert [e.uuid for e in received] == [received[0].uuid] * 2
    assert [e.payload["IdemKey__c"] for e in received if e.payload] == ["both", "both"]
    assert received[0].replay_id != received[1].replay_id  # opaque, per transport
    assert received[0].created_at == pytest.approx(received[1].created_at, abs=0.001)


# -- Pub/Sub only ----------------------------------------------------------------------------------


def test_flow_control_never_puts_more_events_in_hand_than_requested(pubsub: Kit) -> None:
    pubsub.publish([f"k{i}" for i in range(200)])
    source = pubsub.make(batch_size=10)
    iterator = source.batches(EARLIEST)
    try:
        first = next(iterator)
        time.sleep(0.5)  # the caller sits on its batch
        (stream,) = pubsub.org.get("/__admin/stats")["pubsub"]["streams"]
        # The batch in hand plus at most one request's worth in flight.
        assert len(first) == 10
        assert stream["delivered"] <= 20
        assert stream["requested"] <= 20
        got = list(first.events)
        while len(got) < 200:
            batch = next(iterator)
            assert len(batch) <= 10
            got += batch.events
            assert batch.position is not None
            source.ack(batch.position)
    finally:
        iterator.close()
    assert [e.payload["IdemKey__c"] for e in got if e.payload] == [f"k{i}" for i in range(200)]


def test_the_stream_outlives_the_idle_timeout_because_requests_never_run_out(
    pubsub: Kit, consume: Any
) -> None:
    pubsub.org.streaming(pubsub_idle_timeout_s=1.0)
    consumer = consume(pubsub.make(batch_size=2), EARLIEST)
    pubsub.publish([f"k{i}" for i in range(6)])
    consumer.wait_for(6, RECEIVE_TIMEOUT_S)
    time.sleep(2.5)
    pubsub.publish(["late"])
    consumer.wait_for(7, RECEIVE_TIMEOUT_S)
    stats = pubsub.org.get("/__admin/stats")["pubsub"]
    assert stats["idle_closes"] == 0
    assert stats["subscribes"] == 1


def test_a_batch_size_outside_1_to_100_is_refused_clearly(pubsub: Kit) -> None:
    for bad in (0, 101, -5):
        with pytest.raises(ValueError, match="from 1 to 100"):
            pubsub.make(batch_size=bad)


def test_an_empty_keepalive_is_a_batch_without_events_carrying_the_position(pubsub: Kit) -> None:
    pubsub.publish(["a"])
    iterator = pubsub.source.batches(EARLIEST)
    try:
        with_event = next(iterator)
        keepalive = next(iterator)
    finally:
        iterator.close()
    assert len(with_event) == 1
    assert keepalive.events == ()
    assert keepalive.position == with_event.position
    assert pubsub.source.counters()["keepalives"] >= 1


def test_a_latest_start_is_anchored_by_a_keepalive_so_a_broken_stream_loses_nothing(
    pubsub: Kit, consume: Any
) -> None:
    consumer = consume(pubsub.source, LATEST)
    wait_until(lambda: pubsub.source.counters()["keepalives"] >= 1)
    # Published while the stream is down: LATEST again would skip them.
    pubsub.org.streaming(pubsub_stall=True)
    wait_until(lambda: pubsub.source.stalled)
    pubsub.publish(["during"])
    pubsub.org.streaming(pubsub_stall=False)
    consumer.wait_for(1, RECEIVE_TIMEOUT_S)
    assert keys(consumer) == ["during"]
    assert pubsub.source.counters()["unanchored_resubscribes"] == 0


def test_a_schema_change_mid_stream_is_fetched_and_decoded_without_a_restart(
    pubsub: Kit, consume: Any
) -> None:
    consumer = consume(pubsub.source, EARLIEST)
    pubsub.publish(["before"])
    consumer.wait_for(1, RECEIVE_TIMEOUT_S)
    pubsub.org.streaming(pubsub_schema_change=True)
    pubsub.org.post(
        "/__admin/events",
        [{"OrderId__c": "801000000000001AAA", "IdemKey__c": "after", "Priority__c": "high"}],
    )
    events = consumer.wait_for(2, RECEIVE_TIMEOUT_S)
    assert events[1].payload is not None
    assert events[1].payload["Priority__c"] == "high"
    assert "Priority__c" not in (events[0].payload or {})
    assert pubsub.source.counters()["schema_fetches"] == 2
    assert pubsub.org.get("/__admin/stats")["pubsub"]["subscribes"] == 1


def test_a_payload_that_does_not_decode_is_delivered_with_the_reason_and_the_stream_goes_on(
    pubsub: Kit, consume: Any
) -> None:
    consumer = consume(pubsub.source, EARLIEST)
    pubsub.org.post("/__admin/events", [{"OrderId__c": 123}, {"OrderId__c": "801000000000001AAA"}])
    bad, good = consumer.wait_for(2, RECEIVE_TIMEOUT_S)
    assert bad.payload is None
    assert bad.decode_error is not None
    assert "does not decode" in bad.decode_error
    assert bad.uuid
    assert good.payload is not None
    assert good.payload["OrderId__c"] == "801000000000001AAA"
    assert pubsub.source.counters()["decode_errors"] == 1


def test_a_silent_stall_is_noticed_after_the_keepalive_timeout_and_healed_from_the_last_ack(
    pubsub: Kit, consume: Any
) -> None:
    consumer = consume(pubsub.source, EARLIEST)
    pubsub.publish(["a"])
    consumer.wait_for(1, RECEIVE_TIMEOUT_S)
    stalled_at = time.monotonic()
    pubsub.org.streaming(pubsub_stall=True)
    wait_until(lambda: pubsub.source.stalled)
    noticed_s = time.monotonic() - stalled_at
    pubsub.publish(["b"])
    lifted_at = time.monotonic()
    pubsub.org.streaming(pubsub_stall=False)
    consumer.wait_for(2, RECEIVE_TIMEOUT_S)
    wait_until(lambda: not pubsub.source.stalled)
    healed_s = time.monotonic() - lifted_at
    assert keys(consumer) == ["a", "b"]
    assert pubsub.source.counters()["stalls"] >= 1
    # Noticed once the watchdog's timeout passed since the last response (which may predate the stall
    # by up to one keepalive interval), never before; healed by the first answer after the stall.
    assert KEEPALIVE_TIMEOUT_S - KEEPALIVE_S <= noticed_s < KEEPALIVE_TIMEOUT_S + 2.0
    assert healed_s < KEEPALIVE_TIMEOUT_S + 2.0


def test_permission_denied_names_the_missing_permission_without_spending_a_subscribe(pubsub: Kit) -> None:
    pubsub.org.streaming(pubsub_permission_denied=True)
    assert pubsub.source.topic_info().can_subscribe is False
    with pytest.raises(SalesforceEventPermissionError, match="read access to the Platform Event") as caught:
        next(pubsub.source.batches(LATEST))
    assert "Setting up Salesforce" in str(caught.value)
    assert caught.value.remedy is not None
    assert "grant Read on the Platform Event OrderProvisionRequested__e" in caught.value.remedy
    # GetTopic said so: no Subscribe call was spent on it.
    assert pubsub.org.get("/__admin/stats")["pubsub"]["subscribes"] == 0


def test_stop_before_the_first_response_ends_at_once(pubsub: Kit) -> None:
    done = threading.Event()

    def run() -> None:
        for _ in pubsub.source.batches(LATEST):
            pass
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_until(pubsub.subscribed)
    pubsub.source.stop()
    assert done.wait(STOP_DEADLINE_S)
