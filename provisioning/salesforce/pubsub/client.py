"""Salesforce Pub/Sub API subscriber (gRPC, Avro) for one Platform Event topic: an EventSource.

::

    source = PubSubClient(auth=auth, endpoint="api.pubsub.salesforce.com:7443",
                          topic="/event/OrderProvisionRequested__e")
    for batch in source.batches(LATEST):
        ...                                   # handle batch.events, store batch.position
        if batch.position is not None:
            source.ack(batch.position)

Every call carries the metadata ``accesstoken``, ``instanceurl`` (the full https URL) and
``tenantid`` (the org's Id, from the token response's identity URL). TLS trusts
``ca_bundle`` (``TLS_CA_BUNDLE``) when given, else the system roots gRPC ships with.

Flow control: the first FetchRequest asks for ``batch_size`` events (``num_requested``,
1..100). The response iterator is read only when the caller asks for the next batch, so the
client holds at most one FetchResponse; whenever the events requested have all arrived
(pending at 0), a new FetchRequest for ``batch_size`` is sent as that batch is handed over,
so the server never closes the stream for lack of requests, and at most ``batch_size``
further events wait in gRPC's buffers while the caller works. The client counts what it is
owed itself: a buffered response's ``pending_num_requested`` is stale by the time it is read
(a keepalive saying 0 after the next request already left would otherwise double it).

Before its first Subscribe call, an iteration asks ``GetTopic``: a topic the org does not have
(NOT_FOUND ``…topic.not.found``) raises :class:`SalesforceEventNotFound`, ``can_subscribe``
false raises :class:`SalesforceEventPermissionError`, both with their ``remedy`` and without a
Subscribe call spent.

Recovery, each followed by a new Subscribe call from the last acknowledged position (never
LATEST after the first subscription: without an ack, an empty keepalive's
``latest_replay_id`` anchors a LATEST start; failing that, the replay fallback applies). How
long to wait is :mod:`provisioning.salesforce.reconnect`'s, shared with CometD:

- UNAUTHENTICATED: renew the token through the auth (once per failure), resubscribe at once.
- INVALID_ARGUMENT with the ``error-code`` trailer ``…fetch.replayid.corrupted`` or
  ``…replayid.validation.failed``: resubscribe from ``replay_fallback`` (LATEST or EARLIEST);
  one error log line, counted in ``replay_fallbacks``.
- UNAVAILABLE, a reset stream, any other transient status, a stream the server ended:
  capped exponential backoff with jitter.
- The silent stall: no response at all (keepalives included) for ``keepalive_timeout_s`` while
  waiting for one. A watchdog thread cancels the call; ``stalled`` stays true until the next
  response; counted in ``stalls``.
- PERMISSION_DENIED: :class:`SalesforceEventPermissionError` naming the missing permission;
  NOT_FOUND: :class:`SalesforceEventNotFound`; other refusals (a bad request):
  :class:`SalesforceStreamingError`. :meth:`PubSubClient._translate` is the one table.

Avro payloads are decoded with the schema ``GetSchema`` returns for the event's
``schema_id``, parsed once and cached; an unknown ``schema_id`` (a field added in Salesforce)
is fetched in the middle of the stream. A payload that does not decode is delivered with
``decode_error`` set and ``payload`` None.

Replay ids are :class:`~provisioning.core.replay_id.ReplayId` of transport ``pubsub``: the
server's bytes unchanged (logged in hex, the form ``--replay-from`` takes).

Stopping: :meth:`stop` cancels the call in progress (the stream, or a GetTopic or GetSchema on
the way) from any thread; the iteration ends at once.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import grpc

from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.errors import (
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceError,
    SalesforceEventNotFound,
    SalesforceEventPermissionError,
    SalesforceStreamingError,
    SalesforceTransientError,
    SalesforceUnavailable,
    event_not_found_remedy,
    event_permission_remedy,
)
from provisioning.salesforce.events import (
    EARLIEST,
    LATEST,
    Batch,
    Event,
    ReplayId,
    ReplayPreset,
    ReplayStart,
    Transport,
    describe_start,
)
from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb
from provisioning.salesforce.pubsub import pubsub_api_pb2_grpc as pb_grpc
from provisioning.salesforce.reconnect import Failure, ReconnectPolicy, Reconnects

log = get_logger(__name__)

# What counters() reports (for the listener's /metrics), every name always present.
COUNTER_NAMES = (
    "events",
    "batches",
    "keepalives",
    "subscribes",
    "reconnects",
    "replay_fallbacks",
    "auth_renewals",
    "stalls",
    "decode_errors",
    "schema_fetches",
    "network_errors",
    "delivery_limit_backoffs",
    "unanchored_resubscribes",
)

TRANSPORT = Transport.PUBSUB
DEFAULT_ENDPOINT = "api.pubsub.salesforce.com:7443"
MAX_BATCH_SIZE = 100
# Salesforce promises an empty keepalive response within 270 s; 30 s more absorbs a slow network
# and server-side scheduling without waiting much longer than the promise (field reports of the
# stall say the keepalive never comes at all, so a longer margin buys nothing).
DEFAULT_KEEPALIVE_TIMEOUT_S = 300.0
# How often the watchdog looks at the wait in progress.
WATCHDOG_TICK_S = 0.1
# GetSchema and GetTopic are answered at once; a slow one means trouble.
UNARY_TIMEOUT_S = 30.0

ERROR_CODE_KEY = "error-code"
TOPIC_NOT_FOUND_CODE = "sfdc.platform.eventbus.grpc.topic.not.found"
REPLAY_ERROR_CODES = frozenset(
    {
        "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted",
        "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.validation.failed",
    }
)
PERMISSION_HINT = (
    "the integration user (SF_USERNAME) needs read access to the Platform Event {topic} (in its "
    "permission set: Platform Event Permissions, Read); see README, 'Setting up Salesforce'"
)
# Statuses a new Subscribe call may cure (a reset stream arrives as UNAVAILABLE, INTERNAL or UNKNOWN).
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_PRESETS = {LATEST: pb.LATEST, EARLIEST: pb.EARLIEST}


@dataclass(frozen=True)
class TopicInfo:
    """What GetTopic says about the topic (``provisioning check``: can we subscribe?)."""

    topic_name: str
    tenant_guid: str
    can_subscribe: bool
    can_publish: bool
    schema_id: str


@dataclass(frozen=True)
class _Failure:
    """Why a Subscribe call ended, and what the recovery needs."""

    kind: Failure
    detail: str
    token: AccessToken | None = None


class _SchemaUnavailable(Exception):
    """GetSchema failed for a reason a new attempt may cure."""


class _Cancelled(Exception):
    """A unary call was cancelled by stop()."""


class PubSubClient:
    """A Pub/Sub API subscriber to one topic, with flow control, replay, recovery and a stall watchdog."""

    transport = TRANSPORT

    def __init__(
        self,
        *,
        auth: JWTBearerAuth,
        endpoint: str = DEFAULT_ENDPOINT,
        topic: str,
        ca_bundle: Path | None = None,
        batch_size: int = MAX_BATCH_SIZE,
        keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
        replay_fallback: ReplayPreset = EARLIEST,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not 1 <= batch_size <= MAX_BATCH_SIZE
        ):
            raise ValueError(
                f"batch_size (num_requested, SF_PUBSUB_BATCH_SIZE) must be an integer from 1 to {MAX_BATCH_SIZE}, "
                f"the most events Salesforce sends per FetchRequest; got {batch_size!r}"
            )
        if not isinstance(replay_fallback, ReplayPreset):
            raise ValueError("replay_fallback must be LATEST or EARLIEST")
        if keepalive_timeout_s <= 0:
            raise ValueError(f"keepalive_timeout_s must be above 0, got {keepalive_timeout_s!r}")
        self._auth = auth
        self.endpoint = endpoint
        self.topic = topic
        self.batch_size = batch_size
        self.keepalive_timeout_s = keepalive_timeout_s
        self.replay_fallback = replay_fallback
        self._reconnects = Reconnects(reconnect)
        root_certificates = Path(ca_bundle).read_bytes() if ca_bundle is not None else None
        self._channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates))
        self._stub = pb_grpc.PubSubStub(self._channel)  # type: ignore[no-untyped-call]
        self._counts: Counter[str] = Counter()
        self._schemas: dict[str, Any] = {}
        self._stop = threading.Event()
        self._running = threading.Lock()
        self._call_lock = threading.Lock()
        self._call: Any = None
        self._unary_call: Any = None
        self._connected = False
        self._stalled = False
        self._stall_detected = False
        self._waiting_since: float | None = None
        self._last_response_at: float | None = None
        # Positions: where the iteration started, the last ack, a keepalive anchor, the one in use.
        self._start: ReplayStart = LATEST
        self._acked: ReplayId | None = None
        self._anchor: ReplayId | None = None
        self._position: ReplayStart = LATEST
        self._subscribed_once = False
        self._topic_checked = False
        self._events_handed_out = False

    @classmethod
    def from_settings(cls, settings: Settings, *, auth: JWTBearerAuth | None = None) -> PubSubClient:
        return cls(
            auth=auth if auth is not None else JWTBearerAuth.from_settings(settings),
            endpoint=settings.sf_pubsub_endpoint,
            topic=settings.sf_provision_event_channel,
            ca_bundle=settings.tls_ca_bundle,
            batch_size=settings.sf_pubsub_batch_size,
            keepalive_timeout_s=settings.sf_pubsub_keepalive_timeout_s,
            replay_fallback=settings.replay_fallback(),
        )

    def __repr__(self) -> str:
        return f"PubSubClient(endpoint={self.endpoint!r}, topic={self.topic!r})"

    # -- the EventSource interface --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A Subscribe call is open and has not failed (a health signal)."""
        return self._connected

    @property
    def stalled(self) -> bool:
        """The stream went silent past the keepalive timeout; cleared by the next response."""
        return self._stalled

    @property
    def last_response_at(self) -> float | None:
        return self._last_response_at

    def counters(self) -> dict[str, int]:
        return {name: self._counts[name] for name in COUNTER_NAMES}

    def ack(self, position: ReplayId) -> None:
        self._acked = _own(position)

    def stop(self) -> None:
        """End the iteration in progress (or the next one) at once; never blocks; any thread."""
        self._stop.set()
        with self._call_lock:
            calls = (self._call, self._unary_call)
        for call in calls:
            if call is not None:
                call.cancel()

    def close(self) -> None:
        """Close the gRPC channel (the client is unusable afterwards)."""
        self.stop()
        self._channel.close()

    def batches(self, start: ReplayStart) -> Iterator[Batch]:
        """Batches from ``start`` until :meth:`stop`; see the module docstring.

        ``ValueError`` at once for a replay id of another transport.
        """
        return self._iterate(start if isinstance(start, ReplayPreset) else _own(start))

    def _iterate(self, start: ReplayStart) -> Generator[Batch, None, None]:
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this PubSubClient is already iterating")
        self._start = start
        self._acked = None
        self._anchor = None
        self._subscribed_once = False
        self._topic_checked = False
        self._events_handed_out = False
        self._reconnects.reset()
        done = threading.Event()
        watchdog = threading.Thread(target=self._watch, args=(done,), name="pubsub-watchdog", daemon=True)
        watchdog.start()
        try:
            while not self._stop.is_set():
                failure = yield from self._subscribe_once()
                if failure is None or self._stop.is_set():
                    return
                self._recover(failure)
        finally:
            done.set()
            self._connected = False
            # Only an iteration that subscribed has something to report (a refused one: its error says).
            (log.info if self._subscribed_once else log.debug)(
                "pubsub_stopped", topic=self.topic, acked=str(self._acked) if self._acked else None
            )
            self._stop.clear()
            self._running.release()

    # -- GetTopic -----------------------------------------------------------------------------

    def topic_info(self, token: AccessToken | None = None) -> TopicInfo:
        """GetTopic for our topic: does it exist, and may the integration user subscribe?

        :class:`SalesforceEventNotFound` when the org has no such topic.
        """
        info = self._unary(self._stub.GetTopic, pb.TopicRequest(topic_name=self.topic), "GetTopic", token)
        return TopicInfo(
            topic_name=info.topic_name,
            tenant_guid=info.tenant_guid,
            can_subscribe=info.can_subscribe,
            can_publish=info.can_publish,
            schema_id=info.schema_id,
        )

    # -- one Subscribe call -------------------------------------------------------------------

    def _subscribe_once(self) -> Generator[Batch, None, _Failure | None]:
        try:
            token = self._auth.token()
        except SalesforceTransientError as exc:
            return _Failure(Failure.NETWORK, f"login: {exc}")
        if not self._topic_checked:
            try:
                self._check_topic(token)
            except SalesforceTransientError as exc:
                return _Failure(Failure.NETWORK, f"GetTopic: {exc}")
            except _Cancelled:
                return None
        position = self._next_position()
        self._position = position
        first = pb.FetchRequest(topic_name=self.topic, num_requested=self.batch_size)
        if isinstance(position, ReplayPreset):
            first.replay_preset = _PRESETS[position]
        else:
            first.replay_preset = pb.CUSTOM
            first.replay_id = position.value
        outbox: queue.SimpleQueue[pb.FetchRequest | None] = queue.SimpleQueue()
        outbox.put(first)
        # Events requested and not yet received, by our own count: a response's pending_num_requested
        # is the server's count when it was sent, stale by the time a buffered response is read.
        owed = self.batch_size
        call = self._stub.Subscribe(_drain(outbox), metadata=self._metadata(token))
        with self._call_lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        self._counts["subscribes"] += 1
        self._subscribed_once = True
        self._connected = True
        log.info("pubsub_subscribed", topic=self.topic, replay_from=describe_start(position))
        try:
            while True:
                self._waiting_since = time.monotonic()
                try:
                    response = next(call)
                except StopIteration:
                    return _Failure(Failure.NETWORK, "the server ended the stream")
                except grpc.RpcError as exc:
                    return self._classify(exc, token)
                finally:
                    self._waiting_since = None
                self._last_response_at = time.time()
                self._stalled = False
                self._reconnects.reset()
                try:
                    batch = self._batch(response, token)
                except _SchemaUnavailable as exc:
                    return _Failure(Failure.NETWORK, f"GetSchema: {exc}")
                except _Cancelled:
                    return None
                owed -= len(response.events)
                if owed <= 0:
                    # The caller takes this batch now: ask for the next one so the stream never idles out.
                    outbox.put(pb.FetchRequest(num_requested=self.batch_size))
                    owed += self.batch_size
                self._counts["batches"] += 1
                if batch.events:
                    self._counts["events"] += len(batch.events)
                    self._events_handed_out = True
                else:
                    self._counts["keepalives"] += 1
                    if batch.position is None:
                        continue
                    if self._acked is None and not self._events_handed_out:
                        self._anchor = batch.position
                yield batch
        finally:
            outbox.put(None)
            call.cancel()
            with self._call_lock:
                self._call = None
            self._connected = False

    def _check_topic(self, token: AccessToken) -> None:
        """GetTopic before the iteration's first Subscribe: a missing topic or permission raises."""
        info = self.topic_info(token)
        if not info.can_subscribe:
            raise SalesforceEventPermissionError(
                f"Pub/Sub GetTopic ({self.endpoint}) says the integration user cannot subscribe to "
                f"{self.topic} (can_subscribe is false). Likely cause: {PERMISSION_HINT.format(topic=self.topic)}",
                remedy=event_permission_remedy(self.topic),
            )
        self._topic_checked = True

    def _next_position(self) -> ReplayStart:
        if self._acked is not None:
            return self._acked
        if self._anchor is not None:
            return self._anchor
        if not self._subscribed_once or self._start is not LATEST:
            return self._start
        # LATEST again could skip what was published meanwhile; the fallback is the operator's choice.
        self._counts["unanchored_resubscribes"] += 1
        log.warning(
            "pubsub_resubscribe_without_position",
            topic=self.topic,
            fallback=self.replay_fallback.value,
            reason="started from LATEST; nothing acknowledged and no keepalive position yet",
        )
        return self.replay_fallback

    def _metadata(self, token: AccessToken) -> tuple[tuple[str, str], ...]:
        org_id = token.org_id
        if org_id is None:
            raise SalesforceAuthError(
                "the login answer has no identity URL (…/id/<orgId>/<userId>), so the Pub/Sub API's "
                "tenantid is unknown; is SF_LOGIN_URL a Salesforce login host?"
            )
        return (("accesstoken", token.bearer()), ("instanceurl", token.instance_url), ("tenantid", org_id))

    # -- decoding -----------------------------------------------------------------------------

    def _batch(self, response: pb.FetchResponse, token: AccessToken) -> Batch:
        events = tuple(self._decode(consumer, token) for consumer in response.events)
        if events:
            return Batch(events, events[-1].replay_id)
        latest = bytes(response.latest_replay_id)
        return Batch((), ReplayId(TRANSPORT, latest) if latest else None)

    def _decode(self, consumer: pb.ConsumerEvent, token: AccessToken) -> Event:
        producer = consumer.event
        replay_id = ReplayId(TRANSPORT, bytes(consumer.replay_id))
        uuid = producer.id or None
        try:
            schema = self._schema(producer.schema_id, token)
        except ValueError as exc:
            return self._undecodable(replay_id, uuid, str(exc), consumer)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(producer.payload), schema, None)
        except Exception as exc:  # fastavro raises many kinds on bad bytes
            reason = (
                f"the payload does not decode with schema {producer.schema_id}: {type(exc).__name__}: {exc}"
            )
            return self._undecodable(replay_id, uuid, reason, consumer)
        if not isinstance(record, dict):
            return self._undecodable(replay_id, uuid, "the payload is not an Avro record", consumer)
        created = record.get("CreatedDate")
        created_at = created / 1000.0 if isinstance(created, int) and not isinstance(created, bool) else None
        return Event(replay_id=replay_id, uuid=uuid, payload=record, created_at=created_at, raw=consumer)

    def _undecodable(self, replay_id: ReplayId, uuid: str | None, reason: str, raw: Any) -> Event:
        self._counts["decode_errors"] += 1
        log.warning("pubsub_event_undecodable", topic=self.topic, replay_id=str(replay_id), reason=reason)
        return Event(replay_id=replay_id, uuid=uuid, payload=None, decode_error=reason, raw=raw)

    def _schema(self, schema_id: str, token: AccessToken) -> Any:
        """The parsed schema (cached); ValueError when Salesforce has no usable schema of that id."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        if not schema_id:
            raise ValueError("the event names no schema_id")
        try:
            info = self._unary(
                self._stub.GetSchema, pb.SchemaRequest(schema_id=schema_id), "GetSchema", token
            )
        except SalesforceTransientError as exc:
            raise _SchemaUnavailable(str(exc)) from None
        except SalesforceError as exc:
            raise ValueError(f"schema {schema_id} is not available: {exc}") from None
        self._counts["schema_fetches"] += 1
        try:
            parsed = fastavro.parse_schema(json.loads(info.schema_json))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"schema {schema_id} does not parse: {type(exc).__name__}: {exc}") from None
        self._schemas[schema_id] = parsed
        log.info("pubsub_schema_loaded", topic=self.topic, schema_id=schema_id)
        return parsed

    def _unary(self, method: Any, request: Any, what: str, token: AccessToken | None = None) -> Any:
        """A unary call with our metadata; one token renewal on UNAUTHENTICATED; errors translated.

        ``_Cancelled`` when stop() cancelled it.
        """
        token = token if token is not None else self._auth.token()
        try:
            return self._cancellable(method, request, token)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise self._translate(exc, what) from None
        self._counts["auth_renewals"] += 1
        token = self._auth.renew(token)
        try:
            return self._cancellable(method, request, token)
        except grpc.RpcError as exc:
            raise self._translate(exc, what) from None

    def _cancellable(self, method: Any, request: Any, token: AccessToken) -> Any:
        """The call as a future stop() can cancel (a GetTopic or GetSchema must not hold a stop up)."""
        future = method.future(request, metadata=self._metadata(token), timeout=UNARY_TIMEOUT_S)
        with self._call_lock:
            self._unary_call = future
        try:
            if self._stop.is_set():
                future.cancel()
            return future.result()
        except grpc.FutureCancelledError:
            raise _Cancelled() from None
        finally:
            with self._call_lock:
                self._unary_call = None

    def _translate(self, exc: grpc.RpcError, what: str) -> SalesforceError:
        """The one place gRPC errors become ours."""
        code, error_code, details = _status(exc)
        message = f"Pub/Sub {what} ({self.endpoint}) failed: {code.name} {error_code or ''} {details}".strip()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return SalesforceAuthError(message + " (even with a fresh token)", error_code=error_code)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return SalesforceEventPermissionError(
                f"{message}. Likely cause: {PERMISSION_HINT.format(topic=self.topic)}",
                error_code=error_code,
                remedy=event_permission_remedy(self.topic),
            )
        if code == grpc.StatusCode.NOT_FOUND and (
            error_code == TOPIC_NOT_FOUND_CODE or "topic.not.found" in details
        ):
            return SalesforceEventNotFound(
                f"{message}. The org has no Platform Event {self.topic}",
                error_code=error_code,
                remedy=event_not_found_remedy(self.topic),
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return SalesforceConnectionError(message, error_code=error_code)
        if code in _TRANSIENT:
            return SalesforceUnavailable(message, error_code=error_code)
        return SalesforceStreamingError(message, error_code=error_code)

    # -- recovery -----------------------------------------------------------------------------

    def _classify(self, exc: grpc.RpcError, token: AccessToken) -> _Failure | None:
        """Why the Subscribe call failed; None when we stopped it; raises when retrying cannot help."""
        if self._stop.is_set():
            return None
        code, error_code, details = _status(exc)
        detail = f"{code.name} {error_code or ''} {details}".strip()
        if code == grpc.StatusCode.CANCELLED and self._stall_detected:
            self._stall_detected = False
            return _Failure(Failure.STALL, f"no response for {self.keepalive_timeout_s:g} s")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return _Failure(Failure.AUTH, detail, token)
        if code == grpc.StatusCode.INVALID_ARGUMENT and error_code in REPLAY_ERROR_CODES:
            return _Failure(Failure.INVALID_REPLAY, detail)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error_code and "limit.exceeded" in error_code:
            return _Failure(Failure.DELIVERY_LIMIT, detail)
        if code in _TRANSIENT:
            return _Failure(Failure.NETWORK, detail)
        raise self._translate(exc, f"Subscribe to {self.topic}")

    def _recover(self, failure: _Failure) -> None:
        """Do what ``failure`` needs (renew, fall back, count), then wait before the next Subscribe."""
        self._counts["reconnects"] += 1
        delay = self._reconnects.wait_s(failure.kind)
        resume = str(self._acked) if self._acked else None
        if failure.kind is Failure.AUTH:
            self._counts["auth_renewals"] += 1
            log.warning(
                "pubsub_auth_invalid", topic=self.topic, error=failure.detail, resubscribe_from=resume
            )
            if failure.token is not None:
                try:
                    self._auth.renew(failure.token)
                except SalesforceTransientError as exc:
                    log.warning("pubsub_login_failed", topic=self.topic, error=str(exc))
                    delay = self._reconnects.backoff_s()
        elif failure.kind is Failure.INVALID_REPLAY:
            position = self._position
            if isinstance(position, ReplayPreset):
                raise SalesforceStreamingError(
                    f"the Pub/Sub API refused the replay preset {position.value} on {self.topic}: {failure.detail}"
                )
            self._counts["replay_fallbacks"] += 1
            # The one error line an operator needs: events between the stored id and the fallback are
            # replayed again (EARLIEST) or skipped (LATEST).
            log.error(
                "pubsub_replay_id_invalid",
                topic=self.topic,
                replay_id=str(position),
                fallback=self.replay_fallback.value,
                error=failure.detail,
            )
            self._acked = None
            self._anchor = None
            self._start = self.replay_fallback
            self._subscribed_once = False
            self._events_handed_out = False
        elif failure.kind is Failure.STALL:
            self._counts["stalls"] += 1
            log.warning(
                "pubsub_stall_recovered", topic=self.topic, error=failure.detail, resubscribe_from=resume
            )
        elif failure.kind is Failure.DELIVERY_LIMIT:
            self._counts["delivery_limit_backoffs"] += 1
            log.warning("pubsub_delivery_limit", topic=self.topic, error=failure.detail, retry_in_s=delay)
        else:
            self._counts["network_errors"] += 1
            log.warning(
                "pubsub_reconnect",
                topic=self.topic,
                error=failure.detail,
                retry_in_s=round(delay, 3),
                resubscribe_from=resume,
            )
        if delay > 0:
            self._stop.wait(delay)

    def _watch(self, done: threading.Event) -> None:
        """The stall watchdog: cancel a call that has been silent for keepalive_timeout_s."""
        while not done.wait(WATCHDOG_TICK_S):
            since = self._waiting_since
            if since is None or self._stall_detected:
                continue
            silent_s = time.monotonic() - since
            if silent_s <= self.keepalive_timeout_s:
                continue
            with self._call_lock:
                call = self._call
            if call is None:
                continue
            self._stall_detected = True
            self._stalled = True
            log.warning("pubsub_stalled", topic=self.topic, silent_s=round(silent_s, 1))
            call.cancel()


def _own(position: ReplayId) -> ReplayId:
    """``position`` if it is a Pub/Sub replay id; a CometD one is refused, never converted."""
    if not isinstance(position, ReplayId) or position.transport is not TRANSPORT:
        raise ValueError(
            f"{position!r} is not a Pub/Sub replay id: a CometD replay id cannot start a Pub/Sub subscription"
        )
    return position


def _drain(outbox: queue.SimpleQueue[pb.FetchRequest | None]) -> Iterator[pb.FetchRequest]:
    """The request stream of one Subscribe call: FetchRequests as they are queued, until None."""
    while True:
        request = outbox.get()
        if request is None:
            return
        yield request


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str | None, str]:
    """(status code, Salesforce ``error-code`` trailer, details) of a failed call."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    error_code = None
    for key, value in trailers or ():
        if key == ERROR_CODE_KEY:
            error_code = value.decode() if isinstance(value, bytes) else str(value)
    return code, error_code, str(details or "")
