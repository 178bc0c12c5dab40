"""A scripted Pub/Sub API server (real gRPC over TLS, in process) for the client's own unit tests.

Each Subscribe call runs the next script from ``scripts``: a function of (the call's first
FetchRequest, the context) that yields FetchResponses and may end the call with an error
(``context.abort``). Every call's metadata and FetchRequests are recorded.
The sandbox's simulator covers Salesforce's behaviour; this covers what it cannot be made to
do on purpose (a stream the server ends, INTERNAL resets, the delivery limit, a missing schema).
"""

from __future__ import annotations

import io
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import fastavro
import grpc

from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.salesforce.pubsub import pubsub_api_pb2_grpc as pb_grpc
from provisioning.sandbox.common import SandboxTLS

SCHEMA = {
    "name": "OrderProvisionRequested__e",
    "namespace": "com.sforce.eventbus",
    "type": "record",
    "fields": [
        {"name": "CreatedDate", "type": "long"},
        {"name": "CreatedById", "type": "string"},
        {"name": "OrderId__c", "type": ["null", "string"], "default": None},
        {"name": "IdemKey__c", "type": ["null", "string"], "default": None},
    ],
}
SCHEMA_ID = "fakeSchema000000000001"
CREATED_MS = 1_700_000_000_123

Script = Callable[[pb.FetchRequest, grpc.ServicerContext], Iterator[pb.FetchResponse]]


def payload(key: str, **extra: Any) -> bytes:
    buffer = io.BytesIO()
    record = {
        "CreatedDate": CREATED_MS,
        "CreatedById": "005000000000001",
        "OrderId__c": "801",
        "IdemKey__c": key,
    }
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(SCHEMA), {**record, **extra})
    return buffer.getvalue()


def event(key: str, replay: int, schema_id: str = SCHEMA_ID, body: bytes | None = None) -> pb.ConsumerEvent:
    return pb.ConsumerEvent(
        event=pb.ProducerEvent(
            id=f"uuid-{key}", schema_id=schema_id, payload=body if body is not None else payload(key)
        ),
        replay_id=replay.to_bytes(8, "big"),
    )


def respond(*events: pb.ConsumerEvent, pending: int = 0, latest: int | None = None) -> pb.FetchResponse:
    last = events[-1].replay_id if events else (latest or 0).to_bytes(8, "big")
    return pb.FetchResponse(
        events=list(events), latest_replay_id=last, rpc_id="rpc", pending_num_requested=pending
    )


def abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, error_code: str, message: str = "failed"
) -> None:
    context.set_trailing_metadata((("error-code", error_code),))
    context.abort(code, f"{message} rpcId: rpc")


@dataclass
class Call:
    metadata: dict[str, str]
    requests: list[pb.FetchRequest] = field(default_factory=list)


class FakePubSub(pb_grpc.PubSubServicer):
    """The scripted server; ``hold`` keeps a script's stream open until set."""

    def __init__(self, tls: SandboxTLS) -> None:
        self.scripts: deque[Script] = deque()
        self.calls: list[Call] = []
        self.schemas: dict[str, str] = {SCHEMA_ID: json.dumps(SCHEMA)}
        self.schema_errors: deque[grpc.StatusCode] = deque()
        self.schema_requests: list[str] = []
        self.topic_requests: list[str] = []
        # What the next GetTopic calls answer instead of the topic: "not_found" or "cannot_subscribe".
        self.topic_answers: deque[str] = deque()
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PubSubServicer_to_server(self, self.server)
        credentials = grpc.ssl_server_credentials([(tls.server_key_pem, tls.server_cert_chain_pem)])
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)

    def Subscribe(
        self, request_iterator: Iterator[pb.FetchRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.FetchResponse]:
        call = Call({k: v for k, v in context.invocation_metadata()})
        with self.lock:
            self.calls.append(call)
            script = self.scripts.popleft() if self.scripts else serve()
        first = next(request_iterator)
        call.requests.append(first)

        def drain() -> None:
            try:
                for request in request_iterator:
                    call.requests.append(request)
            except grpc.RpcError:
                return

        threading.Thread(target=drain, daemon=True).start()
        yield from script(first, context)

    def GetSchema(self, request: pb.SchemaRequest, context: grpc.ServicerContext) -> pb.SchemaInfo:
        self.schema_requests.append(request.schema_id)
        if self.schema_errors:
            abort(context, self.schema_errors.popleft(), "sfdc.platform.eventbus.grpc.service.unavailable")
        if request.schema_id not in self.schemas:
            abort(context, grpc.StatusCode.NOT_FOUND, "sfdc.platform.eventbus.grpc.schema.not.found")
        return pb.SchemaInfo(
            schema_json=self.schemas[request.schema_id], schema_id=request.schema_id, rpc_id="rpc"
        )

    def GetTopic(self, request: pb.TopicRequest, context: grpc.ServicerContext) -> pb.TopicInfo:
        self.topic_requests.append(request.topic_name)
        answer = self.topic_answers.popleft() if self.topic_answers else "ok"
        if answer == "not_found":
            abort(context, grpc.StatusCode.NOT_FOUND, "sfdc.platform.eventbus.grpc.topic.not.found")
        return pb.TopicInfo(
            topic_name=request.topic_name,
            tenant_guid="00Dfake",
            can_subscribe=answer != "cannot_subscribe",
            schema_id=SCHEMA_ID,
        )


def serve(
    *responses: pb.FetchResponse,
    then: str = "idle",
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    error_code: str = "sfdc.platform.eventbus.grpc.service.unavailable",
) -> Script:
    """A script: send ``responses``, then stay open (``idle``), ``end`` the call, or ``abort`` it."""

    def script(first: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchResponse]:
        yield from responses
        if then == "abort":
            abort(context, code, error_code)
        elif then == "idle":
            done = threading.Event()
            context.add_callback(done.set)
            done.wait(30)

    return script
