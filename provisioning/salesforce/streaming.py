"""Streaming API (CometD/Bayeux long polling) subscriber for one Platform Event channel, on requests.

An :class:`~provisioning.salesforce.events.EventSource` (``transport == "cometd"``)::

    stream = StreamingClient(auth=auth, session=session, api_version="64.0",
                             channel="/event/OrderProvisionRequested__e", replay_fallback=EARLIEST)
    for batch in stream.batches(start):   # start: LATEST, EARLIEST or a stored replay id (bytes)
        handle(batch.events)              # e.g. publish the tasks, then write the checkpoint
        stream.ack(batch.position)        # processed: never delivered again

One :class:`~provisioning.salesforce.events.Batch` per Bayeux answer that carried events
(the events of one ``/meta/connect`` reply). Replay ids leave this module as
:class:`~provisioning.core.replay_id.ReplayId` of transport ``cometd`` (the integer CometD
uses, logged and typed as that integer); a Pub/Sub id is refused, never converted.

Delivery is pull-based: the next ``/meta/connect`` is sent only once the caller
asks for the next batch, so nothing is fetched ahead of what the caller holds.
Every (re)subscription replays from the last acknowledged replay id (or the
``replay_from`` given when nothing was acknowledged yet), so events received but
not acknowledged before a re-handshake are fetched again, and an acknowledged
event is never delivered again. Any failed or lost ``/meta/connect`` leads to a
new handshake and a resubscription from that point: a lost response cannot lose
events, and a re-handshake is never left without its subscription.

Handled (each answer sorted into a :class:`~provisioning.salesforce.reconnect.Failure`
by :meth:`_Reply.kind`, the wait :mod:`provisioning.salesforce.reconnect`'s, shared with
Pub/Sub): ``403::Unknown client`` / ``advice.reconnect=handshake`` (handshake,
resubscribe), ``401::Authentication invalid`` and HTTP 401 (renew the token
once through the auth, handshake, resubscribe), an invalid or too-old replay id
on subscribe (resubscribe with ``replay_fallback``: one error line, counted),
``403::Organization total events daily limit exceeded`` (the delivery limit: stay
disconnected for the policy's long wait), network errors and timeouts (capped
exponential backoff with jitter), a connect that outlives the long poll plus its
margin (the CometD form of a silent stall: counted in ``stalls``, ``stalled``
until the next answer, then handshake and resubscribe). Cookies (``BAYEUX_BROWSER``,
load-balancer cookies) live in the session's cookie jar. A subscription refused for
good is raised: ``400::The channel you requested to subscribe to does not exist``
as :class:`~provisioning.salesforce.errors.SalesforceEventNotFound` with its remedy, a 403
as :class:`~provisioning.salesforce.errors.SalesforceEventPermissionError` (the user may not read
the event) with its remedy, any other 4xx as
:class:`~provisioning.salesforce.errors.SalesforceStreamingError`.

Stopping: each Bayeux request runs in a short-lived daemon thread while the
iterating thread waits for it in steps of ``STOP_POLL_INTERVAL_S``, checking
:meth:`StreamingClient.stop`. A stopped iterator therefore ends within about
that interval even while a long poll is held open; the abandoned request is
released by a ``/meta/disconnect`` sent in the background (and, failing that,
by its read timeout). We chose this over shutting down the socket because
requests/urllib3 give no handle on the socket before the response headers
arrive, and over a short read timeout because the server decides the long poll.

Replay ids are opaque: they are only stored and compared, never computed with.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import requests

from provisioning.core.http import make_session
from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.errors import (
    SalesforceAuthError,
    SalesforceEventNotFound,
    SalesforceEventPermissionError,
    SalesforceStreamingError,
    SalesforceTransientError,
    event_not_found_remedy,
    event_permission_remedy,
)
from provisioning.salesforce.events import (
    EARLIEST,
    LATEST,
    Batch,
    ReplayId,
    ReplayPreset,
    ReplayStart,
    Transport,
)
from provisioning.salesforce.events import Event as SourceEvent
from provisioning.salesforce.reconnect import Failure, ReconnectPolicy, Reconnects

log = get_logger(__name__)

TRANSPORT = Transport.COMETD
# The replay extension's presets: CometD's own numbers, on the wire only.
REPLAY_LATEST = -1
REPLAY_EARLIEST = -2
REPLAY_PRESET_NAMES = {REPLAY_LATEST: "LATEST", REPLAY_EARLIEST: "EARLIEST"}
_PRESET_IDS = {LATEST: REPLAY_LATEST, EARLIEST: REPLAY_EARLIEST}

CONNECT_TIMEOUT_S = 10.0
# Read timeout of handshake, subscribe and disconnect (answered at once by the server).
HANDSHAKE_READ_TIMEOUT_S = 30.0
# Long poll assumed until the server's advice.timeout says otherwise (Salesforce: 110 s).
DEFAULT_LONG_POLL_S = 110.0
# A connect's read timeout is the long poll plus this, so a held poll is never cut short.
LONG_POLL_MARGIN_S = 15.0
DISCONNECT_TIMEOUT_S = 2.0
# How often a waiting iterator looks at stop(): bounds how long stopping takes.
STOP_POLL_INTERVAL_S = 0.1

_INVALID_REPLAY_MARKER = "you provided was invalid"
# The Streaming API's answer for a channel the org does not have (its error codes page: 400).
_NO_SUCH_CHANNEL_MARKER = "does not exist"


@dataclass
class StreamCounters:
    """Counts for the listener's metrics (monotonic over the client's life); calling it gives the dict."""

    events: int = 0
    batches: int = 0
    handshakes: int = 0
    subscribes: int = 0
    reconnects: int = 0
    replay_fallbacks: int = 0
    auth_renewals: int = 0
    delivery_limit_backoffs: int = 0
    network_errors: int = 0
    stalls: int = 0
    malformed_events: int = 0
    decode_errors: int = 0

    def __call__(self) -> dict[str, int]:
        return asdict(self)


class _Stopped(Exception):
    """stop() was called while waiting."""


@dataclass
class _Reply:
    """The meta reply to one request, and the token the request carried."""

    message: dict[str, Any]
    token: AccessToken
    http_status: int

    @property
    def successful(self) -> bool:
        return self.message.get("successful") is True and self.http_status == 200

    @property
    def error(self) -> str:
        error = str(self.message.get("error") or "")
        sfdc = (self.message.get("ext") or {}).get("sfdc") or {}
        reason = str(sfdc.get("failureReason") or "") if isinstance(sfdc, dict) else ""
        if reason:
            error = f"{error} ({reason})" if error else reason
        return error or f"HTTP {self.http_status}"

    @property
    def advice(self) -> dict[str, Any]:
        advice = self.message.get("advice")
        return advice if isinstance(advice, dict) else {}

    @property
    def code(self) -> int | None:
        """The Bayeux error code ("403::Unknown client" -> 403), if any."""
        head = str(self.message.get("error") or "").split(":", 1)[0]
        return int(head) if head.isdigit() else None

    @property
    def refused(self) -> bool:
        """A 4xx refusal that asking again will not change (as opposed to 5xx or transport trouble)."""
        code = self.code
        return code is not None and 400 <= code < 500 and self.http_status < 500

    def kind(self) -> Failure:
        """The one table of Bayeux errors: what this failed reply means for the reconnect policy."""
        text = self.error.lower()
        if self.http_status == 401 or text.startswith("401") or "(401" in text:
            return Failure.AUTH
        if "daily limit" in text:
            return Failure.DELIVERY_LIMIT
        if _INVALID_REPLAY_MARKER in text:
            return Failure.INVALID_REPLAY
        if "unknown client" in text or self.advice.get("reconnect") == "handshake":
            return Failure.REHANDSHAKE
        return Failure.NETWORK


class StreamingClient:
    """A CometD long-polling subscriber to one channel, with replay and recovery."""

    transport = TRANSPORT

    def __init__(
        self,
        *,
        auth: JWTBearerAuth,
        session: requests.Session,
        api_version: str,
        channel: str,
        replay_fallback: ReplayPreset | int = EARLIEST,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        if isinstance(replay_fallback, ReplayPreset):
            replay_fallback = _PRESET_IDS[replay_fallback]
        if replay_fallback not in REPLAY_PRESET_NAMES:
            raise ValueError("replay_fallback must be LATEST or EARLIEST (-1 or -2)")
        self._auth = auth
        self._session = session
        self.api_version = api_version
        self.channel = channel
        self.replay_fallback = replay_fallback
        self._reconnects = Reconnects(reconnect)
        self.counters = StreamCounters()
        self._stop = threading.Event()
        self._running = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: deque[SourceEvent] = deque()
        self._client_id: str | None = None
        self._subscribed_client: str | None = None
        self._last_token: AccessToken | None = None
        self._subscribed_once = False
        self._long_poll_s = DEFAULT_LONG_POLL_S
        self._interval_s = 0.0
        self._position: int = REPLAY_LATEST
        self._last_acked: int | None = None
        self._stalled = False
        # Wall-clock time of the last answer from the server: the listener's liveness signal.
        self._last_response_at: float | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        session: requests.Session | None = None,
        *,
        auth: JWTBearerAuth | None = None,
    ) -> StreamingClient:
        session = session if session is not None else make_session(settings.tls_ca_bundle)
        return cls(
            auth=auth if auth is not None else JWTBearerAuth.from_settings(settings, session),
            session=session,
            api_version=settings.sf_api_version,
            channel=settings.sf_provision_event_channel,
            replay_fallback=settings.replay_fallback(),
        )

    def __repr__(self) -> str:
        return f"StreamingClient(channel={self.channel!r}, position={self._position!r})"

    # -- public -----------------------------------------------------------------------------

    @property
    def last_acked(self) -> ReplayId | None:
        """The position the caller acknowledged last in this client's life."""
        return None if self._last_acked is None else ReplayId.cometd(self._last_acked)

    @property
    def connected(self) -> bool:
        """Handshaken and subscribed (a health signal; it says nothing of the next connect)."""
        return self._client_id is not None and self._client_id == self._subscribed_client

    @property
    def stalled(self) -> bool:
        """A connect outlived the long poll and its margin; cleared by the next answer."""
        return self._stalled

    @property
    def last_response_at(self) -> float | None:
        """Wall-clock time of the server's last answer."""
        return self._last_response_at

    def ack(self, position: ReplayId) -> None:
        """Mark everything up to ``position`` (a Batch's) processed: every later subscription starts after it."""
        replay_id = _id_int(position)
        self._position = replay_id
        self._last_acked = replay_id

    def stop(self) -> None:
        """End the iteration in progress (or the next one) within about STOP_POLL_INTERVAL_S; never blocks."""
        self._stop.set()

    def batches(self, start: ReplayStart) -> Iterator[Batch]:
        """Batches from ``start`` (LATEST, EARLIEST or a stored replay id) until stop().

        Raises SalesforceAuthError when a login is refused and SalesforceStreamingError
        when the subscription is refused for good; everything else is retried.
        """
        replay_from = _PRESET_IDS[start] if isinstance(start, ReplayPreset) else _id_int(start)
        return self._iterate(replay_from)

    def _iterate(self, replay_from: int) -> Generator[Batch, None, None]:
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this StreamingClient is already iterating")
        self._position = replay_from
        self._pending.clear()
        self._client_id = None
        self._subscribed_once = False
        self._reconnects.reset()
        try:
            while True:
                if self._pending and not self._stop.is_set():
                    events = tuple(self._pending)
                    self._pending.clear()
                    self.counters.events += len(events)
                    self.counters.batches += 1
                    yield Batch(events, events[-1].replay_id)
                if self._stop.is_set():
                    return
                if self._client_id is None:
                    self._establish()
                else:
                    self._connect()
        except _Stopped:
            return
        finally:
            # Only an iteration that subscribed has something to report (a refused one: its error says).
            (log.info if self._subscribed_once else log.debug)(
                "streaming_stopped", channel=self.channel, position=self._position
            )
            self._disconnect_in_background()
            self._pending.clear()
            self._stop.clear()
            self._running.release()

    # -- the Bayeux exchanges -----------------------------------------------------------------

    def _establish(self) -> None:
        """Handshake, then subscribe from the current position (falling back once if it is too old)."""
        reply = self._request(
            {
                "channel": "/meta/handshake",
                "version": "1.0",
                "minimumVersion": "1.0",
                "supportedConnectionTypes": ["long-polling"],
                "ext": {"replay": True},
            },
            read_timeout_s=HANDSHAKE_READ_TIMEOUT_S,
        )
        if reply is None:
            return
        client_id = reply.message.get("clientId")
        if not reply.successful or not client_id:
            self._recover(reply.kind(), reply, "handshake")
            return
        self._client_id = str(client_id)
        self.counters.handshakes += 1
        while self._client_id is not None:
            position = self._position
            reply = self._request(
                {
                    "channel": "/meta/subscribe",
                    "clientId": self._client_id,
                    "subscription": self.channel,
                    "ext": {"replay": {self.channel: position}},
                },
                read_timeout_s=HANDSHAKE_READ_TIMEOUT_S,
            )
            if reply is None:
                return
            if reply.successful:
                self._subscribed_client = self._client_id
                self._subscribed_once = True
                self.counters.subscribes += 1
                log.info("streaming_subscribed", channel=self.channel, replay_from=position)
                return
            kind = reply.kind()
            if kind is Failure.INVALID_REPLAY and position != self.replay_fallback:
                self.counters.replay_fallbacks += 1
                # The one error line an operator needs: events between the stored id and the fallback
                # are replayed again (EARLIEST) or skipped (LATEST).
                log.error(
                    "streaming_replay_id_invalid",
                    channel=self.channel,
                    replay_id=position,
                    fallback=self.replay_fallback,
                    fallback_name=REPLAY_PRESET_NAMES[self.replay_fallback],
                    error=reply.error,
                )
                self._position = self.replay_fallback
                continue
            if kind is Failure.INVALID_REPLAY or (kind is Failure.NETWORK and reply.refused):
                raise self._refused(reply, position)
            self._recover(kind, reply, "subscribe")

    def _connect(self) -> None:
        reply = self._request(
            {"channel": "/meta/connect", "clientId": self._client_id, "connectionType": "long-polling"},
            read_timeout_s=self._long_poll_s + LONG_POLL_MARGIN_S,
        )
        if reply is None:
            return
        advice = reply.advice
        if isinstance(advice.get("timeout"), int | float) and advice["timeout"] > 0:
            self._long_poll_s = advice["timeout"] / 1000.0
        if isinstance(advice.get("interval"), int | float) and advice["interval"] >= 0:
            self._interval_s = advice["interval"] / 1000.0
        if not reply.successful:
            self._recover(reply.kind(), reply, "connect")
            return
        self._reconnects.reset()
        if advice.get("reconnect") == "handshake":
            self._client_id = None
            return
        if self._interval_s > 0:
            self._stop.wait(self._interval_s)

    def _request(self, message: dict[str, Any], *, read_timeout_s: float) -> _Reply | None:
        """Send one message; its meta reply, or None after a failure already handled (backoff done).

        Events found in the answer are queued for the iterator.
        """
        meta_channel = message["channel"]
        message = {**message, "id": str(next(self._ids))}
        try:
            token = self._auth.token()
        except SalesforceAuthError:
            raise
        except SalesforceTransientError as exc:
            self._recover(Failure.NETWORK, None, f"login: {exc}")
            return None
        self._last_token = token
        try:
            response = self._post(token, [message], read_timeout_s)
        except requests.ReadTimeout:
            kind = Failure.STALL if meta_channel == "/meta/connect" else Failure.NETWORK
            self._recover(kind, None, f"{meta_channel}: no answer within {read_timeout_s:g} s")
            return None
        except requests.RequestException as exc:
            self._recover(Failure.NETWORK, None, f"{meta_channel}: {type(exc).__name__}")
            return None
        messages = _json_array(response)
        self._last_response_at = time.time()
        self._stalled = False
        if response.status_code == 401:
            return _Reply({"error": "401::Authentication invalid", "successful": False}, token, 401)
        reply: dict[str, Any] | None = None
        for item in messages:
            channel = item.get("channel")
            if channel == meta_channel and reply is None:
                reply = item
            elif channel == self.channel and "data" in item:
                self._queue_event(item)
        if reply is None:
            self._recover(
                Failure.NETWORK, None, f"{meta_channel}: HTTP {response.status_code} without a reply"
            )
            return None
        return _Reply(reply, token, response.status_code)

    def _post(
        self, token: AccessToken, messages: list[dict[str, Any]], read_timeout_s: float
    ) -> requests.Response:
        """POST in a helper thread and wait for it, giving up at once when stop() is called."""
        if self._stop.is_set():
            raise _Stopped()
        url = f"{token.instance_url}/cometd/{self.api_version}"
        done = threading.Event()
        outcome: list[requests.Response | BaseException] = []

        def send() -> None:
            try:
                outcome.append(
                    self._session.post(
                        url,
                        json=messages,
                        headers={"Authorization": f"Bearer {token.bearer()}"},
                        timeout=(CONNECT_TIMEOUT_S, read_timeout_s),
                    )
                )
            except BaseException as exc:  # handed to the waiting thread
                outcome.append(exc)
            finally:
                done.set()

        threading.Thread(target=send, name="cometd-request", daemon=True).start()
        while not done.wait(STOP_POLL_INTERVAL_S):
            if self._stop.is_set():
                raise _Stopped()
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _queue_event(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        meta = data.get("event") if isinstance(data, dict) else None
        replay_id = meta.get("replayId") if isinstance(meta, dict) else None
        if not isinstance(replay_id, int) or isinstance(replay_id, bool) or replay_id < 0:
            self.counters.malformed_events += 1
            log.warning("streaming_event_without_replay_id", channel=self.channel)
            return
        assert isinstance(data, dict)
        assert isinstance(meta, dict)
        payload = data.get("payload")
        error = None
        if not isinstance(payload, dict):
            self.counters.decode_errors += 1
            error = f"the payload is a {type(payload).__name__}, not a JSON object"
            payload = None
        uuid = meta.get("EventUuid")
        self._pending.append(
            SourceEvent(
                replay_id=ReplayId.cometd(replay_id),
                uuid=uuid if isinstance(uuid, str) else None,
                payload=payload,
                decode_error=error,
                created_at=_created_at(payload),
                raw=message,
            )
        )

    # -- recovery ---------------------------------------------------------------------------

    def _refused(self, reply: _Reply, position: int) -> SalesforceStreamingError:
        """The error for a subscription refused for good (the table of refusals is this method)."""
        message = f"subscribing to {self.channel} (replay from {position}) was refused: {reply.error}"
        if _NO_SUCH_CHANNEL_MARKER in reply.error.lower():
            return SalesforceEventNotFound(
                f"{message}. The org has no Platform Event {self.channel}",
                error_code=reply.error.split("::", 1)[0] or None,
                remedy=event_not_found_remedy(self.channel),
            )
        if reply.code == 403:
            # 403 on a subscribe: the user may not read the event (403::Unknown client never gets here).
            return SalesforceEventPermissionError(
                f"{message}. The integration user may not subscribe to {self.channel}",
                error_code="403",
                remedy=event_permission_remedy(self.channel),
            )
        return SalesforceStreamingError(message, error_code=reply.error.split("::", 1)[0] or None)

    def _recover(self, kind: Failure, reply: _Reply | None, step: str) -> None:
        """Drop the Bayeux session, do what ``kind`` needs, wait; the loop then handshakes again."""
        self._client_id = None
        self.counters.reconnects += 1
        error = reply.error if reply is not None else step
        delay = self._reconnects.wait_s(kind)
        if kind is Failure.AUTH:
            self.counters.auth_renewals += 1
            log.warning("streaming_auth_invalid", channel=self.channel, step=step, error=error)
            if reply is not None:
                try:
                    self._auth.renew(reply.token)
                except SalesforceTransientError as exc:
                    log.warning("streaming_login_failed", channel=self.channel, error=str(exc))
                    delay = self._reconnects.backoff_s()
        elif kind is Failure.DELIVERY_LIMIT:
            self.counters.delivery_limit_backoffs += 1
            log.warning(
                "streaming_daily_limit", channel=self.channel, step=step, error=error, retry_in_s=delay
            )
        elif kind is Failure.STALL:
            self.counters.stalls += 1
            self._stalled = True
            log.warning("streaming_stalled", channel=self.channel, step=step, resubscribe_from=self._position)
        elif kind is Failure.REHANDSHAKE:
            log.warning(
                "streaming_rehandshake",
                channel=self.channel,
                step=step,
                error=error,
                resubscribe_from=self._position,
            )
        else:
            self.counters.network_errors += 1
            log.warning(
                "streaming_reconnect",
                channel=self.channel,
                step=step,
                error=error,
                retry_in_s=round(delay, 3),
            )
        if delay > 0:
            self._stop.wait(delay)

    def _disconnect_in_background(self) -> None:
        """Tell the server we are gone (it then releases a held long poll); never waits for it."""
        client_id, token = self._client_id, self._last_token
        self._client_id = None
        if client_id is None or token is None:
            return
        message = [{"channel": "/meta/disconnect", "clientId": client_id, "id": str(next(self._ids))}]
        url = f"{token.instance_url}/cometd/{self.api_version}"

        def send() -> None:
            # Best effort: the server forgets the client after 40 s anyway.
            with contextlib.suppress(requests.RequestException):
                self._session.post(
                    url,
                    json=message,
                    headers={"Authorization": f"Bearer {token.bearer()}"},
                    timeout=(CONNECT_TIMEOUT_S, DISCONNECT_TIMEOUT_S),
                )

        threading.Thread(target=send, name="cometd-disconnect", daemon=True).start()


def _id_int(position: ReplayId) -> int:
    """The integer of a CometD replay id; ValueError for a Pub/Sub one (never converted)."""
    if not isinstance(position, ReplayId) or position.transport is not TRANSPORT:
        raise ValueError(
            f"{position!r} is not a CometD replay id: a Pub/Sub replay id cannot start a CometD subscription"
        )
    return position.number


def _created_at(payload: dict[str, Any] | None) -> float | None:
    created = payload.get("CreatedDate") if payload is not None else None
    if not isinstance(created, str):
        return None
    try:
        return dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _json_array(response: requests.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return []
    if isinstance(body, dict):
        body = [body]
    return [m for m in body if isinstance(m, dict)] if isinstance(body, list) else []
