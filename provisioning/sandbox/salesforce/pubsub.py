"""The Pub/Sub API (gRPC over TLS, Avro payloads) on the simulator's event bus.

Salesforce's behaviour as documented (``pubsub_api.proto`` and the Pub/Sub API guide), on
the same :class:`~.bus.EventBus` as CometD, so an event published once reaches both:

- Every call needs the metadata ``accesstoken`` (a token the simulator issued and has not
  revoked), ``instanceurl`` (an ``https://`` URL) and ``tenantid`` (the org's Id). Missing
  headers: UNAUTHENTICATED ``sfdc.platform.eventbus.grpc.service.auth.headers.invalid``; a bad,
  revoked or expired token (also in the middle of a stream): UNAUTHENTICATED
  ``sfdc.platform.eventbus.grpc.service.auth.error``. Salesforce error codes travel in the
  trailing metadata ``error-code``; messages end with ``rpcId: <id>``.
- ``Subscribe``: the first FetchRequest names the topic (``/event/<Name>__e``) and the start
  (LATEST, EARLIEST, or CUSTOM after ``replay_id``); ``num_requested`` must be positive (larger
  than 100 counts as 100). The server sends at most the requested number of events, in
  FetchResponses of up to ``num_requested`` events with ``pending_num_requested``; later
  FetchRequests add capacity. When idle, an empty FetchResponse carrying ``latest_replay_id``
  every ``keepalive_s`` (Salesforce: within 270 s). A stream with nothing requested for
  ``idle_timeout_s`` (Salesforce: about 60-70 s) is closed (status OK, no more responses).
- Replay ids are the bus's integers as 8 bytes big-endian: opaque, not contiguous. An invalid or
  expired one (retention, ``expire_retention``): INVALID_ARGUMENT
  ``sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted``; CUSTOM without one:
  INVALID_ARGUMENT ``…fetch.replayid.validation.failed``.
- Payloads are Avro binary without a container, per the schema ``GetSchema(schema_id)`` returns
  (a record with ``CreatedDate`` long epoch ms, ``CreatedById`` string and the event's fields as
  ``["null", "string"]``). An admin-published payload that does not fit the schema (the admin
  route does not validate) is sent as bytes that do not decode: how a test gets a decode error.
- ``GetTopic`` answers the topic name, the org as ``tenant_guid``, ``can_subscribe``,
  ``can_publish`` and the current ``schema_id``. ``Publish`` publishes Avro-encoded events.
- A topic the org does not have (any but the bus's ``topics``: its one Platform Event) is
  NOT_FOUND ``sfdc.platform.eventbus.grpc.topic.not.found`` for ``GetTopic``, ``Subscribe`` and
  ``Publish`` alike (the code in the message too).

Faults (``POST /__admin/streaming`` of the simulator; see :meth:`PubSub.configure`): kill every
stream (UNAVAILABLE ``…service.unavailable``), a silent stall (nothing sent, keepalives included,
streams left open), a schema change (a new schema id with an added optional field for events
published from then on), permission denied (PERMISSION_DENIED
``…subscription.topic.cannot.subscribe``; GetTopic says ``can_subscribe: false``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import fastavro
import grpc
from grpc import aio

from provisioning.core.errors import PicklableError
from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.salesforce.pubsub import pubsub_api_pb2_grpc as pb_grpc
from provisioning.sandbox.common import FaultInjector
from provisioning.sandbox.salesforce.auth import TokenStore
from provisioning.sandbox.salesforce.bus import BusEvent, EventBus, InvalidReplayId

# Salesforce: an empty FetchResponse within 270 s when there is nothing to deliver.
DEFAULT_KEEPALIVE_S = 270.0
# Salesforce closes a stream with nothing requested after about 60 s (the Java sample says 70 s).
DEFAULT_IDLE_TIMEOUT_S = 60.0
MAX_NUM_REQUESTED = 100
# How often a stalled stream looks at its knobs.
STALL_POLL_S = 0.5
# Grace given to open streams when the server stops.
STOP_GRACE_S = 0.5
REPLAY_ID_BYTES = 8
# The added optional field of a schema change (version 1 and later).
SCHEMA_CHANGE_FIELD = "Priority__c"
# Bytes that no Avro record decodes: a varint whose continuation bit never ends.
UNDECODABLE_PAYLOAD = b"\xff\xff\xff"

ERROR_PREFIX = "sfdc.platform.eventbus.grpc"
AUTH_HEADERS_INVALID = f"{ERROR_PREFIX}.service.auth.headers.invalid"
AUTH_ERROR = f"{ERROR_PREFIX}.service.auth.error"
SERVICE_UNAVAILABLE = f"{ERROR_PREFIX}.service.unavailable"
REPLAY_CORRUPTED = f"{ERROR_PREFIX}.subscription.fetch.replayid.corrupted"
REPLAY_VALIDATION_FAILED = f"{ERROR_PREFIX}.subscription.fetch.replayid.validation.failed"
REQUESTED_EVENTS_INVALID = f"{ERROR_PREFIX}.subscription.fetch.requested.events.invalid"
TOPIC_MISMATCH = f"{ERROR_PREFIX}.subscription.fetch.topic.mismatch"
TOPIC_NOT_FOUND = f"{ERROR_PREFIX}.topic.not.found"
CANNOT_SUBSCRIBE = f"{ERROR_PREFIX}.subscription.topic.cannot.subscribe"
SCHEMA_NOT_FOUND = f"{ERROR_PREFIX}.schema.not.found"
TOPIC_PREFIX = "/event/"


class _Abort(PicklableError):
    """An RPC failure: gRPC status, Salesforce error code, message."""

    def __init__(self, code: grpc.StatusCode, error_code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.error_code = error_code
        self.message = message


@dataclass
class PubSubFaults:
    """Sticky fault switches of the Pub/Sub server."""

    stall: bool = False
    permission_denied: bool = False


@dataclass(eq=False)
class _Stream:
    """One open Subscribe call."""

    topic: str
    after: int
    pending: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_sent: float = field(default_factory=time.monotonic)
    last_request: float = field(default_factory=time.monotonic)
    requested: int = 0
    delivered: int = 0
    killed: bool = False
    error: _Abort | None = None


class PubSub:
    """Pub/Sub API state: schemas per version, open streams, knobs and counters."""

    def __init__(
        self,
        *,
        bus: EventBus,
        tokens: TokenStore,
        injector: FaultInjector,
        org_id: str,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.bus = bus
        self.tokens = tokens
        self.injector = injector
        self.org_id = org_id
        self.keepalive_s = keepalive_s
        self.idle_timeout_s = idle_timeout_s
        self._timings = (keepalive_s, idle_timeout_s)
        self.faults = PubSubFaults()
        self.stats: Counter[str] = Counter()
        self.streams: set[_Stream] = set()
        self.closing = False
        # (topic, version) -> (schema_id, parsed schema, schema json)
        self._schemas: dict[tuple[str, int], tuple[str, Any, str]] = {}
        self._by_id: dict[str, tuple[str, int]] = {}

    # -- schemas ------------------------------------------------------------------------------

    def schema(self, topic: str, version: int) -> tuple[str, Any, str]:
        """(schema_id, parsed schema, schema JSON) of ``topic`` at schema ``version``."""
        key = (topic, version)
        if key not in self._schemas:
            name = topic.removeprefix(TOPIC_PREFIX)
            fields: list[dict[str, Any]] = [
                {"name": "CreatedDate", "type": "long", "doc": "CreatedDate:DateTime"},
                {"name": "CreatedById", "type": "string", "doc": "CreatedBy:EntityId"},
                {"name": "OrderId__c", "type": ["null", "string"], "doc": "Data:Text:18", "default": None},
                {"name": "IdemKey__c", "type": ["null", "string"], "doc": "Data:Text:80", "default": None},
                {"name": "Action__c", "type": ["null", "string"], "doc": "Data:Text:20", "default": None},
                {"name": "Reason__c", "type": ["null", "string"], "doc": "Data:Text:255", "default": None},
            ]
            if version >= 1:
                fields.append(
                    {
                        "name": SCHEMA_CHANGE_FIELD,
                        "type": ["null", "string"],
                        "doc": "Data:Text",
                        "default": None,
                    }
                )
            schema = {
                "name": name,
                "namespace": "com.sforce.eventbus",
                "type": "record",
                "fields": fields,
                "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{topic}#{version}")),
            }
            schema_json = json.dumps(schema, separators=(",", ":"))
            digest = hashlib.sha256(schema_json.encode()).digest()[:16]
            schema_id = base64.urlsafe_b64encode(digest).decode().rstrip("=")
            self._schemas[key] = (schema_id, fastavro.parse_schema(schema), schema_json)
            self._by_id[schema_id] = key
        return self._schemas[key]

    def encode(self, event: BusEvent) -> pb.ConsumerEvent:
        schema_id, parsed, _ = self.schema(event.channel, event.schema_version)
        data = event.message["data"]
        payload = dict(data["payload"])
        buffer = io.BytesIO()
        try:
            payload["CreatedDate"] = _epoch_ms(str(payload.get("CreatedDate")))
            fastavro.schemaless_writer(buffer, parsed, payload)
            body = buffer.getvalue()
        except (ValueError, TypeError, KeyError, AttributeError):
            self.stats["undecodable_events"] += 1
            body = UNDECODABLE_PAYLOAD
        return pb.ConsumerEvent(
            event=pb.ProducerEvent(id=data["event"]["EventUuid"], schema_id=schema_id, payload=body),
            replay_id=encode_replay_id(event.replay_id),
        )

    # -- RPCs ---------------------------------------------------------------------------------

    async def Subscribe(
        self, requests: AsyncIterator[pb.FetchRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.FetchResponse]:
        rpc_id = str(uuid.uuid4())
        self.injector.calls["pubsub_subscribe"] += 1
        self.stats["subscribes"] += 1
        stream: _Stream | None = None
        reader: asyncio.Task[None] | None = None
        try:
            token = self._authenticate(context)
            first = await anext(requests, None)
            if first is None:
                return
            stream = self._open(first)
            self.streams.add(stream)
            reader = asyncio.create_task(self._read_requests(requests, stream))
            async for response in self._deliver(stream, token, rpc_id):
                yield response
        except _Abort as abort:
            await self._abort(context, abort, rpc_id)
        finally:
            if reader is not None:
                reader.cancel()
            if stream is not None:
                self.streams.discard(stream)

    async def GetSchema(
        self, request: pb.SchemaRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.SchemaInfo:
        rpc_id = str(uuid.uuid4())
        self.injector.calls["pubsub_get_schema"] += 1
        try:
            self._authenticate(context)
            key = self._by_id.get(request.schema_id)
            if key is None:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND, SCHEMA_NOT_FOUND, f"Schema {request.schema_id} not found"
                )
        except _Abort as abort:
            await self._abort(context, abort, rpc_id)
            raise AssertionError("unreachable") from None
        schema_id, _, schema_json = self._schemas[key]
        return pb.SchemaInfo(schema_json=schema_json, schema_id=schema_id, rpc_id=rpc_id)

    async def GetTopic(
        self, request: pb.TopicRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.TopicInfo:
        rpc_id = str(uuid.uuid4())
        self.injector.calls["pubsub_get_topic"] += 1
        try:
            self._authenticate(context)
            topic = self._topic(request.topic_name)
        except _Abort as abort:
            await self._abort(context, abort, rpc_id)
            raise AssertionError("unreachable") from None
        schema_id, _, _ = self.schema(topic, self.bus.schema_version)
        return pb.TopicInfo(
            topic_name=topic,
            tenant_guid=self.org_id,
            can_publish=True,
            can_subscribe=not self.faults.permission_denied,
            schema_id=schema_id,
            rpc_id=rpc_id,
        )

    async def Publish(
        self, request: pb.PublishRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.PublishResponse:
        rpc_id = str(uuid.uuid4())
        self.injector.calls["pubsub_publish"] += 1
        try:
            self._authenticate(context)
            topic = self._topic(request.topic_name)
        except _Abort as abort:
            await self._abort(context, abort, rpc_id)
            raise AssertionError("unreachable") from None
        results = []
        for event in request.events:
            key = self._by_id.get(event.schema_id)
            if key is None or key[0] != topic:
                results.append(
                    pb.PublishResult(
                        error=pb.Error(code=pb.PUBLISH, msg=f"unknown schema_id {event.schema_id}"),
                        correlation_key=event.id,
                    )
                )
                continue
            try:
                fields = fastavro.schemaless_reader(io.BytesIO(event.payload), self._schemas[key][1], None)
            except (ValueError, TypeError, EOFError, IndexError, UnicodeDecodeError) as exc:
                results.append(
                    pb.PublishResult(
                        error=pb.Error(code=pb.PUBLISH, msg=f"payload does not decode: {exc}"),
                        correlation_key=event.id,
                    )
                )
                continue
            assert isinstance(fields, dict)
            fields = {k: v for k, v in fields.items() if k not in ("CreatedDate", "CreatedById")}
            published = self.bus.publish(topic, fields, notify=False)
            results.append(
                pb.PublishResult(replay_id=encode_replay_id(published.replay_id), correlation_key=event.id)
            )
        self.bus.notify()
        schema_id, _, _ = self.schema(topic, self.bus.schema_version)
        return pb.PublishResponse(results=results, schema_id=schema_id, rpc_id=rpc_id)

    async def PublishStream(
        self, requests: AsyncIterator[pb.PublishRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PublishResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "PublishStream is not simulated")
        yield pb.PublishResponse()  # pragma: no cover (abort raises)

    # -- subscription -------------------------------------------------------------------------

    def _open(self, first: pb.FetchRequest) -> _Stream:
        topic = self._topic(first.topic_name)
        if self.faults.permission_denied:
            self.stats["permission_denied"] += 1
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                CANNOT_SUBSCRIBE,
                f"User doesn't have permission to subscribe to the topic {topic}",
            )
        if first.num_requested <= 0:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                REQUESTED_EVENTS_INVALID,
                f"num_requested must be greater than 0, got {first.num_requested}",
            )
        after = self._start(topic, first)
        stream = _Stream(topic=topic, after=after)
        self._add_capacity(stream, first.num_requested)
        return stream

    def _start(self, topic: str, first: pb.FetchRequest) -> int:
        preset = first.replay_preset
        if preset == pb.LATEST:
            return self.bus.start_position(topic, -1)
        if preset == pb.EARLIEST:
            return self.bus.start_position(topic, -2)
        if not first.replay_id:
            self.stats["invalid_replay"] += 1
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                REPLAY_VALIDATION_FAILED,
                "Replay ID validation failed: a CUSTOM replay preset needs a replay_id",
            )
        try:
            if len(first.replay_id) != REPLAY_ID_BYTES:
                raise InvalidReplayId(first.replay_id)
            return self.bus.start_position(topic, int.from_bytes(first.replay_id, "big"))
        except InvalidReplayId:
            self.stats["invalid_replay"] += 1
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                REPLAY_CORRUPTED,
                "The Replay ID validation failed: it is corrupted or older than the retention window",
            ) from None

    def _add_capacity(self, stream: _Stream, requested: int) -> None:
        stream.pending += min(max(requested, 0), MAX_NUM_REQUESTED)
        stream.requested += min(max(requested, 0), MAX_NUM_REQUESTED)
        stream.last_request = time.monotonic()
        stream.wake.set()

    async def _read_requests(self, requests: AsyncIterator[pb.FetchRequest], stream: _Stream) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError, aio.AioRpcError):
            async for request in requests:
                if request.topic_name and request.topic_name != stream.topic:
                    stream.error = _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        TOPIC_MISMATCH,
                        f"A FetchRequest named {request.topic_name}; this stream is subscribed to {stream.topic}",
                    )
                    stream.wake.set()
                    return
                self._add_capacity(stream, request.num_requested)

    async def _deliver(self, stream: _Stream, token: str, rpc_id: str) -> AsyncIterator[pb.FetchResponse]:
        while True:
            if stream.error is not None:
                raise stream.error
            if self.closing or stream.killed:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, SERVICE_UNAVAILABLE, "The service is unavailable")
            if not self.tokens.valid(token):
                self.stats["unauthenticated"] += 1
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    AUTH_ERROR,
                    "Authentication failed: session expired or invalid",
                )
            now = time.monotonic()
            events: list[BusEvent] = []
            if not self.faults.stall:
                if stream.pending > 0:
                    events = self.bus.pending({stream.topic: stream.after}, stream.pending)
                if events:
                    stream.after = events[-1].replay_id
                    stream.pending -= len(events)
                    stream.delivered += len(events)
                    stream.last_sent = now
                    self.stats["events_delivered"] += len(events)
                    yield pb.FetchResponse(
                        events=[self.encode(e) for e in events],
                        latest_replay_id=encode_replay_id(events[-1].replay_id),
                        rpc_id=rpc_id,
                        pending_num_requested=stream.pending,
                    )
                    continue
                if now - stream.last_sent >= self.keepalive_s:
                    stream.last_sent = now
                    self.stats["keepalives"] += 1
                    # The subscription's own position: what it delivered last, or where it started.
                    self.bus.remember_position(stream.topic, stream.after)
                    yield pb.FetchResponse(
                        latest_replay_id=encode_replay_id(stream.after),
                        rpc_id=rpc_id,
                        pending_num_requested=stream.pending,
                    )
                    continue
            stream.wake.clear()
            if self.faults.stall:
                # Silent: nothing is sent and the stream stays open until the stall is lifted.
                await _wait_any((stream.wake,), STALL_POLL_S)
                continue
            if stream.pending == 0 and now - stream.last_request >= self.idle_timeout_s:
                self.stats["idle_closes"] += 1
                return
            deadline = stream.last_sent + self.keepalive_s
            if stream.pending == 0:
                deadline = min(deadline, stream.last_request + self.idle_timeout_s)
            await _wait_any((self.bus.waiter, stream.wake), max(0.0, deadline - now))

    # -- auth and errors ----------------------------------------------------------------------

    def _authenticate(self, context: aio.ServicerContext[Any, Any]) -> str:
        headers = {key: value for key, value in context.invocation_metadata() or ()}
        token = headers.get("accesstoken")
        instance_url = headers.get("instanceurl")
        tenant = headers.get("tenantid")
        if not isinstance(token, str) or not isinstance(instance_url, str) or not isinstance(tenant, str):
            self.stats["unauthenticated"] += 1
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                AUTH_HEADERS_INVALID,
                "The accesstoken, instanceurl and tenantid headers are required",
            )
        if not instance_url.startswith("https://") or tenant[:15] != self.org_id[:15]:
            self.stats["unauthenticated"] += 1
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                AUTH_HEADERS_INVALID,
                "instanceurl must be the org's https:// URL and tenantid the org's Id",
            )
        if not self.tokens.valid(token):
            self.stats["unauthenticated"] += 1
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                AUTH_ERROR,
                "Authentication failed: session expired or invalid",
            )
        return token

    def _topic(self, name: str) -> str:
        """``name`` if the org has that Platform Event; NOT_FOUND ``…topic.not.found`` otherwise."""
        if not self.bus.has_topic(name):
            self.stats["topic_not_found"] += 1
            # The code is in the message too, not only in the trailer: what a log line shows.
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, TOPIC_NOT_FOUND, f"Topic {name!r} not found ({TOPIC_NOT_FOUND})"
            )
        return name

    async def _abort(self, context: aio.ServicerContext[Any, Any], abort: _Abort, rpc_id: str) -> None:
        self.stats[f"status_{abort.code.name.lower()}"] += 1
        await context.abort(
            abort.code,
            f"{abort.message} rpcId: {rpc_id}",
            trailing_metadata=(("error-code", abort.error_code),),
        )

    # -- admin --------------------------------------------------------------------------------

    KNOBS = frozenset(
        {
            "pubsub_kill_streams",
            "pubsub_stall",
            "pubsub_schema_change",
            "pubsub_permission_denied",
            "pubsub_keepalive_s",
            "pubsub_idle_timeout_s",
        }
    )

    def check(self, data: dict[str, Any]) -> None:
        """Validate the Pub/Sub knobs of an admin body; raises ValueError."""
        for name in (
            "pubsub_kill_streams",
            "pubsub_stall",
            "pubsub_schema_change",
            "pubsub_permission_denied",
        ):
            if name in data and not isinstance(data[name], bool):
                raise ValueError(f"{name} is true or false")
        for name in ("pubsub_keepalive_s", "pubsub_idle_timeout_s"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ValueError(f"{name} is a number of seconds above 0")

    def configure(self, data: dict[str, Any]) -> None:
        """Apply validated Pub/Sub knobs (see the module docstring)."""
        if data.get("pubsub_kill_streams"):
            self.stats["streams_killed"] += len(self.streams)
            for stream in self.streams:
                stream.killed = True
                stream.wake.set()
        if "pubsub_stall" in data:
            self.faults.stall = bool(data["pubsub_stall"])
        if data.get("pubsub_schema_change"):
            self.bus.schema_version += 1
        if "pubsub_permission_denied" in data:
            self.faults.permission_denied = bool(data["pubsub_permission_denied"])
        if "pubsub_keepalive_s" in data:
            self.keepalive_s = float(data["pubsub_keepalive_s"])
        if "pubsub_idle_timeout_s" in data:
            self.idle_timeout_s = float(data["pubsub_idle_timeout_s"])
        for stream in self.streams:
            stream.wake.set()

    def knobs_json(self) -> dict[str, Any]:
        return {
            "pubsub_stall": self.faults.stall,
            "pubsub_permission_denied": self.faults.permission_denied,
            "pubsub_schema_version": self.bus.schema_version,
            "pubsub_keepalive_s": self.keepalive_s,
            "pubsub_idle_timeout_s": self.idle_timeout_s,
        }

    def reset(self) -> None:
        self.faults = PubSubFaults()
        self.stats.clear()
        self.keepalive_s, self.idle_timeout_s = self._timings
        self.configure({"pubsub_kill_streams": True})

    def stats_json(self) -> dict[str, Any]:
        return {
            "subscribes": self.stats["subscribes"],
            "open_streams": len(self.streams),
            "events_delivered": self.stats["events_delivered"],
            "keepalives": self.stats["keepalives"],
            "idle_closes": self.stats["idle_closes"],
            "streams_killed": self.stats["streams_killed"],
            "unauthenticated": self.stats["unauthenticated"],
            "invalid_replay": self.stats["invalid_replay"],
            "permission_denied": self.stats["permission_denied"],
            "topic_not_found": self.stats["topic_not_found"],
            "undecodable_events": self.stats["undecodable_events"],
            "streams": [
                {
                    "topic": s.topic,
                    "requested": s.requested,
                    "delivered": s.delivered,
                    "pending": s.pending,
                }
                for s in self.streams
            ],
        }

    # -- serving ------------------------------------------------------------------------------

    def starter(
        self, host: str, port: int, cert_chain_pem: bytes, key_pem: bytes
    ) -> Callable[[asyncio.AbstractEventLoop], Awaitable[tuple[Any, int]]]:
        """A :class:`~provisioning.sandbox.common.ServerThread` start hook serving TLS on host:port."""

        async def start(_: asyncio.AbstractEventLoop) -> tuple[Any, int]:
            server = aio.server()
            pb_grpc.add_PubSubServicer_to_server(self, server)  # type: ignore[no-untyped-call]
            credentials = grpc.ssl_server_credentials([(key_pem, cert_chain_pem)])
            bound = server.add_secure_port(f"{host}:{port}", credentials)
            await server.start()
            return _GrpcServer(server, self), bound

        return start


class _GrpcServer:
    """What ServerThread stops: open streams end with UNAVAILABLE, then the server stops."""

    def __init__(self, server: aio.Server, pubsub: PubSub) -> None:
        self._server = server
        self._pubsub = pubsub

    def close(self) -> Awaitable[None]:
        self._pubsub.closing = True
        self._pubsub.configure({"pubsub_kill_streams": True})
        return self._server.stop(STOP_GRACE_S)  # type: ignore[no-any-return]


def encode_replay_id(replay_id: int) -> bytes:
    return replay_id.to_bytes(REPLAY_ID_BYTES, "big")


def _epoch_ms(created_date: str) -> int:
    """CometD's ISO CreatedDate as Avro's epoch milliseconds."""
    import datetime as dt

    return int(dt.datetime.fromisoformat(created_date.replace("Z", "+00:00")).timestamp() * 1000)


async def _wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
