"""The Bayeux handling of StreamingClient, against Salesforce faked at the transport layer."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from provisioning.salesforce.errors import SalesforceAuthError, SalesforceStreamingError
from provisioning.salesforce.streaming import (
    DEFAULT_LONG_POLL_S,
    LONG_POLL_MARGIN_S,
    STOP_POLL_INTERVAL_S,
    StreamingClient,
)

from .conftest import wait_until
from .fake import CHANNEL, COMETD_PATH, FakeSalesforce


def replay_maps(fake: FakeSalesforce) -> list[Any]:
    return [m["ext"]["replay"] for m in fake.bayeux("/meta/subscribe")]


def test_handshake_asks_for_replay_and_subscribe_keys_the_replay_map_by_the_channel(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(3)
    events = consume(stream, -2).wait_for(3)
    (handshake,) = fake.bayeux("/meta/handshake")
    assert handshake["ext"] == {"replay": True}
    assert handshake["supportedConnectionTypes"] == ["long-polling"]
    assert replay_maps(fake) == [{CHANNEL: -2}]
    assert [e.replay_id for e in events] == ids
    assert events[0].payload == {"OrderId__c": "order-0"}
    assert events[0].uuid == fake.events[0]["EventUuid"]
    assert events[0].channel == CHANNEL
    assert events[0].raw["data"]["schema"] == "s1"
    for request in fake.cometd_requests():
        assert isinstance(request.body, list)
        assert request.headers["Authorization"].startswith("Bearer 00Dfake!")


def test_events_arrive_in_order_across_many_connects(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(35)
    events = consume(stream, -2).wait_for(35)
    assert [e.replay_id for e in events] == ids
    assert len(fake.bayeux("/meta/connect")) >= 4
    assert stream.counters.events == 35
    assert stream.last_connected_at is not None


def test_connected_means_subscribed(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    assert not stream.connected
    iterator = stream.events(-2)
    next(iterator)
    assert stream.connected
    iterator.close()
    assert not stream.connected


def test_latest_delivers_only_events_published_after_subscribing(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(3)
    consumer = consume(stream, -1)
    wait_until(lambda: fake.bayeux("/meta/connect"))
    new = fake.publish(2)
    assert [e.replay_id for e in consumer.wait_for(2)] == new


def test_the_bayeux_browser_cookie_is_sent_back(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    consume(stream, -2).wait_for(1)
    later = fake.cometd_requests()[1:]
    assert later
    assert all("BAYEUX_BROWSER=b1" in r.headers.get("Cookie", "") for r in later)


def test_the_connect_read_timeout_exceeds_the_advised_long_poll(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(25)
    consume(stream, -2).wait_for(25)
    connects = [r for r in fake.cometd_requests() if r.body[0]["channel"] == "/meta/connect"]
    assert connects[0].timeout[1] == DEFAULT_LONG_POLL_S + LONG_POLL_MARGIN_S
    assert connects[1].timeout[1] == pytest.approx(fake.long_poll_s + LONG_POLL_MARGIN_S)


def test_unknown_client_handshakes_again_and_resubscribes_after_the_last_acked_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(5)
    consumer = consume(stream, -2)
    consumer.wait_for(5)
    fake.faults["connect"].append("unknown_client")
    wait_until(lambda: len(replay_maps(fake)) == 2)
    second = fake.publish(5)
    events = consumer.wait_for(10)
    assert [e.replay_id for e in events] == first + second
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: first[-1]}]
    assert stream.counters.handshakes == 2
    assert stream.counters.reconnects == 1


def test_events_received_but_not_acked_are_fetched_again_after_a_rehandshake(
    stream: StreamingClient, fake: FakeSalesforce
) -> None:
    fake.publish(2)
    iterator = stream.events(-2)
    try:
        first = next(iterator)
        stream.ack(first.replay_id)
        second = next(iterator)
        fake.faults["connect"].append("unknown_client")
        again = next(iterator)
    finally:
        iterator.close()
    assert again.replay_id == second.replay_id
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: first.replay_id}]


def test_a_lost_connect_response_loses_no_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(4)
    fake.faults["connect"].extend(["lost", "reset"])
    events = consume(stream, -2).wait_for(4)
    assert [e.replay_id for e in events] == ids
    assert stream.counters.network_errors == 2
    assert replay_maps(fake)[-1] == {CHANNEL: -2}


def test_a_reset_handshake_is_retried(stream: StreamingClient, fake: FakeSalesforce, consume: Any) -> None:
    ids = fake.publish(2)
    fake.faults["handshake"].extend(["reset", "reset"])
    assert [e.replay_id for e in consume(stream, -2).wait_for(2)] == ids
    assert stream.counters.network_errors == 2
    assert stream.counters.handshakes == 1


def test_authentication_invalid_gets_a_new_token_then_handshakes_and_resubscribes(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(3)
    consumer = consume(stream, -2)
    consumer.wait_for(3)
    fake.revoke_tokens()
    fake.faults["connect"].append("auth")
    wait_until(lambda: len(fake.bayeux("/meta/handshake")) == 2)
    second = fake.publish(3)
    events = consumer.wait_for(6)
    assert [e.replay_id for e in events] == first + second
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
        next(stream.events(-1))


@pytest.mark.parametrize(("fallback", "expected"), [(-2, [3, 4]), (-1, [5])])
def test_a_replay_id_too_old_falls_back_and_logs_one_error_line(
    auth: Any,
    session: Any,
    fake: FakeSalesforce,
    consume: Any,
    log_lines: Any,
    fallback: int,
    expected: list[int],
) -> None:
    stream = StreamingClient(
        auth=auth,
        session=session,
        api_version="64.0",
        channel=CHANNEL,
        replay_fallback=fallback,
        backoff_base_s=0.01,
    )
    ids = fake.publish(5)
    fake.retained_from = 3
    consumer = consume(stream, ids[0])
    if fallback == -1:
        wait_until(lambda: fake.bayeux("/meta/connect"))
        ids += fake.publish(1)
    events = consumer.wait_for(len(expected))
    assert [e.replay_id for e in events] == [ids[i] for i in expected]
    assert replay_maps(fake) == [{CHANNEL: ids[0]}, {CHANNEL: fallback}]
    assert stream.counters.replay_fallbacks == 1
    fake.faults["connect"].append("unknown_client")
    wait_until(lambda: len(replay_maps(fake)) == 3)
    ids += fake.publish(1)
    consumer.wait_for(len(expected) + 1)
    errors = log_lines.at("error")
    assert len(errors) == 1
    assert errors[0]["channel"] == CHANNEL
    assert errors[0]["replay_id"] == ids[0]
    assert errors[0]["fallback"] == fallback
    assert replay_maps(fake)[-1] == {CHANNEL: consumer.events[-2].replay_id}


def test_a_subscription_refused_for_good_raises(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.faults["subscribe"].append("denied")
    with pytest.raises(SalesforceStreamingError, match="403::Unknown channel"):
        next(stream.events(-1))


def test_a_subscription_failing_with_a_server_error_is_retried(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    ids = fake.publish(1)
    fake.faults["subscribe"].append("unavailable")
    assert [e.replay_id for e in consume(stream, -2).wait_for(1)] == ids
    assert stream.counters.handshakes == 2
    assert replay_maps(fake) == [{CHANNEL: -2}, {CHANNEL: -2}]


def test_the_daily_limit_keeps_the_client_down_then_it_resumes(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(2)
    fake.faults["connect"].extend(["daily_limit", "daily_limit"])
    events = consume(stream, -2).wait_for(2)
    assert [e.replay_id for e in events] == first
    assert stream.counters.daily_limit_backoffs == 2
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
    events = consume(stream, -2).wait_for(2)
    assert events[1].replay_id == ids[0]
    assert stream.counters.malformed_events == 1


def test_stop_from_another_thread_ends_a_held_long_poll(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.hold = threading.Event()
    consumer = consume(stream, -1)
    assert fake.holding.wait(5)
    stream.stop()
    consumer.thread.join(1.0)
    assert not consumer.thread.is_alive()
    assert consumer.error is None
    assert STOP_POLL_INTERVAL_S < 1.0


def test_a_disconnect_is_sent_when_the_iteration_ends(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    iterator = stream.events(-2)
    next(iterator)
    iterator.close()
    wait_until(lambda: fake.bayeux("/meta/disconnect"))
    assert fake.bayeux("/meta/disconnect")[0]["clientId"] == fake.bayeux("/meta/subscribe")[0]["clientId"]


def test_a_restart_resumes_after_the_last_acked_event(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    first = fake.publish(5)
    consumer = consume(stream, -2)
    consumer.wait_for(5)
    consumer.stop()
    assert stream.last_acked == first[-1]
    second = fake.publish(3)
    restarted = consume(stream, stream.last_acked)
    assert [e.replay_id for e in restarted.wait_for(3)] == second
    assert replay_maps(fake)[-1] == {CHANNEL: first[-1]}


def test_stop_before_iterating_ends_the_next_iteration_only(
    stream: StreamingClient, fake: FakeSalesforce
) -> None:
    fake.publish(1)
    stream.stop()
    assert list(stream.events(-2)) == []
    iterator = stream.events(-2)
    assert next(iterator).replay_id == fake.events[0]["replayId"]
    iterator.close()


def test_one_client_iterates_once_at_a_time(stream: StreamingClient, fake: FakeSalesforce) -> None:
    fake.publish(1)
    iterator = stream.events(-2)
    next(iterator)
    with pytest.raises(RuntimeError, match="already iterating"):
        next(stream.events(-2))
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


def test_no_request_goes_anywhere_but_the_cometd_endpoint_and_the_login(
    stream: StreamingClient, fake: FakeSalesforce, consume: Any
) -> None:
    fake.publish(1)
    consume(stream, -2).wait_for(1)
    assert {s.path for s in fake.seen} == {COMETD_PATH, "/services/oauth2/token"}
