"""The Streaming API endpoint ``/cometd/<version>``: Bayeux over long polling, with replay.

Salesforce's behaviour, not a stock CometD server's: JSON array bodies only, a
bearer token on every request, the ``BAYEUX_BROWSER`` cookie after the
handshake, ``403::Unknown client`` (advice handshake), ``401::Authentication
invalid`` (advice none), the replay extension keyed by exact channel, events
sent in the connect response before the connect reply, and a subscription to an
event the org does not have refused with ``400::The channel you requested to
subscribe to does not exist {<channel>}`` (the Streaming API's error codes page). A subscription
to an event the integration user may not read (``readable``: the org's permission set and knobs)
is refused with ``403::Forbidden`` [the sandbox's wording: Salesforce's exact text for this case
was not confirmed].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from provisioning.sandbox.common import FaultInjector
from provisioning.sandbox.salesforce.auth import TokenStore, bearer_token
from provisioning.sandbox.salesforce.bus import REPLAY_NEW, EventBus, InvalidReplayId

BROWSER_COOKIE = "BAYEUX_BROWSER"
COOKIE_PATH = "/cometd/"
# Salesforce refuses larger POST bodies with 413.
MAX_BODY_BYTES = 32_768
# Events sent in one connect response; the rest wait for the next connect.
MAX_EVENTS_PER_CONNECT = 500
# A client that has not come back within this long after a response is forgotten (Salesforce: 40 s).
CLIENT_IDLE_EXPIRY_S = 40.0
CHANNEL_PATTERN = re.compile(r"^/event/[A-Za-z][A-Za-z0-9_]*__e$")

NOT_READABLE = "403::Forbidden"
INVALID_REPLAY = (
    "400::The replayId {{{value}}} you provided was invalid.  Please provide a valid ID, "
    "-2 to replay all events, or -1 to replay only new events."
)
REPLAY_MAP_MISMATCH = (
    "400::The replayId for channel {{{channel}}} wasn't found using the provided replay ID map {{{mapping}}}. "
    "Ensure that the channel name you provided in the replay map is valid and matches the channel name used "
    "for subscribing."
)
# Salesforce's answer for a channel that does not exist (Streaming API Error Codes: 400).
NO_SUCH_CHANNEL = "400::The channel you requested to subscribe to does not exist {{{channel}}}"
NO_COOKIE = "400::Client {client_id} has established a session, but no BAYEUX_BROWSER cookie present"
UNKNOWN_CLIENT = "403::Unknown client"
AUTH_INVALID = "401::Authentication invalid"
DAILY_LIMIT = "403::Organization total events daily limit exceeded"
ADVICE_HANDSHAKE = {"reconnect": "handshake", "interval": 0}
ADVICE_NONE = {"reconnect": "none", "interval": 0}


@dataclass
class CometClient:
    client_id: str
    browser: str
    replay: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # channel -> last delivered replay id
    first_connect: bool = True
    connect_generation: int = 0
    holding: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    delivered: int = 0

    def expired(self) -> bool:
        return not self.holding and time.monotonic() - self.last_seen > CLIENT_IDLE_EXPIRY_S


@dataclass
class StreamingFaults:
    """Admin knobs; counts are one-shot faults for the next connects of any client."""

    unknown_client: int = 0
    auth_invalid: int = 0
    daily_limit: int = 0
    daily_limit_sticky: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "unknown_client": self.unknown_client,
            "auth_invalid": self.auth_invalid,
            "daily_limit": True if self.daily_limit_sticky else self.daily_limit,
        }


class CometD:
    """Bayeux server state: clients, their subscriptions, the streaming fault knobs."""

    def __init__(
        self,
        *,
        bus: EventBus,
        tokens: TokenStore,
        injector: FaultInjector,
        rng: random.Random,
        long_poll_s: float,
    ) -> None:
        self.bus = bus
        self.tokens = tokens
        self.injector = injector
        self.long_poll_s = long_poll_s
        self.faults = StreamingFaults()
        self.clients: dict[str, CometClient] = {}
        self.stats: Counter[str] = Counter()
        self.closing = False
        self._rng = rng
        self._browsers: set[str] = set()
        # Whether the integration user may subscribe to a channel (the org's permission set and knobs).
        self.readable: Callable[[str], bool] = lambda channel: True

    # -- HTTP ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if len(raw) > MAX_BODY_BYTES:
            return web.Response(status=413, text="Maximum Request Size Exceeded")
        try:
            messages = json.loads(raw)
        except ValueError:
            return web.Response(status=400, text="Bad Request: the body is not JSON")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return web.Response(
                status=400, text="Bad Request: the body must be a JSON array of Bayeux messages"
            )
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return web.json_response(
                [_reply(m, successful=False, error="401::Request requires authentication") for m in messages],
                status=401,
            )
        operation = _operation(messages)

        async def action() -> web.StreamResponse:
            return await self._process(messages, token, request.cookies.get(BROWSER_COOKIE))

        def injected(status: int) -> web.StreamResponse:
            code = 503 if status == 200 else status
            replies = [
                _reply(
                    m,
                    successful=False,
                    error=f"{code}::Server unavailable",
                    advice={"reconnect": "retry", "interval": 1000},
                )
                for m in messages
            ]
            return web.json_response(replies, status=status)

        # Streaming calls get latency by default; errors and resets only when asked for by name.
        if operation in self.injector.faults.operations or self.injector.forced.get(operation):
            return await self.injector.run(request, operation, action, injected)
        self.injector.calls[operation] += 1
        await self.injector.delay(operation)
        return await action()

    async def _process(
        self, messages: list[dict[str, Any]], token: str, browser: str | None
    ) -> web.StreamResponse:
        replies: list[dict[str, Any]] = []
        connect: tuple[dict[str, Any], CometClient] | None = None
        new_browser: str | None = None
        for message in messages:
            channel = message.get("channel")
            if channel == "/meta/handshake":
                reply, issued = self._handshake(message, token, browser)
                replies.append(reply)
                if issued is not None:
                    new_browser = browser = issued
                continue
            client, error = self._client_for(message, token, browser)
            if client is None:
                replies.append(error)
            elif channel == "/meta/connect" and connect is None:
                connect = (message, client)
            elif channel == "/meta/subscribe":
                replies.append(self._subscribe(message, client))
            elif channel == "/meta/unsubscribe":
                replies.append(self._unsubscribe(message, client))
            elif channel == "/meta/disconnect":
                self.stats["disconnects"] += 1
                self.forget(client)
                replies.append(_reply(message, client_id=client.client_id))
            else:
                replies.append(
                    _reply(message, client_id=client.client_id, successful=False, error="403::Publish denied")
                )
        if connect is not None:
            replies.extend(await self._connect(*connect, token))
        response = web.json_response(replies)
        if new_browser is not None:
            response.set_cookie(BROWSER_COOKIE, new_browser, path=COOKIE_PATH, secure=True, httponly=True)
        return response

    # -- meta channels ------------------------------------------------------------------------

    def _handshake(
        self, message: dict[str, Any], token: str, browser: str | None
    ) -> tuple[dict[str, Any], str | None]:
        self.stats["handshakes"] += 1
        if not self.tokens.valid(token):
            self.stats["handshakes_denied"] += 1
            reply = _reply(
                message, successful=False, error="403::Handshake denied", advice={"reconnect": "none"}
            )
            reply["ext"] = {"sfdc": {"failureReason": AUTH_INVALID}}
            return reply, None
        self._sweep()
        client_id = "".join(self._rng.choice(string.ascii_lowercase + string.digits) for _ in range(27))
        issued = None
        if browser is None or browser not in self._browsers:
            issued = browser = "".join(
                self._rng.choice(string.ascii_letters + string.digits) for _ in range(22)
            )
            self._browsers.add(browser)
        replay = (message.get("ext") or {}).get("replay") is True
        self.clients[client_id] = CometClient(client_id=client_id, browser=browser, replay=replay)
        reply = _reply(message, client_id=client_id)
        reply.update(
            ext={"replay": True, "payload.format": True} if replay else {"payload.format": True},
            version="1.0",
            minimumVersion="1.0",
            supportedConnectionTypes=["long-polling"],
        )
        return reply, issued

    def _client_for(
        self, message: dict[str, Any], token: str, browser: str | None
    ) -> tuple[CometClient | None, dict[str, Any]]:
        client_id = message.get("clientId")
        client = self.clients.get(client_id) if isinstance(client_id, str) else None
        if client is not None and client.expired():
            self.forget(client)
            client = None
        if client is None:
            self.stats["unknown_client"] += 1
            return None, _reply(message, successful=False, error=UNKNOWN_CLIENT, advice=ADVICE_HANDSHAKE)
        if browser != client.browser:
            self.stats["missing_cookie"] += 1
            error = NO_COOKIE.format(client_id=client.client_id)
            return None, _reply(
                message, client_id=client.client_id, successful=False, error=error, advice=ADVICE_HANDSHAKE
            )
        if not self.tokens.valid(token):
            return None, self._auth_invalid(message, client)
        client.last_seen = time.monotonic()
        return client, {}

    def _subscribe(self, message: dict[str, Any], client: CometClient) -> dict[str, Any]:
        self.stats["subscribes"] += 1
        channel = message.get("subscription")
        client_id = client.client_id
        if not isinstance(channel, str) or not CHANNEL_PATTERN.match(channel):
            self.stats["subscribe_failures"] += 1
            return _reply(
                message,
                client_id=client_id,
                subscription=channel,
                successful=False,
                error="403::Unknown channel",
            )
        if not self.bus.has_topic(channel):
            self.stats["subscribe_failures"] += 1
            return _reply(
                message,
                client_id=client_id,
                subscription=channel,
                successful=False,
                error=NO_SUCH_CHANNEL.format(channel=channel),
            )
        if not self.readable(channel):
            self.stats["subscribe_failures"] += 1
            return _reply(
                message, client_id=client_id, subscription=channel, successful=False, error=NOT_READABLE
            )
        replay: Any = REPLAY_NEW
        ext = message.get("ext") or {}
        if client.replay and isinstance(ext, dict) and "replay" in ext:
            mapping = ext["replay"]
            if not isinstance(mapping, dict) or channel not in mapping:
                self.stats["subscribe_failures"] += 1
                error = REPLAY_MAP_MISMATCH.format(channel=channel, mapping=_java_map(mapping))
                return _reply(
                    message, client_id=client_id, subscription=channel, successful=False, error=error
                )
            replay = mapping[channel]
        try:
            if isinstance(replay, bool) or not isinstance(replay, int | str):
                raise InvalidReplayId(replay)
            after = self.bus.start_position(channel, int(replay))
        except (InvalidReplayId, ValueError):
            self.stats["subscribe_failures"] += 1
            return _reply(
                message,
                client_id=client_id,
                subscription=channel,
                successful=False,
                error=INVALID_REPLAY.format(value=replay),
            )
        client.subscriptions[channel] = after
        # A held connect of this client may now have events to deliver.
        self.bus.notify()
        return _reply(message, client_id=client_id, subscription=channel)

    def _unsubscribe(self, message: dict[str, Any], client: CometClient) -> dict[str, Any]:
        channel = message.get("subscription")
        if isinstance(channel, str):
            client.subscriptions.pop(channel, None)
        return _reply(message, client_id=client.client_id, subscription=channel)

    async def _connect(
        self, message: dict[str, Any], client: CometClient, token: str
    ) -> list[dict[str, Any]]:
        self.stats["connects"] += 1
        first = client.first_connect
        client.first_connect = False
        client.connect_generation += 1
        generation = client.connect_generation
        timeout = self.long_poll_s
        advice = message.get("advice")
        if isinstance(advice, dict) and isinstance(advice.get("timeout"), int | float):
            timeout = min(timeout, max(0.0, advice["timeout"] / 1000.0))
        if first:
            timeout = 0.0  # the first connect after a handshake is answered at once
        deadline = time.monotonic() + timeout
        client.holding = True
        events = []
        try:
            while True:
                failure = self._connect_failure(message, client, token)
                if failure is not None:
                    return [failure]
                if (
                    self.clients.get(client.client_id) is not client
                    or generation != client.connect_generation
                ):
                    break  # disconnected, or replaced by a newer connect of the same client
                events = self.bus.pending(client.subscriptions, MAX_EVENTS_PER_CONNECT)
                remaining = deadline - time.monotonic()
                if events or remaining <= 0 or self.closing:
                    break
                waiter = self.bus.waiter
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), remaining)
        finally:
            client.holding = False
            client.last_seen = time.monotonic()
        for event in events:
            if event.channel in client.subscriptions:
                client.subscriptions[event.channel] = event.replay_id
        client.delivered += len(events)
        self.stats["events_delivered"] += len(events)
        reply = _reply(message, client_id=client.client_id)
        if first:
            reply["advice"] = {"interval": 0, "timeout": int(self.long_poll_s * 1000), "reconnect": "retry"}
        return [*(e.message for e in events), reply]

    def _connect_failure(
        self, message: dict[str, Any], client: CometClient, token: str
    ) -> dict[str, Any] | None:
        faults = self.faults
        if faults.auth_invalid > 0:
            faults.auth_invalid -= 1
            self.tokens.revoke(token)
            return self._auth_invalid(message, client)
        if not self.tokens.valid(token):
            return self._auth_invalid(message, client)
        if faults.unknown_client > 0:
            faults.unknown_client -= 1
            self.stats["unknown_client"] += 1
            self.forget(client)
            return _reply(message, successful=False, error=UNKNOWN_CLIENT, advice=ADVICE_HANDSHAKE)
        if faults.daily_limit_sticky or faults.daily_limit > 0:
            if not faults.daily_limit_sticky:
                faults.daily_limit -= 1
            self.stats["daily_limit"] += 1
            return _reply(
                message, client_id=client.client_id, successful=False, error=DAILY_LIMIT, advice=ADVICE_NONE
            )
        return None

    def _auth_invalid(self, message: dict[str, Any], client: CometClient) -> dict[str, Any]:
        self.stats["auth_invalid"] += 1
        self.forget(client)
        return _reply(
            message, client_id=client.client_id, successful=False, error=AUTH_INVALID, advice=ADVICE_NONE
        )

    # -- state --------------------------------------------------------------------------------

    def forget(self, client: CometClient) -> None:
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
            self.bus.notify()

    def forget_all(self) -> None:
        self.clients.clear()
        self.bus.notify()

    def _sweep(self) -> None:
        for client in [c for c in self.clients.values() if c.expired()]:
            del self.clients[client.client_id]

    KNOBS = frozenset({"unknown_client", "auth_invalid", "daily_limit", "expire_retention", "forget_clients"})

    def configure(self, data: dict[str, Any]) -> None:
        """Apply admin knobs (see the package docstring); raises ValueError."""
        known = self.KNOBS
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown streaming settings {sorted(unknown)}; known: {sorted(known)}")
        for name in ("unknown_client", "auth_invalid"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} is a count of one-shot faults")
        limit = data.get("daily_limit")
        if limit is not None and (not isinstance(limit, int) or (not isinstance(limit, bool) and limit < 0)):
            raise ValueError("daily_limit is true (until false), false, or a count of one-shot faults")
        for name in ("unknown_client", "auth_invalid"):
            if name in data:
                setattr(self.faults, name, data[name])
        if isinstance(limit, bool):
            self.faults.daily_limit_sticky = limit
            self.faults.daily_limit = 0
        elif isinstance(limit, int):
            self.faults.daily_limit_sticky = False
            self.faults.daily_limit = limit
        if data.get("expire_retention"):
            self.stats["expired_events"] += self.bus.expire_all()
        if data.get("forget_clients"):
            self.forget_all()
        self.bus.notify()

    def clients_json(self) -> list[dict[str, Any]]:
        return [
            {
                "clientId": c.client_id,
                "replay": c.replay,
                "subscriptions": dict(c.subscriptions),
                "holding": c.holding,
                "delivered": c.delivered,
            }
            for c in self.clients.values()
        ]


def _operation(messages: list[dict[str, Any]]) -> str:
    channels = {m.get("channel") for m in messages}
    for name in ("connect", "handshake", "subscribe", "unsubscribe", "disconnect"):
        if f"/meta/{name}" in channels:
            return f"cometd_{name}"
    return "cometd_publish"


def _reply(
    message: dict[str, Any],
    *,
    client_id: str | None = None,
    successful: bool = True,
    error: str | None = None,
    advice: dict[str, Any] | None = None,
    subscription: Any = None,
) -> dict[str, Any]:
    reply: dict[str, Any] = {}
    if client_id is not None:
        reply["clientId"] = client_id
    reply["channel"] = message.get("channel")
    if "id" in message:
        reply["id"] = message["id"]
    if subscription is not None:
        reply["subscription"] = subscription
    if error is not None:
        reply["error"] = error
    if advice is not None:
        reply["advice"] = advice
    reply["successful"] = successful
    return reply


def _java_map(mapping: Any) -> str:
    if isinstance(mapping, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in mapping.items()) + "}"
    return str(mapping)
