"""PubSubClient against a scripted in-process gRPC server over TLS (and the JWT login faked at HTTP).

Salesforce's own behaviour is exercised against the sandbox in test_event_sources.py; these
tests cover the client's handling of what that server does not do on demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.errors import (
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceEventNotFound,
    SalesforceEventPermissionError,
    SalesforceStreamingError,
)
from provisioning.salesforce.events import EARLIEST, LATEST, Batch, EventSource, ReplayId, Transport
from provisioning.salesforce.pubsub import PubSubClient
from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.sandbox.common import SandboxTLS

from .conftest import FAST_RECONNECT, wait_until
from .fake import INSTANCE_URL, FakeSalesforce
from .pubsub_fake import CREATED_MS, SCHEMA_ID, FakePubSub, event, respond, serve

TOPIC = "/event/OrderProvisionRequested__e"


def pid(number: int) -> ReplayId:
    """The fake server's replay id ``number`` as the client hands it out (8 bytes, like the sandbox's)."""
    return ReplayId(Transport.PUBSUB, number.to_bytes(8, "big"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("pubsub-tls"))


@pytest.fixture
def server(tls: SandboxTLS) -> Iterator[FakePubSub]:
    fake = FakePubSub(tls)
    yield fake
    fake.stop()


@pytest.fixture
def make(auth: JWTBearerAuth, server: FakePubSub, tls: SandboxTLS) -> Iterator[Callable[..., PubSubClient]]:
    made: list[PubSubClient] = []

    def build(**options: Any) -> PubSubClient:
        options = {
            "auth": auth,
            "endpoint": server.endpoint,
            "topic": TOPIC,
            "ca_bundle": tls.ca_bundle,
            "reconnect": FAST_RECONNECT,
            **options,
        }
        client = PubSubClient(**options)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


def first_batches(client: PubSubClient, start: Any, count: int) -> list[Batch]:
    """The first ``count`` batches (acking each), then stop."""
    got: list[Batch] = []
    iterator = client.batches(start)
    try:
        for batch in iterator:
            got.append(batch)
            if batch.position is not None:
                client.ack(batch.position)
            if len(got) == count:
                break
    finally:
        iterator.close()
    return got


def test_the_first_request_names_topic_start_and_batch_size_and_every_call_carries_the_auth_metadata(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 11))))
    client = make(batch_size=7)
    (batch,) = first_batches(client, EARLIEST, 1)
    (call,) = server.calls
    first = call.requests[0]
    assert (first.topic_name, first.replay_preset, first.replay_id, first.num_requested) == (
        TOPIC,
        pb.EARLIEST,
        b"",
        7,
    )
    assert call.metadata["accesstoken"].startswith("00Dfake!token-")
    assert call.metadata["instanceurl"] == INSTANCE_URL
    assert call.metadata["tenantid"] == "00Dfake"
    assert isinstance(client, EventSource)
    assert batch.position == pid(11)


def test_a_stored_replay_id_is_sent_unchanged_with_the_custom_preset(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    stored = ReplayId.parse("00ff00ee00dd00cc99", "pubsub")
    server.scripts.append(serve(respond(event("a", 12))))
    first_batches(make(), stored, 1)
    first = server.calls[0].requests[0]
    assert (first.replay_preset, first.replay_id) == (pb.CUSTOM, bytes.fromhex("00ff00ee00dd00cc99"))


def test_a_cometd_replay_id_is_refused_never_converted(make: Callable[..., PubSubClient]) -> None:
    client = make()
    with pytest.raises(ValueError, match="CometD replay id cannot start a Pub/Sub subscription"):
        client.batches(ReplayId.cometd(8230))
    with pytest.raises(ValueError, match="CometD replay id cannot start a Pub/Sub subscription"):
        client.ack(ReplayId.cometd(8230))


def test_latest_is_the_latest_preset(make: Callable[..., PubSubClient], server: FakePubSub) -> None:
    server.scripts.append(serve(respond(event("a", 12))))
    first_batches(make(), LATEST, 1)
    assert server.calls[0].requests[0].replay_preset == pb.LATEST


def test_decoded_events_carry_uuid_payload_and_created_at_and_keep_raw_out_of_reprs(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 11), event("b", 14))))
    (batch,) = first_batches(make(), EARLIEST, 1)
    first = batch.events[0]
    assert first.uuid == "uuid-a"
    assert first.payload == {
        "CreatedDate": CREATED_MS,
        "CreatedById": "005000000000001",
        "OrderId__c": "801",
        "IdemKey__c": "a",
    }
    assert first.created_at == CREATED_MS / 1000
    assert first.decode_error is None
    assert isinstance(first.raw, pb.ConsumerEvent)
    assert "raw" not in repr(first)
    assert [e.replay_id for e in batch.events] == [pid(11), pid(14)]


def test_a_schema_is_fetched_once_per_schema_id(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 1), pending=5), respond(event("b", 2), event("c", 3))))
    client = make()
    batches = first_batches(client, EARLIEST, 2)
    assert sum(len(b) for b in batches) == 3
    assert server.schema_requests == [SCHEMA_ID]
    assert client.counters()["schema_fetches"] == 1


def test_an_unknown_schema_id_becomes_a_decode_error_and_the_stream_goes_on(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 1, schema_id="gone"), event("b", 2))))
    client = make()
    (batch,) = first_batches(client, EARLIEST, 1)
    bad, good = batch.events
    assert bad.payload is None
    assert bad.decode_error is not None
    assert "schema gone is not available" in bad.decode_error
    assert good.payload is not None
    assert good.payload["IdemKey__c"] == "b"
    assert client.counters()["decode_errors"] == 1


def test_a_payload_that_does_not_decode_is_delivered_with_the_reason(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 1, body=b"\x80"))))
    (batch,) = first_batches(make(), EARLIEST, 1)
    (bad,) = batch.events
    assert bad.payload is None
    assert bad.decode_error is not None
    assert bad.decode_error.startswith(f"the payload does not decode with schema {SCHEMA_ID}")
    assert batch.position == pid(1)


def test_a_schema_fetch_that_fails_transiently_resubscribes_and_the_batch_comes_again(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.schema_errors.append(grpc.StatusCode.UNAVAILABLE)
    server.scripts.extend([serve(respond(event("a", 1))), serve(respond(event("a", 1)))])
    client = make()
    (batch,) = first_batches(client, EARLIEST, 1)
    assert batch.events[0].payload is not None
    assert len(server.calls) == 2
    assert server.calls[1].requests[0].replay_preset == pb.EARLIEST
    assert client.counters()["network_errors"] == 1


def test_a_new_request_is_sent_only_when_the_server_owes_nothing(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(serve(respond(event("a", 1), pending=1), respond(event("b", 2), pending=0)))
    client = make(batch_size=2)
    iterator = client.batches(EARLIEST)
    try:
        next(iterator)
        time.sleep(0.2)
        assert len(server.calls[0].requests) == 1  # 1 event still owed: nothing asked
        next(iterator)
        wait_until(lambda: len(server.calls[0].requests) == 2)
    finally:
        iterator.close()
    assert [r.num_requested for r in server.calls[0].requests] == [2, 2]
    assert server.calls[0].requests[1].topic_name == ""


def test_a_stale_keepalive_saying_nothing_is_owed_does_not_double_the_request(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(
        serve(respond(event("a", 1)), respond(latest=1, pending=0), respond(latest=1, pending=0))
    )
    client = make(batch_size=1)
    iterator = client.batches(EARLIEST)
    try:
        for _ in range(3):
            batch = next(iterator)
            if batch.position is not None:
                client.ack(batch.position)
        # The stream stays open while we look: closing it could drop a request still on its way.
        wait_until(lambda: len(server.calls[0].requests) >= 2)
        time.sleep(0.2)  # room for a wrongly doubled request to arrive
        assert [r.num_requested for r in server.calls[0].requests] == [1, 1]
    finally:
        iterator.close()


@pytest.mark.parametrize(
    ("then", "code"),
    [
        ("end", grpc.StatusCode.OK),
        ("abort", grpc.StatusCode.INTERNAL),
        ("abort", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a_stream_that_ends_or_resets_is_resubscribed_from_the_last_ack(
    make: Callable[..., PubSubClient], server: FakePubSub, then: str, code: grpc.StatusCode
) -> None:
    server.scripts.extend(
        [serve(respond(event("a", 21)), then=then, code=code), serve(respond(event("b", 25)))]
    )
    client = make()
    batches = first_batches(client, LATEST, 2)
    assert [e.payload["IdemKey__c"] for b in batches for e in b.events if e.payload] == ["a", "b"]
    second = server.calls[1].requests[0]
    assert (second.replay_preset, second.replay_id) == (pb.CUSTOM, (21).to_bytes(8, "big"))
    assert client.counters()["reconnects"] == 1
    assert client.counters()["network_errors"] == 1
    # The topic is asked about once per iteration, not again on each reconnect.
    assert server.topic_requests == [TOPIC]


def test_the_delivery_limit_keeps_the_client_away_for_its_backoff(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.extend(
        [
            serve(
                then="abort",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                error_code="sfdc.platform.eventbus.grpc.subscription.limit.exceeded",
            ),
            serve(respond(event("a", 1))),
        ]
    )
    client = make(reconnect=ReconnectPolicy(base_s=0.01, cap_s=0.05, delivery_limit_wait_s=0.4))
    started = time.monotonic()
    first_batches(client, EARLIEST, 1)
    assert time.monotonic() - started >= 0.4
    assert client.counters()["delivery_limit_backoffs"] == 1


def test_a_latest_start_with_no_position_at_all_resubscribes_from_the_fallback_never_latest(
    make: Callable[..., PubSubClient], server: FakePubSub, log_lines: Any
) -> None:
    server.scripts.extend([serve(then="abort"), serve(respond(event("a", 3)))])
    client = make(replay_fallback=EARLIEST)
    first_batches(client, LATEST, 1)
    assert [c.requests[0].replay_preset for c in server.calls] == [pb.LATEST, pb.EARLIEST]
    assert client.counters()["unanchored_resubscribes"] == 1
    assert "pubsub_resubscribe_without_position" in [line["event"] for line in log_lines.at("warning")]


def test_a_keepalive_anchors_a_latest_start(make: Callable[..., PubSubClient], server: FakePubSub) -> None:
    server.scripts.extend(
        [serve(respond(latest=40, pending=3), then="abort"), serve(respond(event("a", 42)))]
    )
    client = make()
    batches = first_batches(client, LATEST, 2)
    assert batches[0].events == ()
    assert batches[0].position == pid(40)
    second = server.calls[1].requests[0]
    assert (second.replay_preset, second.replay_id) == (pb.CUSTOM, (40).to_bytes(8, "big"))


def test_an_invalid_replay_answer_to_a_preset_is_a_permanent_error(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.scripts.append(
        serve(
            then="abort",
            code=grpc.StatusCode.INVALID_ARGUMENT,
            error_code="sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted",
        )
    )
    with pytest.raises(SalesforceStreamingError, match="refused the replay preset EARLIEST"):
        first_batches(make(), EARLIEST, 1)


@pytest.mark.parametrize(
    ("code", "error_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "sfdc.platform.eventbus.grpc.subscription.fetch.topic.mismatch"),
        (grpc.StatusCode.NOT_FOUND, "sfdc.platform.eventbus.grpc.topic.not.found"),
    ],
)
def test_a_refusal_retrying_cannot_fix_raises_with_the_salesforce_error_code(
    make: Callable[..., PubSubClient], server: FakePubSub, code: grpc.StatusCode, error_code: str
) -> None:
    server.scripts.append(serve(then="abort", code=code, error_code=error_code))
    with pytest.raises(SalesforceStreamingError) as caught:
        first_batches(make(), EARLIEST, 1)
    assert caught.value.error_code == error_code
    assert code.name in str(caught.value)
    assert len(server.calls) == 1


def test_a_topic_the_org_does_not_have_raises_not_found_with_the_remedy_before_any_subscribe(
    make: Callable[..., PubSubClient], server: FakePubSub, log_lines: Any
) -> None:
    server.topic_answers.append("not_found")
    with pytest.raises(SalesforceEventNotFound, match="NOT_FOUND") as caught:
        first_batches(make(), LATEST, 1)
    assert caught.value.error_code == "sfdc.platform.eventbus.grpc.topic.not.found"
    assert caught.value.remedy is not None
    assert "deploy the Platform Event OrderProvisionRequested__e" in caught.value.remedy
    assert server.calls == []
    assert log_lines.named("pubsub_stopped") == []


def test_get_topic_saying_cannot_subscribe_raises_the_permission_error_before_any_subscribe(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    server.topic_answers.append("cannot_subscribe")
    with pytest.raises(SalesforceEventPermissionError, match="can_subscribe is false") as caught:
        first_batches(make(), LATEST, 1)
    assert caught.value.remedy is not None
    assert "grant Read on the Platform Event OrderProvisionRequested__e" in caught.value.remedy
    assert server.calls == []


def test_permission_denied_on_subscribe_raises_with_the_code_and_the_remedy(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    cannot = "sfdc.platform.eventbus.grpc.subscription.topic.cannot.subscribe"
    server.scripts.append(serve(then="abort", code=grpc.StatusCode.PERMISSION_DENIED, error_code=cannot))
    with pytest.raises(SalesforceEventPermissionError, match="read access to the Platform Event") as caught:
        first_batches(make(), LATEST, 1)
    assert caught.value.error_code == cannot
    assert caught.value.remedy is not None
    assert "permission set" in caught.value.remedy
    assert len(server.calls) == 1


def test_unauthenticated_renews_the_token_each_time(
    make: Callable[..., PubSubClient], server: FakePubSub, fake: FakeSalesforce
) -> None:
    auth_error = "sfdc.platform.eventbus.grpc.service.auth.error"
    server.scripts.extend(
        [
            serve(then="abort", code=grpc.StatusCode.UNAUTHENTICATED, error_code=auth_error),
            serve(then="abort", code=grpc.StatusCode.UNAUTHENTICATED, error_code=auth_error),
            serve(respond(event("a", 1))),
        ]
    )
    client = make()
    first_batches(client, EARLIEST, 1)
    tokens = [c.metadata["accesstoken"] for c in server.calls]
    assert len(set(tokens)) == 3
    assert fake.logins == 3
    assert client.counters()["auth_renewals"] == 2


def test_a_login_answer_without_an_identity_url_is_refused_clearly(
    make: Callable[..., PubSubClient], fake: FakeSalesforce
) -> None:
    fake.login_error = (200, {"access_token": "00Dfake!x", "instance_url": INSTANCE_URL})
    with pytest.raises(SalesforceAuthError, match="tenantid is unknown"):
        first_batches(make(), EARLIEST, 1)


def test_get_topic_reports_what_the_server_says(make: Callable[..., PubSubClient]) -> None:
    info = make().topic_info()
    assert (info.topic_name, info.tenant_guid, info.can_subscribe, info.schema_id) == (
        TOPIC,
        "00Dfake",
        True,
        SCHEMA_ID,
    )


def test_the_ca_bundle_decides_whom_the_client_trusts(
    auth: JWTBearerAuth, server: FakePubSub, make: Callable[..., PubSubClient]
) -> None:
    untrusting = PubSubClient(auth=auth, endpoint=server.endpoint, topic=TOPIC, ca_bundle=None)
    try:
        with pytest.raises(SalesforceConnectionError, match="UNAVAILABLE"):
            untrusting.topic_info()
    finally:
        untrusting.close()
    assert make().topic_info().topic_name == TOPIC


def test_stop_cancels_a_call_waiting_for_its_first_response(
    make: Callable[..., PubSubClient], server: FakePubSub
) -> None:
    client = make()
    done = threading.Event()

    def run() -> None:
        for _ in client.batches(LATEST):
            pass
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_until(lambda: server.calls)
    started = time.monotonic()
    client.stop()
    assert done.wait(1.0)
    assert time.monotonic() - started < 0.5
    assert not client.connected


def test_the_client_repr_names_no_secret(make: Callable[..., PubSubClient], tmp_path: Path) -> None:
    client = make()
    client.topic_info()
    assert "00Dfake!" not in repr(client)
    assert repr(client) == f"PubSubClient(endpoint={client.endpoint!r}, topic={TOPIC!r})"


def test_a_second_iteration_at_once_is_refused(make: Callable[..., PubSubClient], server: FakePubSub) -> None:
    server.scripts.append(serve(respond(event("a", 1))))
    client = make()
    iterator = client.batches(EARLIEST)
    next(iterator)
    with pytest.raises(RuntimeError, match="already iterating"):
        next(client.batches(EARLIEST))
    iterator.close()
