"""The Salesforce simulator application: OAuth, REST, Streaming API and admin routes."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from provisioning.sandbox.common import ADMIN_PREFIX, FaultInjector, Faults, new_app
from provisioning.sandbox.salesforce import ids, soql
from provisioning.sandbox.salesforce.auth import (
    GRANT_TYPE_JWT,
    ConnectedApp,
    OAuthError,
    TokenStore,
    bearer_token,
)
from provisioning.sandbox.salesforce.bus import EventBus
from provisioning.sandbox.salesforce.cometd import CometD, StreamingFaults
from provisioning.sandbox.salesforce.model import (
    FRIENDLY_ORDER_KEYS,
    ORDER_FIELDS,
    ApiError,
    FieldSpec,
    Order,
    OrderStore,
    admin_view,
    coerce,
    order_record,
)
from provisioning.sandbox.salesforce.pubsub import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_KEEPALIVE_S, PubSub

DEFAULT_USERNAME = "integration@sandbox.example"
EVENT_SOBJECT = "OrderProvisionRequested__e"
EVENT_CHANNEL = f"/event/{EVENT_SOBJECT}"
EVENT_FIELDS = {
    "OrderId__c": FieldSpec("OrderId__c", "Order Id", "string", True, 18),
    "IdemKey__c": FieldSpec("IdemKey__c", "Idem Key", "string", True, 80),
    "Action__c": FieldSpec("Action__c", "Action", "string", True, 20),
    "Reason__c": FieldSpec("Reason__c", "Reason", "string", True, 255),
}
# Daily API request allocation shown in Sforce-Limit-Info (an Enterprise org of a few users).
DEFAULT_API_LIMIT = 100_000
# Admin bodies may carry thousands of events.
MAX_REQUEST_BYTES = 16 * 1024**2
LOWEST_API_VERSION = 20.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_error(status: int, error_code: str, message: str, fields: list[str] | None = None) -> web.Response:
    return _error_response(ApiError(status, error_code, message, fields))


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


NOT_FOUND = ("NOT_FOUND", "The requested resource does not exist")
QUERY_PAGE_SIZE = 2000


class SalesforceSimulator:
    """One simulated org: a Connected App for the JWT flow, Orders, the event bus and CometD."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int | None = None,
        token_lifetime_s: float = 7200,
        long_poll_s: float = 110.0,
        retention_s: float = 72 * 3600,
        api_version: str = "64.0",
        pubsub_keepalive_s: float = DEFAULT_KEEPALIVE_S,
        pubsub_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.workdir = Path(workdir)
        self.api_version = api_version
        self._rng = random.Random(seed)
        self.injector = FaultInjector(seed=seed)
        self.ids = ids.IdFactory(self._rng)
        self.org_id = self.ids.new(ids.PREFIX_ORG)
        self.user_id = self.ids.new(ids.PREFIX_USER)
        self.app = ConnectedApp.create(self._rng, DEFAULT_USERNAME)
        self.app.write(self.private_key_file, self.certificate_file)
        # The app as created (its certificate matches the key file) and, once asked for, the same app
        # holding another key's certificate (the admin knob foreign_certificate).
        self._own_app = self.app
        self._foreign_app: ConnectedApp | None = None
        self.tokens = TokenStore(self._rng, self.org_id, token_lifetime_s)
        self.orders = OrderStore(self._rng, self.ids)
        # Event payloads name their creator with a 15-character Id, as in the documentation's example.
        # The org's one Platform Event is the only topic it has.
        self.bus = EventBus(self._rng, retention_s, created_by=self.user_id[:15], topics=(EVENT_CHANNEL,))
        self.cometd = CometD(
            bus=self.bus, tokens=self.tokens, injector=self.injector, rng=self._rng, long_poll_s=long_poll_s
        )
        self.pubsub = PubSub(
            bus=self.bus,
            tokens=self.tokens,
            injector=self.injector,
            org_id=self.org_id,
            keepalive_s=pubsub_keepalive_s,
            idle_timeout_s=pubsub_idle_timeout_s,
        )
        self.api_limit = DEFAULT_API_LIMIT
        self.api_used = 0
        self._event_ids = 0
        # Records per query answer; the rest follows at nextRecordsUrl (2,000 on a real org).
        self.query_page_size = QUERY_PAGE_SIZE
        self._cursors: dict[str, list[dict[str, Any]]] = {}

    # -- configuration ----------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.app.client_id

    @property
    def username(self) -> str:
        return self.app.username

    @property
    def private_key_file(self) -> Path:
        return self.workdir / "sf-jwt-key.pem"

    @property
    def certificate_file(self) -> Path:
        return self.workdir / "sf-jwt-cert.pem"

    def env(self, base_url: str, pubsub_endpoint: str | None = None) -> dict[str, str]:
        """Settings that point our clients at this simulator served at ``base_url`` (and Pub/Sub)."""
        env = {
            "SF_LOGIN_URL": base_url.rstrip("/"),
            "SF_CLIENT_ID": self.client_id,
            "SF_USERNAME": self.username,
            "SF_PRIVATE_KEY_FILE": str(self.private_key_file),
            "SF_API_VERSION": self.api_version,
        }
        if pubsub_endpoint is not None:
            env["SF_PUBSUB_ENDPOINT"] = pubsub_endpoint
        return env

    def build_app(self) -> web.Application:
        data = r"/services/data/v{version:\d+\.\d}"
        app = new_app(
            [
                web.post("/services/oauth2/token", self._token),
                web.get(data + "/query{slash:/?}", self._rest("query", self._query)),
                web.get(data + "/query/{cursor}", self._rest("query_more", self._query_more)),
                web.get(data + "/sobjects/Order/{id}", self._rest("order_get", self._order_get)),
                web.patch(data + "/sobjects/Order/{id}", self._rest("order_patch", self._order_patch)),
                web.post(
                    data + "/sobjects/" + EVENT_SOBJECT + "{slash:/?}",
                    self._rest("event_publish", self._publish),
                ),
                web.route("*", "/services/data/{tail:.*}", self._rest("other", self._not_found)),
                web.post(r"/cometd/{version:\d+\.\d}", self._cometd),
            ],
            self._admin_routes(),
            self.injector.admin_routes(),
            client_max_size=MAX_REQUEST_BYTES,
        )
        app.on_response_prepare.append(self._limit_header)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, _: web.Application) -> None:
        self.cometd.closing = True
        self.pubsub.closing = True
        self.bus.notify()

    async def _limit_header(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/services/data/"):
            response.headers["Sforce-Limit-Info"] = f"api-usage={self.api_used}/{self.api_limit}"

    # -- OAuth ------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        async def action() -> web.StreamResponse:
            form = await request.post()
            base = _origin(request)
            try:
                if form.get("grant_type") != GRANT_TYPE_JWT:
                    raise OAuthError("unsupported_grant_type", "grant type not supported")
                assertion = form.get("assertion")
                if not isinstance(assertion, str) or not assertion:
                    raise OAuthError("invalid_grant", "invalid assertion")
                self.app.verify_assertion(assertion, base)
            except OAuthError as exc:
                return web.json_response(exc.body(), status=400)
            token, issued_at = self.tokens.issue()
            id_url = f"{base}/id/{self.org_id}/{self.user_id}"
            return web.json_response(
                {
                    "access_token": token,
                    "scope": "api",
                    "instance_url": base,
                    "id": id_url,
                    "token_type": "Bearer",
                    "issued_at": str(issued_at),
                    "signature": self.tokens.signature(id_url, issued_at),
                }
            )

        def injected(status: int) -> web.StreamResponse:
            body = {"error": "unknown_error", "error_description": "retry your request"}
            return web.json_response(body, status=400 if status == 200 else status)

        return await self.injector.run(request, "token", action, injected)

    # -- REST -------------------------------------------------------------------------------

    def _rest(self, operation: str, handler: Handler) -> Handler:
        """Wrap a REST handler: faults, version, session check, request limit, ApiError answers."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            async def action() -> web.StreamResponse:
                version = request.match_info.get("version")
                if version is not None and not LOWEST_API_VERSION <= float(version) <= float(
                    self.api_version
                ):
                    return api_error(404, *NOT_FOUND)
                if not self.tokens.valid(bearer_token(request.headers.get("Authorization"))):
                    return api_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
                if self.api_used >= self.api_limit:
                    return api_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
                self.api_used += 1
                try:
                    return await handler(request)
                except ApiError as exc:
                    return _error_response(exc)

            return await self.injector.run(request, operation, action, self._injected_rest_error)

        return wrapped

    def _injected_rest_error(self, status: int) -> web.StreamResponse:
        if status == 200:
            # Salesforce's own transient failure, at HTTP 400.
            return api_error(
                400,
                "UNABLE_TO_LOCK_ROW",
                "unable to obtain exclusive access to this record or 1 records: "
                + self.ids.new15(ids.PREFIX_ORDER),
            )
        if status == 429:
            return api_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        if status == 500:
            return api_error(
                500,
                "UNKNOWN_EXCEPTION",
                "An unexpected error occurred. Please include this ErrorId if you contact support: "
                f"{self._rng.randint(10**8, 10**9)}-{self._rng.randint(10**4, 10**5)} ({self._rng.randint(-(10**9), 0)})",
            )
        return api_error(
            status, "SERVER_UNAVAILABLE", "Server temporarily unavailable. Please try again later."
        )

    async def _not_found(self, _: web.Request) -> web.StreamResponse:
        return api_error(404, *NOT_FOUND)

    async def _query(self, request: web.Request) -> web.StreamResponse:
        query = soql.parse(request.query.get("q", ""))
        records = soql.execute(query, self.orders, request.match_info["version"])
        return web.json_response(self._page(records, len(records), request.match_info["version"]))

    async def _query_more(self, request: web.Request) -> web.StreamResponse:
        cursor = request.match_info["cursor"]
        records = self._cursors.pop(cursor.rsplit("-", 1)[0], None)
        if records is None:
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        total = int(cursor.rsplit("-", 1)[1]) if "-" in cursor else len(records)
        return web.json_response(self._page(records, total, request.match_info["version"]))

    def _page(self, records: list[dict[str, Any]], total: int, version: str) -> dict[str, Any]:
        """One page of a query's answer; the rest is kept behind a ``nextRecordsUrl`` (a query locator)."""
        page, rest = records[: self.query_page_size], records[self.query_page_size :]
        answer: dict[str, Any] = {"totalSize": total, "done": not rest, "records": page}
        if rest:
            locator = f"01g{self._rng.getrandbits(48):012X}"
            self._cursors[locator] = rest
            answer["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}-{total}"
        return answer

    def _find_order(self, record_id: str) -> Order:
        if not ids.is_valid_id(record_id):
            if len(record_id) in (15, 18) and record_id.isalnum():
                raise ApiError(400, "MALFORMED_ID", f"malformed id {record_id}")
            raise ApiError(
                404,
                "NOT_FOUND",
                f"Provided external ID field does not exist or is not accessible: {record_id}",
            )
        if not record_id.startswith(ids.PREFIX_ORDER):
            raise ApiError(400, "MALFORMED_ID", f"Order ID: id value of incorrect type: {record_id}", ["Id"])
        order = self.orders.get(record_id)
        if order is None:
            raise ApiError(404, *NOT_FOUND)
        return order

    async def _order_get(self, request: web.Request) -> web.StreamResponse:
        order = self._find_order(request.match_info["id"])
        names = None
        if request.query.get("fields"):
            lowered = {name.lower(): name for name in order.fields}
            names = []
            for raw in request.query["fields"].split(","):
                name = lowered.get(raw.strip().lower())
                if name is None:
                    raise ApiError(
                        400, "INVALID_FIELD", f"No such column '{raw.strip()}' on sobject of type Order"
                    )
                names.append(name)
        return web.json_response(order_record(order, request.match_info["version"], names))

    async def _order_patch(self, request: web.Request) -> web.StreamResponse:
        order = self._find_order(request.match_info["id"])
        body = await _json_body(request)
        changes = self.orders.validate_patch(body)
        self.orders.update(order, changes, source="api")
        return web.Response(status=204)

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {EVENT_SOBJECT} from START_ARRAY value [line:1, column:1]",
            )
        fields: dict[str, Any] = {}
        for key, value in body.items():
            if key == "attributes":
                continue
            spec = EVENT_FIELDS.get(key)
            if spec is None:
                raise ApiError(
                    400, "INVALID_FIELD", f"No such column '{key}' on sobject of type {EVENT_SOBJECT}"
                )
            fields[key] = coerce(spec, value)
        if not fields.get("OrderId__c"):
            raise ApiError(
                400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [OrderId__c]", ["OrderId__c"]
            )
        self.bus.publish(EVENT_CHANNEL, {name: fields.get(name) for name in EVENT_FIELDS})
        return web.json_response({"id": self._event_id(), "success": True, "errors": []}, status=201)

    def _event_id(self) -> str:
        self._event_ids += 1
        return "e00xx" + ids.base62(self._event_ids, 10)

    # -- Streaming --------------------------------------------------------------------------

    async def _cometd(self, request: web.Request) -> web.StreamResponse:
        if not LOWEST_API_VERSION <= float(request.match_info["version"]) <= float(self.api_version):
            return web.Response(status=404, text="Not Found")
        return await self.cometd.handle(request)

    # -- admin ------------------------------------------------------------------------------

    def _admin_routes(self) -> list[web.RouteDef]:
        p = ADMIN_PREFIX
        return [
            web.get(f"{p}/orders", self._admin_list_orders),
            web.post(f"{p}/orders", self._admin_seed_orders),
            web.get(f"{p}/orders/{{id}}", self._admin_get_order),
            web.patch(f"{p}/orders/{{id}}", self._admin_set_order),
            web.get(f"{p}/events", self._admin_list_events),
            web.post(f"{p}/events", self._admin_publish),
            web.get(f"{p}/streaming", self._admin_get_streaming),
            web.post(f"{p}/streaming", self._admin_set_streaming),
            web.post(f"{p}/tokens/revoke", self._admin_revoke),
            web.get(f"{p}/app", self._admin_get_app),
            web.post(f"{p}/app", self._admin_set_app),
            web.get(f"{p}/limits", self._admin_get_limits),
            web.post(f"{p}/limits", self._admin_set_limits),
            web.get(f"{p}/stats", self._admin_stats),
            web.post(f"{p}/reset", self._admin_reset),
        ]

    async def _admin_list_orders(self, _: web.Request) -> web.Response:
        return web.json_response({"orders": [admin_view(o) for o in self.orders]})

    async def _admin_seed_orders(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        items = body if isinstance(body, list) else [body]
        try:
            created = [self.orders.seed(item) for item in items]
        except ValueError as exc:
            return _admin_error(400, str(exc))
        return web.json_response({"ids": [o.id for o in created], "orders": [admin_view(o) for o in created]})

    async def _admin_get_order(self, request: web.Request) -> web.Response:
        order = self.orders.get(request.match_info["id"])
        if order is None:
            return _admin_error(404, "no such order")
        return web.json_response(admin_view(order))

    async def _admin_set_order(self, request: web.Request) -> web.Response:
        order = self.orders.get(request.match_info["id"])
        if order is None:
            return _admin_error(404, "no such order")
        body = await _admin_json(request)
        if not isinstance(body, dict):
            return _admin_error(400, "expected an object of Order fields")
        changes: dict[str, Any] = {}
        contact_keys = {"email": "Email", "first_name": "FirstName", "last_name": "LastName"}
        contact = {contact_keys[k]: v for k, v in body.items() if k in contact_keys}
        if contact and order.contact is None:
            return _admin_error(400, "the Order has no BillToContact to change")
        try:
            for key, value in body.items():
                if key in contact_keys:
                    continue
                name = FRIENDLY_ORDER_KEYS.get(key, key)
                if name not in ORDER_FIELDS or name == "Id":
                    raise ValueError(f"unknown or read-only field {key!r}")
                changes[name] = coerce(ORDER_FIELDS[name], value)
        except ApiError as exc:
            return _admin_error(400, exc.message)
        except ValueError as exc:
            return _admin_error(400, str(exc))
        if contact:
            assert order.contact is not None
            order.contact.update({k: None if v is None else str(v) for k, v in contact.items()})
        if changes:
            self.orders.update(order, changes, source="admin")
        return web.json_response(admin_view(order))

    async def _admin_list_events(self, request: web.Request) -> web.Response:
        channel = request.query.get("channel")
        after = request.query.get("after")
        try:
            after_id = int(after) if after is not None else None
        except ValueError:
            return _admin_error(400, "after is a replay id")
        return web.json_response(
            {"channels": self.bus.channels(), "events": self.bus.events(channel, after_id)}
        )

    async def _admin_publish(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        channel = request.query.get("channel", EVENT_CHANNEL)
        payloads = body if isinstance(body, list) else [body]
        if not all(isinstance(p, dict) for p in payloads):
            return _admin_error(400, "expected an event payload object or a list of them")
        events = [self.bus.publish(channel, dict(p), notify=False) for p in payloads]
        self.bus.notify()
        return web.json_response(
            {
                "events": [
                    {
                        "channel": e.channel,
                        "replayId": e.replay_id,
                        "EventUuid": e.message["data"]["event"]["EventUuid"],
                    }
                    for e in events
                ]
            }
        )

    async def _admin_get_streaming(self, _: web.Request) -> web.Response:
        return web.json_response({**self.cometd.faults.as_json(), **self.pubsub.knobs_json()})

    async def _admin_set_streaming(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        if not isinstance(body, dict):
            return _admin_error(400, "expected an object")
        pubsub = {k: v for k, v in body.items() if k in PubSub.KNOBS}
        unknown = set(body) - PubSub.KNOBS - CometD.KNOBS
        if unknown:
            known = sorted(PubSub.KNOBS | CometD.KNOBS)
            return _admin_error(400, f"unknown streaming settings {sorted(unknown)}; known: {known}")
        try:
            self.pubsub.check(pubsub)
            self.cometd.configure({k: v for k, v in body.items() if k not in PubSub.KNOBS})
        except ValueError as exc:
            return _admin_error(400, str(exc))
        self.pubsub.configure(pubsub)
        return await self._admin_get_streaming(request)

    async def _admin_revoke(self, _: web.Request) -> web.Response:
        revoked = self.tokens.revoke()
        self.bus.notify()  # held connects notice at once
        return web.json_response({"revoked": revoked})

    async def _admin_get_app(self, _: web.Request) -> web.Response:
        return web.json_response({"foreign_certificate": self.app is not self._own_app})

    async def _admin_set_app(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        if (
            not isinstance(body, dict)
            or set(body) - {"foreign_certificate"}
            or not isinstance(body.get("foreign_certificate", False), bool)
        ):
            return _admin_error(400, 'expected {"foreign_certificate": true | false}')
        if "foreign_certificate" in body:
            self.app = self._foreign() if body["foreign_certificate"] else self._own_app
        return await self._admin_get_app(request)

    def _foreign(self) -> ConnectedApp:
        """The Connected App with the certificate of a key nobody was given: every assertion is refused."""
        if self._foreign_app is None:
            other = ConnectedApp.create(self._rng, self.app.username)
            self._foreign_app = dataclasses.replace(self._own_app, certificate_pem=other.certificate_pem)
        return self._foreign_app

    async def _admin_get_limits(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"api_used": self.api_used, "api_limit": self.api_limit, "query_page_size": self.query_page_size}
        )

    async def _admin_set_limits(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        names = ("api_used", "api_limit", "query_page_size")
        if not isinstance(body, dict) or set(body) - set(names):
            return _admin_error(
                400, 'expected {"api_used"?: int, "api_limit"?: int, "query_page_size"?: int}'
            )
        for name in names:
            if name in body:
                value = body[name]
                least = 1 if name == "query_page_size" else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    return _admin_error(400, f"{name} is an integer of at least {least}")
                setattr(self, name, value)
        return await self._admin_get_limits(request)

    async def _admin_stats(self, _: web.Request) -> web.Response:
        stats = self.cometd.stats
        return web.json_response(
            {
                "handshakes": stats["handshakes"],
                "handshakes_denied": stats["handshakes_denied"],
                "subscribes": stats["subscribes"],
                "subscribe_failures": stats["subscribe_failures"],
                "connects": stats["connects"],
                "disconnects": stats["disconnects"],
                "unknown_client": stats["unknown_client"],
                "auth_invalid": stats["auth_invalid"],
                "daily_limit": stats["daily_limit"],
                "missing_cookie": stats["missing_cookie"],
                "events_published": self.bus.published,
                "events_delivered": stats["events_delivered"],
                "events_expired": stats["expired_events"],
                "clients": self.cometd.clients_json(),
                "pubsub": self.pubsub.stats_json(),
                "tokens_issued": self.tokens.issued,
                "tokens_active": self.tokens.active(),
                "orders": len(self.orders),
                "api_used": self.api_used,
                "api_limit": self.api_limit,
            }
        )

    async def _admin_reset(self, _: web.Request) -> web.Response:
        self.orders.clear()
        self.bus.clear()
        self.cometd.forget_all()
        self.cometd.faults = StreamingFaults()
        self.cometd.stats.clear()
        self.pubsub.reset()
        self.bus.schema_version = 0
        self.api_used = 0
        self.app = self._own_app
        self.injector.faults = Faults()
        self.injector.calls.clear()
        self.injector.injected.clear()
        self.injector.forced.clear()
        return web.json_response({"reset": True, "at": time.time()})


def _origin(request: web.Request) -> str:
    """The base URL the client used: the login URL and the instance URL at once."""
    return f"{request.scheme}://{request.host}"


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        raise ApiError(
            400, "JSON_PARSER_ERROR", "Unexpected character: was expecting a JSON value at [line:1, column:1]"
        ) from None


async def _admin_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        return None


def _admin_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
