"""The Bayeux handling of StreamingClient, against Salesforce faked at the transport layer."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from provisioning.salesforce.errors import (
    SalesforceAuthError,
    SalesforceEventNotFound,
    SalesforceStreamingError,
)
from provisioning.salesforce.events import EARLIEST, LATEST, EventSource, ReplayId
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.salesforce.streaming import (
    DEFAULT_LONG_POLL_S,
    LONG_POLL_MARGIN_S,
    STOP_POLL_INTERVAL_S,
    StreamingClient,
)

from .conftest import int_ids, rid, wait_until
from .fake import CHANNEL, COMETD_PATH, FakeSalesforce


def replay_maps(fake: FakeSalesforce) -> list[Any]:
    return [m["ext"]["replay"] for m in fake.bayeux("/meta/subscribe")]


def test_handshake_asks_for_replay_and_subscribe_keys_the_replay_map_by_the_channel(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(3)
    events = consume(stream, EARLIEST).wait_for(3)
    (handshake,) = fake.bayeux("/meta/handshake")
    assert handshake["ext"] == {"replay": True}
    assert handshake["supportedConnectionTypes"] == ["long-polling"]
    assert replay_maps(fake) == [{CHANNEL: -2}]
    assert int_ids(events) == ids
    assert events[0].payload == {"OrderId__c": "order-0"}
    assert events[0].uuid == fake.events[0]["EventUuid"]
    assert events[0].decode_error is None
    assert events[0].created_at is None  # the fake's payloads carry no CreatedDate
    assert events[0].raw["data"]["schema"] == "s1"
    for request in fake.cometd_requests():
        assert isinstance(request.body, list)
        assert request.headers["Authorization"].startswith("Bearer 00Dfake!")


def test_events_arrive_in_order_across_many_connects(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(35)
    events = consume(stream, EARLIEST).wait_for(35)
    assert int_ids(events) == ids
    assert len(fake.bayeux("/meta/connect")) >= 4
    assert stream.counters()["events"] == 35
    assert stream.last_response_at is not None


def test_connected_means_subscribed(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    assert not stream.connected
    iterator = stream.batches(EARLIEST)
    next(iterator)
    assert stream.connected
    iterator.close()
    assert not stream.connected


def test_latest_delivers_only_events_published_after_subscribing(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(3)
    consumer = consume(stream, LATEST)
    wait_until(lambda: fake.bayeux("/meta/connect"))
    new = fake.publish(2)
    assert int_ids(consumer.wait_for(2)) == new


def test_the_bayeux_browser_cookie_is_sent_back(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    consume(stream, EARLIEST).wait_for(1)
    later = fake.cometd_requests()[1:]
    assert later
    assert all("BAYEUX_BROWSER=b1" in r.headers.get("Cookie", "") for r in later)


def test_the_connect_read_timeout_exceeds_the_advised_long_poll(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(25)
    consume(stream, EARLIEST).wait_for(25)
    connects = [r for r in fake.cometd_requests() if r.body[0]["channel"] == "/meta/connect"]
    assert connects[0].timeout[1] == DEFAULT_LONG_POLL_S + LONG_POLL_MARGIN_S
    assert connects[1].timeout[1] == pytest.approx(fake.long_poll_s + LONG_POLL_MARGIN_S)


def test_unknown_client_handshakes_again_and_resubscribes_after_the_last_acked_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(5)
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(5)
    fake.faults["connect"].append("unknown_client")
    wait_until(lambda: len(replay_maps(fake)) == 2)
    second = fake.publish(5)
    events = consumer.wait_for(10)
    assert int_ids(events) == first + second
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: first[-1]}]
    assert stream.counters.handshakes == 2
    assert stream.counters.reconnects == 1


def test_events_received_but_not_acked_are_fetched_again_after_a_rehandshake(
    stream: StreamingClient, fake: FakeSalesforce
) -> None:
    fake.publish(2)
    fake.batch = 1
    iterator = stream.batches(EARLIEST)
    try:
        first = next(iterator)
        assert first.position is not None
        stream.ack(first.position)
        second = next(iterator)
        fake.faults["connect"].append("unknown_client")
        again = next(iterator)
    finally:
        iterator.close()
    assert again.events == second.events
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: int_ids(list(first.events))[0]}]


def test_a_lost_connect_response_loses_no_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(4)
    fake.faults["connect"].extend(["lost", "reset"])
    events = consume(stream, EARLIEST).wait_for(4)
    assert int_ids(events) == ids
    assert stream.counters.network_errors == 2
    assert replay_maps(fake)[-1] == {CHANNEL: -2}


def test_a_reset_handshake_is_retried(stream: StreamingClient, fake: FakeSalesforce, consume: Any) -> None:
    ids = fake.publish(2)
    fake.faults["handshake"].extend(["reset", "reset"])
    assert int_ids(consume(stream, EARLIEST).wait_for(2)) == ids
    assert stream.counters.network_errors == 2
    assert stream.counters.handshakes == 1


def test_authentication_invalid_gets_a_new_token_then_handshakes_and_resubscribes(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(3)
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(3)
    fake.revoke_tokens()
    fake.faults["connect"].append("auth")
    wait_until(lambda: len(fake.bayeux("/meta/handshake")) == 2)
    second = fake.publish(3)
    events = consumer.wait_for(6)
    assert int_ids(events) == first + second
    assert fake.logins == 2
    assert stream.counters.auth_renewals == 1
    tokens = [
        r.headers["Authorization"]
        for r in fake.cometd_requests()
        if r.body[0]["channel"] == "/meta/handshake"
    ]
    assert len(set(tokens)) == 2


def test_a_refused_login_ends_the_iteration_with_an_auth_error(
    stream: StreamingClient, fake: FakeSalesforce
) -> None:
    fake.login_error = (
        400,
        {"error": "invalid_grant", "error_description": "user hasn't approved this consumer"},
    )
    with pytest.raises(SalesforceAuthError, match="pre-authorized"):
        next(stream.batches(LATEST))


@pytest.mark.parametrize(("fallback", "expected"), [(EARLIEST, [3, 4]), (LATEST, [5])])
def test_a_replay_id_too_old_falls_back_and_logs_one_error_line(
    auth: Any,
    session: Any,
    fake: FakeSalesforce,
    consume: Any,
    log_lines: Any,
    fallback: Any,
    expected: list[int],
) -> None:
    stream = StreamingClient(
        auth=auth,
        session=session,
        api_version="64.0",
        channel=CHANNEL,
        replay_fallback=fallback,
        reconnect=ReconnectPolicy(base_s=0.01),
    )
    ids = fake.publish(5)
    fake.retained_from = 3
    consumer = consume(stream, rid(ids[0]))
    if fallback is LATEST:
        wait_until(lambda: fake.bayeux("/meta/connect"))
        ids += fake.publish(1)
    events = consumer.wait_for(len(expected))
    assert int_ids(events) == [ids[i] for i in expected]
    fallback_id = -1 if fallback is LATEST else -2
    assert replay_maps(fake) == [{CHANNEL: ids[0]}, {CHANNEL: fallback_id}]
    assert stream.counters.replay_fallbacks == 1
    fake.faults["connect"].append("unknown_client")
    wait_until(lambda: len(replay_maps(fake)) == 3)
    ids += fake.publish(1)
    consumer.wait_for(len(expected) + 1)
    errors = log_lines.at("error")
    assert len(errors) == 1
    assert errors[0]["channel"] == CHANNEL
    assert errors[0]["replay_id"] == ids[0]
    assert errors[0]["fallback"] == fallback_id
    assert errors[0]["fallback_name"] == fallback.value
    assert replay_maps(fake)[-1] == {CHANNEL: int_ids(consumer.events)[-2]}


def test_a_subscription_refused_for_good_raises(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.faults["subscribe"].append("denied")
    with pytest.raises(SalesforceStreamingError, match="403::Unknown channel"):
        next(stream.batches(LATEST))


def test_a_channel_the_org_does_not_have_raises_not_found_with_the_remedy_after_one_subscribe(
    stream: StreamingClient, fake: FakeSalesforce, log_lines: Any
) -> None:
    fake.faults["subscribe"].append("no_such_channel")
    with pytest.raises(SalesforceEventNotFound, match="does not exist") as caught:
        next(stream.batches(LATEST))
    assert caught.value.remedy is not None
    assert "deploy the Platform Event OrderProvisionRequested__e" in caught.value.remedy
    assert "SF_PROVISION_EVENT_CHANNEL" in caught.value.remedy
    assert len(fake.bayeux("/meta/subscribe")) == 1
    # An iteration that never subscribed says nothing of its own: the caller logs the refusal.
    assert log_lines.named("streaming_stopped") == []


def test_a_subscription_failing_with_a_server_error_is_retried(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(1)
    fake.faults["subscribe"].append("unavailable")
    assert int_ids(consume(stream, EARLIEST).wait_for(1)) == ids
    assert stream.counters.handshakes == 2
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: -2}]


def test_the_daily_limit_keeps_the_client_down_then_it_resumes(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(2)
    fake.faults["connect"].extend(["daily_limit", "daily_limit"])
    events = consume(stream, EARLIEST).wait_for(2)
    assert int_ids(events) == first
    assert stream.counters.delivery_limit_backoffs == 2
    channels = [r.body[0]["channel"] for r in fake.cometd_requests()]
    assert channels[:8] == ["/meta/handshake", "/meta/subscribe", "/meta/connect"] * 2 + [
        "/meta/handshake",
        "/meta/subscribe",
    ]


def test_an_event_without_a_replay_id_is_counted_and_skipped(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    fake.events.append({"replayId": None, "EventUuid": "x", "payload": {}})
    ids = fake.publish(1)
    events = consume(stream, EARLIEST).wait_for(2)
    assert int_ids(events)[1] == ids[0]
    assert stream.counters.malformed_events == 1


def test_stop_from_another_thread_ends_a_held_long_poll(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.hold = threading.Event()
    consumer = consume(stream, LATEST)
    assert fake.holding.wait(5)
    stream.stop()
    consumer.thread.join(1.0)
    assert not consumer.thread.is_alive()
    assert consumer.error is None
    assert STOP_POLL_INTERVAL_S < 1.0


def test_a_disconnect_is_sent_when_the_iteration_ends(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    iterator = stream.batches(EARLIEST)
    next(iterator)
    iterator.close()
    wait_until(lambda: fake.bayeux("/meta/disconnect"))
    assert fake.bayeux("/meta/disconnect")[0]["clientId"] == fake.bayeux("/meta/subscribe")[0]["clientId"]


def test_a_restart_resumes_after_the_last_acked_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(5)
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(5)
    consumer.stop()
    assert stream.last_acked == rid(first[-1])
    second = fake.publish(3)
    restarted = consume(stream, stream.last_acked)
    assert int_ids(restarted.wait_for(3)) == second
    assert replay_maps(fake)[-1] == {CHANNEL: first[-1]}


def test_stop_before_iterating_ends_the_next_iteration_only(
    stream: StreamingClient, fake: FakeSalesforce
) -> None:
    fake.publish(1)
    stream.stop()
    assert list(stream.batches(EARLIEST)) == []
    iterator = stream.batches(EARLIEST)
    assert int_ids(list(next(iterator).events)) == [fake.events[0]["replayId"]]
    iterator.close()


def test_one_client_iterates_once_at_a_time(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    iterator = stream.batches(EARLIEST)
    next(iterator)
    with pytest.raises(RuntimeError, match="already iterating"):
        next(stream.batches(EARLIEST))
    iterator.close()


def test_the_fallback_must_be_a_preset(stream: StreamingClient) -> None:
    with pytest.raises(ValueError, match="LATEST"):
        StreamingClient(
            auth=stream._auth,
            session=stream._session,
            api_version="64.0",
            channel=CHANNEL,
            replay_fallback=1234,
        )


def test_one_batch_holds_the_events_of_one_connect_reply_and_ends_at_the_last(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(25)
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(25)
    assert [len(b) for b in consumer.batches] == [10, 10, 5]
    assert [b.position for b in consumer.batches] == [rid(ids[9]), rid(ids[19]), rid(ids[24])]
    assert stream.counters()["batches"] == 3
    assert stream.transport == "cometd"
    assert isinstance(stream, EventSource)


def test_a_stored_replay_id_is_a_cometd_one_and_a_pubsub_one_is_refused_never_converted(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(3)
    assert int_ids(consume(stream, rid(ids[0])).wait_for(2)) == ids[1:]
    assert replay_maps(fake) == [{CHANNEL: ids[0]}]
    pubsub_id = ReplayId.parse("00000000000018af", "pubsub")
    with pytest.raises(ValueError, match="not a CometD replay id"):
        stream.batches(pubsub_id)
    with pytest.raises(ValueError, match="Pub/Sub replay id cannot start a CometD subscription"):
        stream.ack(pubsub_id)


def test_a_payload_that_is_not_an_object_is_delivered_with_a_decode_error(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    fake.events.append({"replayId": 9999, "EventUuid": "u-1", "payload": "not an object"})
    events = consume(stream, EARLIEST).wait_for(2)
    assert events[1].payload is None
    assert events[1].decode_error == "the payload is a str, not a JSON object"
    assert events[1].uuid == "u-1"
    assert stream.counters()["decode_errors"] == 1


def test_a_connect_that_outlives_the_long_poll_is_a_stall_healed_by_a_new_handshake(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import provisioning.salesforce.streaming as streaming

    monkeypatch.setattr(streaming, "LONG_POLL_MARGIN_S", 0.2)
    monkeypatch.setattr(streaming, "DEFAULT_LONG_POLL_S", 0.2)
    first = fake.publish(1)
    consumer = consume(stream, EARLIEST)
    consumer.wait_for(1)
    fake.hold = threading.Event()
    wait_until(lambda: stream.stalled)
    assert stream.counters()["stalls"] >= 1
    fake.hold.set()
    fake.hold = None
    second = fake.publish(1)
    assert int_ids(consumer.wait_for(2)) == first + second
    wait_until(lambda: not stream.stalled)
    assert replay_maps(fake)[-1] == {CHANNEL: first[0]}


def test_no_request_goes_anywhere_but_the_cometd_endpoint_and_the_login(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    consume(stream, EARLIEST).wait_for(1)
    assert {s.path for s in fake.seen} == {COMETD_PATH, "/services/oauth2/token"}
