"""Salesforce faked at the transport layer (a requests adapter), for the
clients' own unit tests.

It answers the JWT token endpoint (verifying the RS256 assertion), the REST
calls our client makes, and ``/cometd/<ver>`` with the Bayeux behaviour of
Salesforce (replay map keyed by channel, BAYEUX_BROWSER cookie, scripted
``403::Unknown client``, ``401::Authentication invalid``, daily limit, lost
responses). Replay ids are deliberately non-contiguous.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import requests
import urllib3
from requests.adapters import HTTPAdapter

LOGIN_URL = "https://login.fake.test"
INSTANCE_URL = "https://org.fake.test"
CLIENT_ID = "3MVG9-consumer-key"
USERNAME = "integration@example.com"
API_VERSION = "64.0"
CHANNEL = "/event/OrderProvisionRequested__e"
COMETD_PATH = f"/cometd/{API_VERSION}"
REST_PREFIX = f"/services/data/v{API_VERSION}/"
INVALID_REPLAY = (
    "400::The replayId {{{value}}} you provided was invalid.  Please provide a valid ID, "
    "-2 to replay all events, or -1 to replay only new events."
)


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    headers: dict[str, str]
    timeout: Any
    query: str = ""


class FakeSalesforce(HTTPAdapter):
    """One fake org. Thread-safe; faults are queued per Bayeux operation."""

    def __init__(self, public_key: Any, *, batch: int = 10, long_poll_s: float = 0.2) -> None:
        super().__init__()
        self.public_key = public_key
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.seen: list[Seen] = []
        # auth
        self.valid_tokens: set[str] = set()
        self.logins = 0
        self.claims: list[dict[str, Any]] = []
        self.login_error: tuple[int, dict[str, Any]] | None = None
        # REST: scripted answers first, then the defaults
        self.rest_script: deque[tuple[int, Any]] = deque()
        self.records: dict[str, dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        # Bayeux
        self.batch = batch
        self.long_poll_s = long_poll_s
        self.events: list[dict[str, Any]] = []
        self.retained_from = 0
        self.clients: dict[str, int] = {}  # clientId -> index of the next event to deliver
        self.faults: dict[str, deque[str]] = {"handshake": deque(), "subscribe": deque(), "connect": deque()}
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
        self._replay_ids = itertools.count(7001, 7)
        self._client_ids = itertools.count(1)

    # -- helpers for tests ----------------------------------------------------------------

    def publish(self, n: int = 1, **payload: Any) -> list[int]:
        ids = []
        with self.changed:
            for _ in range(n):
                rid = next(self._replay_ids)
                body = {"OrderId__c": f"order-{len(self.events)}", **payload}
                self.events.append({"replayId": rid, "EventUuid": str(uuid.uuid4()), "payload": body})
                ids.append(rid)
            self.changed.notify_all()
        return ids

    def revoke_tokens(self) -> None:
        with self.lock:
            self.valid_tokens.clear()

    def bayeux(self, channel: str) -> list[dict[str, Any]]:
        """Bayeux messages received on a meta channel, in order."""
        return [m for s in self.seen if s.path == COMETD_PATH for m in s.body if m.get("channel") == channel]

    def cometd_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path == COMETD_PATH]

    # -- transport --------------------------------------------------------------------------

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        parts = urlsplit(request.url or "")
        body: Any = request.body
        if isinstance(body, bytes):
            body = body.decode()
        if request.headers.get("Content-Type", "").startswith("application/json") and body:
            body = json.loads(body)
        with self.lock:
            self.seen.append(
                Seen(request.method or "", parts.path, body, dict(request.headers), timeout, parts.query)
            )
        if parts.path == "/services/oauth2/token":
            status, answer, headers = self._token(body)
        elif parts.path == COMETD_PATH:
            status, answer, headers = self._cometd(request, body, timeout)
        elif parts.path.startswith(REST_PREFIX):
            status, answer, headers = self._rest(
                request, parts.path.removeprefix(REST_PREFIX), parts.query, body
            )
        else:
            status, answer, headers = 404, [{"errorCode": "NOT_FOUND", "message": "no such path"}], []
        return self._response(request, status, answer, headers)

    def _response(
        self, request: requests.PreparedRequest, status: int, answer: Any, headers: list[tuple[str, str]]
    ) -> requests.Response:
        data = b"" if answer is None else json.dumps(answer).encode()
        msg = http.client.HTTPMessage()
        all_headers = [("Content-Type", "application/json;charset=UTF-8"), *headers]
        for key, value in all_headers:
            msg[key] = value
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(data),
            headers=dict(all_headers),
            status=status,
            preload_content=False,
            original_response=_Original(msg),  # type: ignore[arg-type]
        )
        return self.build_response(request, raw)

    # -- token endpoint -----------------------------------------------------------------------

    def _token(self, body: str) -> tuple[int, Any, list[tuple[str, str]]]:
        form = {k: v[0] for k, v in parse_qs(body).items()}
        with self.lock:
            self.logins += 1
            if self.login_error is not None:
                status, answer = self.login_error
                return status, answer, []
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return (
                400,
                {"error": "unsupported_grant_type", "error_description": "grant type not supported"},
                [],
            )
        try:
            claims = jwt.decode(
                form["assertion"],
                self.public_key,
                algorithms=["RS256"],
                audience=LOGIN_URL,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.InvalidAudienceError:
            return 400, {"error": "invalid_grant", "error_description": "audience is invalid"}, []
        except jwt.PyJWTError:
            return 400, {"error": "invalid_grant", "error_description": "invalid assertion"}, []
        if claims["iss"] != CLIENT_ID:
            return 400, {"error": "invalid_client_id", "error_description": "client identifier invalid"}, []
        if claims["sub"] != USERNAME:
            return (
                400,
                {"error": "invalid_grant", "error_description": "user hasn't approved this consumer"},
                [],
            )
        with self.lock:
            self.claims.append(claims)
            token = f"00Dfake!token-{self.logins}"
            self.valid_tokens.add(token)
        return (
            200,
            {
                "access_token": token,
                "instance_url": INSTANCE_URL,
                "id": f"{LOGIN_URL}/id/00Dfake/005fake",
                "token_type": "Bearer",
                "scope": "api",
            },
            [],
        )

    def _authorized(self, request: requests.PreparedRequest) -> bool:
        header = request.headers.get("Authorization", "")
        with self.lock:
            return header.startswith("Bearer ") and header.removeprefix("Bearer ") in self.valid_tokens

    # -- REST ---------------------------------------------------------------------------------

    def _rest(
        self, request: requests.PreparedRequest, path: str, query: str, body: Any
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        usage = [("Sforce-Limit-Info", f"api-usage={len(self.seen)}/15000")]
        if not self._authorized(request):
            return 401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}], []
        with self.lock:
            if self.rest_script:
                status, answer = self.rest_script.popleft()
                if isinstance(answer, Exception):
                    raise answer
                return status, answer, usage
        if path.startswith("query/"):
            soql = parse_qs(query)["q"][0]
            records = [r for rid, r in self.records.items() if f"Id = '{rid}'" in soql]
            return 200, {"totalSize": len(records), "done": True, "records": records}, usage
        if path.startswith("sobjects/Order/") and request.method == "PATCH":
            order_id = path.removeprefix("sobjects/Order/")
            if order_id not in self.records:
                return (
                    404,
                    [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}],
                    usage,
                )
            with self.lock:
                self.patches.append((order_id, body))
            return 204, None, usage
        if path.startswith("sobjects/OrderProvisionRequested__e") and request.method == "POST":
            self.publish(**body)
            return 201, {"id": "e00fake000000001AAA", "success": True, "errors": []}, usage
        return 404, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}], usage

    # -- Bayeux -------------------------------------------------------------------------------

    def _cometd(
        self, request: requests.PreparedRequest, body: Any, timeout: Any = None
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        if not isinstance(body, list):
            return 400, [{"successful": False, "error": "400::body must be a JSON array"}], []
        headers: list[tuple[str, str]] = []
        replies: list[dict[str, Any]] = []
        for message in body:
            channel = message.get("channel")
            if channel == "/meta/handshake":
                reply = self._handshake(request, message)
                if reply.get("successful"):
                    headers.append(("Set-Cookie", "BAYEUX_BROWSER=b1; Path=/cometd/; Secure; HttpOnly"))
                replies.append(reply)
            elif channel == "/meta/subscribe":
                replies.append(self._subscribe(request, message))
            elif channel == "/meta/connect":
                replies.extend(self._connect(request, message, timeout))
            elif channel == "/meta/disconnect":
                with self.lock:
                    self.clients.pop(str(message.get("clientId")), None)
                    self.changed.notify_all()
                replies.append(_reply(message, successful=True))
        return 200, replies, headers

    def _fault(self, operation: str) -> str | None:
        with self.lock:
            queue = self.faults[operation]
            return queue.popleft() if queue else None

    def _handshake(self, request: requests.PreparedRequest, message: dict[str, Any]) -> dict[str, Any]:
        fault = self._fault("handshake")
        if fault == "reset":
            raise requests.ConnectionError("connection reset by peer")
        if not self._authorized(request):
            return _reply(
                message,
                successful=False,
                error="403::Handshake denied",
                advice={"reconnect": "none"},
                ext={"sfdc": {"failureReason": "401::Authentication invalid"}},
            )
        with self.lock:
            client_id = f"client{next(self._client_ids)}"
            self.clients[client_id] = -1
        return _reply(
            message,
            successful=True,
            clientId=client_id,
            version="1.0",
            minimumVersion="1.0",
            supportedConnectionTypes=["long-polling"],
            ext={"replay": True, "payload.format": True},
        )

    def _subscribe(self, request: requests.PreparedRequest, message: dict[str, Any]) -> dict[str, Any]:
        client_id = message.get("clientId")
        base = {"clientId": client_id, "subscription": message.get("subscription")}
        if "BAYEUX_BROWSER=b1" not in request.headers.get("Cookie", ""):
            return _reply(
                message,
                **base,
                successful=False,
                error=f"400::Client {client_id} has established a session, but no BAYEUX_BROWSER cookie present",
            )
        fault = self._fault("subscribe")
        if fault == "unavailable":
            return _reply(
                message,
                **base,
                successful=False,
                error="503::Server unavailable",
                advice={"reconnect": "retry", "interval": 1000},
            )
        if fault == "denied":
            return _reply(message, **base, successful=False, error="403::Unknown channel")
        if fault == "no_such_channel":
            error = f"400::The channel you requested to subscribe to does not exist {{{message.get('subscription')}}}"
            return _reply(message, **base, successful=False, error=error)
        if fault == "unknown_client":
            return _reply(
                message,
                successful=False,
                error="403::Unknown client",
                advice={"reconnect": "handshake", "interval": 0},
            )
        with self.lock:
            if client_id not in self.clients:
                return _reply(
                    message,
                    successful=False,
                    error="403::Unknown client",
                    advice={"reconnect": "handshake", "interval": 0},
                )
            replay = (message.get("ext") or {}).get("replay") or {}
            if set(replay) != {message.get("subscription")}:
                return _reply(
                    message,
                    **base,
                    successful=False,
                    error=f"400::The replayId for channel {{{message.get('subscription')}}} wasn't found",
                )
            value = replay[message["subscription"]]
            if value == -1:
                start = len(self.events)
            elif value == -2:
                start = self.retained_from
            else:
                ids = [e["replayId"] for e in self.events]
                if value not in ids or ids.index(value) < self.retained_from:
                    return _reply(message, **base, successful=False, error=INVALID_REPLAY.format(value=value))
                start = ids.index(value) + 1
            self.clients[client_id] = start
        return _reply(message, **base, successful=True)

    def _connect(
        self, request: requests.PreparedRequest, message: dict[str, Any], timeout: Any = None
    ) -> list[dict[str, Any]]:
        client_id = str(message.get("clientId"))
        fault = self._fault("connect")
        if fault == "reset":
            raise requests.ConnectionError("connection reset by peer")
        if fault == "unknown_client":
            with self.lock:
                self.clients.pop(client_id, None)
            return [
                _reply(
                    message,
                    successful=False,
                    error="403::Unknown client",
                    advice={"reconnect": "handshake", "interval": 0},
                )
            ]
        if fault == "auth" or not self._authorized(request):
            return [
                _reply(
                    message,
                    clientId=client_id,
                    successful=False,
                    error="401::Authentication invalid",
                    advice={"reconnect": "none", "interval": 0},
                )
            ]
        if fault == "daily_limit":
            return [
                _reply(
                    message,
                    clientId=client_id,
                    successful=False,
                    error="403::Organization total events daily limit exceeded",
                    advice={"reconnect": "none", "interval": 0},
                )
            ]
        hold = self.hold
        if hold is not None:
            self.holding.set()
            # A held connect outlives the client's read timeout as a silent server would.
            read_timeout = timeout[1] if isinstance(timeout, tuple) else 30
            if not hold.wait(read_timeout):
                raise requests.ReadTimeout("the fake held the connect past the read timeout")
        with self.changed:
            if client_id not in self.clients or self.clients[client_id] < 0:
                return [
                    _reply(
                        message,
                        successful=False,
                        error="403::Unknown client",
                        advice={"reconnect": "handshake", "interval": 0},
                    )
                ]
            self.changed.wait_for(
                lambda: client_id not in self.clients or self.clients[client_id] < len(self.events),
                timeout=self.long_poll_s,
            )
            start = self.clients.get(client_id, len(self.events))
            batch = self.events[start : start + self.batch]
            if client_id in self.clients:
                self.clients[client_id] = start + len(batch)
        if fault == "lost":
            raise requests.ConnectionError("connection reset after the answer was produced")
        out = [
            {
                "channel": CHANNEL,
                "data": {
                    "schema": "s1",
                    "payload": e["payload"],
                    "event": {"replayId": e["replayId"], "EventUuid": e["EventUuid"]},
                },
            }
            for e in batch
        ]
        out.append(
            _reply(
                message,
                clientId=client_id,
                successful=True,
                advice={"interval": 0, "timeout": int(self.long_poll_s * 1000), "reconnect": "retry"},
            )
        )
        return out


class _Original:
    """What requests' cookie extraction reads from http.client's response."""

    def __init__(self, msg: http.client.HTTPMessage) -> None:
        self.msg = msg

    def isclosed(self) -> bool:
        return True


def _reply(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    reply = {"channel": message.get("channel"), "id": message.get("id")}
    reply.update(fields)
    return reply
