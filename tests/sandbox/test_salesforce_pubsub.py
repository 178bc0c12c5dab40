"""The simulator's Pub/Sub API, spoken to with a raw gRPC stub: Salesforce's documented behaviour."""

from __future__ import annotations

import io
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import fastavro
import grpc
import pytest

from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.sandbox.salesforce.driver import SalesforceDriver

from .conftest import StartSalesforce

TOPIC = "/event/OrderProvisionRequested__e"
ORDER_ID = "801000000000001AAA"
# Answers from a local server come at once; this only guards against a hang.
RESPONSE_TIMEOUT_S = 10.0


class Stream:
    """One raw Subscribe call: FetchRequests in through a queue, FetchResponses read on demand."""

    def __init__(self, stub: Any, metadata: Any, first: pb.FetchRequest) -> None:
        self.outbox: queue.SimpleQueue[pb.FetchRequest | None] = queue.SimpleQueue()
        self.outbox.put(first)
        self.call = stub.Subscribe(self._requests(), metadata=metadata)
        self.responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[pb.FetchRequest]:
        while (request := self.outbox.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
            self.responses.put("end")
        except grpc.RpcError as exc:
            self.responses.put(exc)

    def request(self, n: int) -> None:
        self.outbox.put(pb.FetchRequest(num_requested=n))

    def next(self, timeout: float = RESPONSE_TIMEOUT_S) -> Any:
        item = self.responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def events(self, count: int) -> list[pb.ConsumerEvent]:
        got: list[pb.ConsumerEvent] = []
        while len(got) < count:
            got += self.next().events
        return got

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()


@pytest.fixture
def sf(start_sf: StartSalesforce) -> SalesforceDriver:
    return start_sf(pubsub_keepalive_s=0.3)


@pytest.fixture
def stub(sf: SalesforceDriver) -> Any:
    return sf.pubsub_stub()


@pytest.fixture
def md(sf: SalesforceDriver) -> Any:
    return sf.pubsub_metadata()


@pytest.fixture
def open_stream(stub: Any, md: Any) -> Iterator[Any]:
    streams: list[Stream] = []

    def start(
        preset: int = pb.EARLIEST, n: int = 100, replay_id: bytes = b"", metadata: Any = None
    ) -> Stream:
        first = pb.FetchRequest(topic_name=TOPIC, replay_preset=preset, replay_id=replay_id, num_requested=n)
        stream = Stream(stub, metadata or md, first)
        streams.append(stream)
        return stream

    yield start
    for stream in streams:
        stream.close()


def publish(sf: SalesforceDriver, keys: list[str], **fields: Any) -> list[int]:
    return sf.publish([{"OrderId__c": ORDER_ID, "IdemKey__c": k, **fields} for k in keys])


def decode(stub: Any, md: Any, consumer: pb.ConsumerEvent) -> dict[str, Any]:
    info = stub.GetSchema(pb.SchemaRequest(schema_id=consumer.event.schema_id), metadata=md)
    record = fastavro.schemaless_reader(
        io.BytesIO(consumer.event.payload), fastavro.parse_schema(json.loads(info.schema_json)), None
    )
    assert isinstance(record, dict)
    return record


def failure(stream: Stream) -> grpc.RpcError:
    """Read responses until the stream fails; its error."""
    while True:
        try:
            stream.next()
        except grpc.RpcError as exc:
            return exc


def received_within(stream: Stream, seconds: float) -> list[Any]:
    """Every response that arrives in the next ``seconds``."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(stream.next(timeout=left))
        except queue.Empty:
            break
    return got


def error_code(exc: grpc.RpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get("error-code")


# -- topics and schemas ----------------------------------------------------------------------------


def test_get_topic_names_the_org_the_permissions_and_the_current_schema(stub: Any, md: Any) -> None:
    info = stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md)
    assert (info.topic_name, info.can_subscribe, info.can_publish) == (TOPIC, True, True)
    assert info.tenant_guid == dict(md)["tenantid"]
    assert len(info.schema_id) == 22
    assert info.rpc_id


def test_get_schema_answers_an_avro_record_shaped_like_salesforces(stub: Any, md: Any) -> None:
    schema_id = stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md).schema_id
    info = stub.GetSchema(pb.SchemaRequest(schema_id=schema_id), metadata=md)
    schema = json.loads(info.schema_json)
    assert (schema["type"], schema["name"], schema["namespace"]) == (
        "record",
        "OrderProvisionRequested__e",
        "com.sforce.eventbus",
    )
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types == {
        "CreatedDate": "long",
        "CreatedById": "string",
        "OrderId__c": ["null", "string"],
        "IdemKey__c": ["null", "string"],
        "Action__c": ["null", "string"],
        "Reason__c": ["null", "string"],
    }
    assert info.schema_id == schema_id


def test_an_unknown_schema_or_topic_is_not_found(stub: Any, md: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSchema(pb.SchemaRequest(schema_id="nope"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTopic(pb.TopicRequest(topic_name="/topic/Orders"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(caught.value) == "sfdc.platform.eventbus.grpc.topic.not.found"


def test_a_well_formed_topic_the_org_does_not_have_is_not_found_for_get_topic_and_subscribe(
    sf: SalesforceDriver, stub: Any, md: Any
) -> None:
    missing = "/event/NotDeployed__e"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTopic(pb.TopicRequest(topic_name=missing), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(caught.value) == "sfdc.platform.eventbus.grpc.topic.not.found"
    assert "topic.not.found" in (caught.value.details() or "")
    first = pb.FetchRequest(topic_name=missing, replay_preset=pb.LATEST, num_requested=1)
    with pytest.raises(grpc.RpcError) as caught:
        Stream(stub, md, first).next()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(caught.value) == "sfdc.platform.eventbus.grpc.topic.not.found"
    stats = sf.ok("GET", "stats")["pubsub"]
    assert stats["topic_not_found"] == 2
    assert stats["open_streams"] == 0


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("no tenantid", "sfdc.platform.eventbus.grpc.service.auth.headers.invalid"),
        ("other tenant", "sfdc.platform.eventbus.grpc.service.auth.headers.invalid"),
        ("http instance", "sfdc.platform.eventbus.grpc.service.auth.headers.invalid"),
        ("bad token", "sfdc.platform.eventbus.grpc.service.auth.error"),
    ],
)
def test_calls_without_valid_auth_metadata_are_unauthenticated(
    stub: Any, md: Any, change: str, expected: str
) -> None:
    headers = dict(md)
    if change == "no tenantid":
        del headers["tenantid"]
    elif change == "other tenant":
        headers["tenantid"] = "00D000000000001AAA"
    elif change == "http instance":
        headers["instanceurl"] = headers["instanceurl"].replace("https://", "http://")
    else:
        headers["accesstoken"] = "00D!not-issued"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=tuple(headers.items()))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_code(caught.value) == expected
    assert "rpcId: " in caught.value.details()


def test_a_token_revoked_mid_stream_ends_it_unauthenticated(sf: SalesforceDriver, open_stream: Any) -> None:
    stream = open_stream()
    stream.next()  # a keepalive: the stream is up
    sf.ok("POST", "tokens/revoke")
    error = failure(stream)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_code(error) == "sfdc.platform.eventbus.grpc.service.auth.error"


# -- subscription and flow control -----------------------------------------------------------------


def test_no_more_events_are_sent_than_requested_and_each_request_adds_capacity(
    sf: SalesforceDriver, open_stream: Any
) -> None:
    publish(sf, [f"k{i}" for i in range(10)])
    stream = open_stream(n=4)
    first = stream.next()
    assert (len(first.events), first.pending_num_requested) == (4, 0)
    keepalive = stream.next()  # nothing requested: only keepalives
    assert (len(keepalive.events), keepalive.latest_replay_id) == (0, first.events[-1].replay_id)
    stream.request(3)
    second = stream.next()
    assert (len(second.events), second.pending_num_requested) == (3, 0)
    stream.request(200)  # counts as 100
    third = stream.next()
    assert (len(third.events), third.pending_num_requested) == (3, 97)
    stats = sf.ok("GET", "stats")["pubsub"]
    assert stats["streams"][0]["requested"] == 107


def test_replay_ids_are_opaque_8_byte_values_that_grow_without_being_contiguous(
    sf: SalesforceDriver, open_stream: Any
) -> None:
    published = publish(sf, [f"k{i}" for i in range(20)])
    events = open_stream().events(20)
    ids = [e.replay_id for e in events]
    assert all(len(i) == 8 for i in ids)
    assert [int.from_bytes(i, "big") for i in ids] == published
    assert ids == sorted(ids)
    assert any(b - a > 1 for a, b in itertools.pairwise(published))


def test_latest_earliest_and_custom_start_where_salesforce_does(
    sf: SalesforceDriver, open_stream: Any, stub: Any, md: Any
) -> None:
    publish(sf, ["a", "b", "c"])
    everything = open_stream(pb.EARLIEST).events(3)
    assert [decode(stub, md, e)["IdemKey__c"] for e in everything] == ["a", "b", "c"]
    after_a = open_stream(pb.CUSTOM, replay_id=everything[0].replay_id).events(2)
    assert [decode(stub, md, e)["IdemKey__c"] for e in after_a] == ["b", "c"]
    latest = open_stream(pb.LATEST)
    assert latest.next().events == []  # a keepalive, nothing old
    publish(sf, ["d"])
    assert [decode(stub, md, e)["IdemKey__c"] for e in latest.events(1)] == ["d"]


def test_payloads_are_avro_with_created_date_in_epoch_ms(
    sf: SalesforceDriver, open_stream: Any, stub: Any, md: Any
) -> None:
    publish(sf, ["a"])
    (consumer,) = open_stream().events(1)
    record = decode(stub, md, consumer)
    assert record["OrderId__c"] == ORDER_ID
    assert record["CreatedById"].startswith("005")
    assert abs(record["CreatedDate"] / 1000 - time.time()) < 60
    comet = sf.ok("GET", "events")["events"][0]["data"]
    assert consumer.event.id == comet["event"]["EventUuid"]


def test_an_idle_stream_gets_keepalives_whose_position_is_a_valid_start(
    open_stream: Any, sf: SalesforceDriver
) -> None:
    stream = open_stream(pb.LATEST)
    started = time.monotonic()
    first, second = stream.next(), stream.next()
    assert first.events == []
    assert second.events == []
    assert 0.2 <= time.monotonic() - started < 5
    assert len(first.latest_replay_id) == 8
    resumed = open_stream(pb.CUSTOM, replay_id=first.latest_replay_id)
    publish(sf, ["after"])
    assert len(resumed.events(1)) == 1


def test_a_stream_with_nothing_requested_is_closed_after_the_idle_timeout(
    sf: SalesforceDriver, open_stream: Any
) -> None:
    sf.ok("POST", "streaming", {"pubsub_idle_timeout_s": 0.5})
    publish(sf, ["a"])
    stream = open_stream(n=1)
    assert len(stream.next().events) == 1
    while (item := stream.next()) != "end":
        assert item.events == []
    assert sf.ok("GET", "stats")["pubsub"]["idle_closes"] == 1


@pytest.mark.parametrize(
    ("n", "replay_id", "expected"),
    [
        (100, (123).to_bytes(8, "big"), "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"),
        (100, b"1234", "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"),
        (100, b"", "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.validation.failed"),
        (0, b"", "sfdc.platform.eventbus.grpc.subscription.fetch.requested.events.invalid"),
    ],
)
def test_a_bad_start_is_invalid_argument_with_salesforces_error_code(
    open_stream: Any, n: int, replay_id: bytes, expected: str
) -> None:
    stream = open_stream(pb.CUSTOM if n else pb.EARLIEST, n=n, replay_id=replay_id)
    with pytest.raises(grpc.RpcError) as caught:
        stream.next()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code(caught.value) == expected


def test_an_expired_replay_id_is_corrupted(sf: SalesforceDriver, open_stream: Any) -> None:
    publish(sf, ["a"])
    (event,) = open_stream().events(1)
    sf.ok("POST", "streaming", {"expire_retention": True})
    with pytest.raises(grpc.RpcError) as caught:
        open_stream(pb.CUSTOM, replay_id=event.replay_id).next()
    assert error_code(caught.value) == "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"


def test_one_publish_reaches_cometd_and_pubsub_subscribers(sf: SalesforceDriver, open_stream: Any) -> None:
    token = sf.login()
    session = sf.new_session()
    handshake = sf.bayeux(
        session, token, [{"channel": "/meta/handshake", "version": "1.0", "ext": {"replay": True}}]
    )
    client_id = handshake.json()[0]["clientId"]
    sf.bayeux(
        session,
        token,
        [
            {
                "channel": "/meta/subscribe",
                "clientId": client_id,
                "subscription": TOPIC,
                "ext": {"replay": {TOPIC: -1}},
            }
        ],
    )
    sf.bayeux(
        session,
        token,
        [{"channel": "/meta/connect", "clientId": client_id, "connectionType": "long-polling"}],
    )
    grpc_stream = open_stream(pb.LATEST)
    grpc_stream.next()
    response = sf.rest("POST", "sobjects/OrderProvisionRequested__e", token, json={"OrderId__c": ORDER_ID})
    assert response.status_code == 201
    (consumer,) = grpc_stream.events(1)
    comet = sf.bayeux(
        session,
        token,
        [{"channel": "/meta/connect", "clientId": client_id, "connectionType": "long-polling"}],
    )
    (message,) = [m for m in comet.json() if m.get("channel") == TOPIC]
    assert consumer.event.id == message["data"]["event"]["EventUuid"]
    assert int.from_bytes(consumer.replay_id, "big") == message["data"]["event"]["replayId"]


def test_publish_over_grpc_reaches_subscribers(
    sf: SalesforceDriver, stub: Any, md: Any, open_stream: Any
) -> None:
    info = stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md)
    schema = fastavro.parse_schema(
        json.loads(stub.GetSchema(pb.SchemaRequest(schema_id=info.schema_id), metadata=md).schema_json)
    )
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body, schema, {"CreatedDate": 0, "CreatedById": "005", "OrderId__c": ORDER_ID, "IdemKey__c": "g"}
    )
    answer = stub.Publish(
        pb.PublishRequest(
            topic_name=TOPIC,
            events=[pb.ProducerEvent(id="c1", schema_id=info.schema_id, payload=body.getvalue())],
        ),
        metadata=md,
    )
    (result,) = answer.results
    assert (result.correlation_key, len(result.replay_id), result.error.msg) == ("c1", 8, "")
    (consumer,) = open_stream().events(1)
    assert consumer.replay_id == result.replay_id
    assert decode(stub, md, consumer)["IdemKey__c"] == "g"
    assert sf.ok("GET", "events")["events"][0]["data"]["payload"]["IdemKey__c"] == "g"


# -- faults ----------------------------------------------------------------------------------------


def test_killing_the_streams_ends_each_unavailable(sf: SalesforceDriver, open_stream: Any) -> None:
    streams = [open_stream(), open_stream()]
    for stream in streams:
        stream.next()
    sf.ok("POST", "streaming", {"pubsub_kill_streams": True})
    for stream in streams:
        error = failure(stream)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_code(error) == "sfdc.platform.eventbus.grpc.service.unavailable"
    assert sf.ok("GET", "stats")["pubsub"]["streams_killed"] == 2


def test_a_stall_sends_nothing_at_all_without_closing_until_it_is_lifted(
    sf: SalesforceDriver, open_stream: Any
) -> None:
    stream = open_stream(pb.LATEST)
    stream.next()
    sf.ok("POST", "streaming", {"pubsub_stall": True})
    publish(sf, ["during"])
    time.sleep(0.1)  # a keepalive already on its way may still land: drop it
    while not stream.responses.empty():
        assert stream.responses.get().events == []
    assert received_within(stream, 1.5) == []  # five keepalive intervals: nothing, not even a keepalive
    assert sf.ok("GET", "stats")["pubsub"]["open_streams"] == 1
    sf.ok("POST", "streaming", {"pubsub_stall": False})
    assert len(stream.events(1)) == 1


def test_a_schema_change_gives_new_events_a_new_schema_with_an_added_optional_field(
    sf: SalesforceDriver, open_stream: Any, stub: Any, md: Any
) -> None:
    publish(sf, ["old"])
    before = sf.ok("POST", "streaming", {"pubsub_schema_change": True})
    assert before["pubsub_schema_version"] == 1
    publish(sf, ["new"], Priority__c="high")
    old, new = open_stream().events(2)
    assert old.event.schema_id != new.event.schema_id
    assert "Priority__c" not in decode(stub, md, old)
    assert decode(stub, md, new)["Priority__c"] == "high"
    assert stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md).schema_id == new.event.schema_id


def test_a_payload_that_does_not_fit_the_schema_is_sent_undecodable(
    sf: SalesforceDriver, open_stream: Any, stub: Any, md: Any
) -> None:
    sf.publish([{"OrderId__c": 123}])
    (consumer,) = open_stream().events(1)
    with pytest.raises((EOFError, IndexError, ValueError)):
        decode(stub, md, consumer)
    assert sf.ok("GET", "stats")["pubsub"]["undecodable_events"] == 1


def test_permission_denied_refuses_the_subscription_and_shows_in_get_topic(
    sf: SalesforceDriver, open_stream: Any, stub: Any, md: Any
) -> None:
    sf.ok("POST", "streaming", {"pubsub_permission_denied": True})
    assert stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md).can_subscribe is False
    with pytest.raises(grpc.RpcError) as caught:
        open_stream().next()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_code(caught.value) == "sfdc.platform.eventbus.grpc.subscription.topic.cannot.subscribe"


@pytest.mark.parametrize(
    "body",
    [{"pubsub_stall": "yes"}, {"pubsub_keepalive_s": 0}, {"pubsub_idle_timeout_s": True}, {"pubsub_nope": 1}],
)
def test_bad_pubsub_knobs_are_refused(sf: SalesforceDriver, body: dict[str, Any]) -> None:
    response = sf.admin("POST", "streaming", body)
    assert response.status_code == 400
    assert "pubsub" in response.json()["error"]


def test_reset_lifts_every_pubsub_fault_and_calls_are_counted(
    sf: SalesforceDriver, stub: Any, md: Any
) -> None:
    sf.ok(
        "POST",
        "streaming",
        {"pubsub_stall": True, "pubsub_permission_denied": True, "pubsub_schema_change": True},
    )
    stub.GetTopic(pb.TopicRequest(topic_name=TOPIC), metadata=md)
    assert sf.calls()["pubsub_get_topic"] == 1
    sf.ok("POST", "reset")
    knobs = sf.ok("GET", "streaming")
    assert (knobs["pubsub_stall"], knobs["pubsub_permission_denied"], knobs["pubsub_schema_version"]) == (
        False,
        False,
        0,
    )
