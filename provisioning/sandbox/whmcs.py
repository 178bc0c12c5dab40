"""WHMCS simulator: the classic External API (``POST /includes/api.php``) and its quirks.

Follows the real server (WHMCS 8.x source; see the WHMCS fact sheet):

- form fields ``action`` (case-insensitive, non-alphanumerics stripped), ``identifier`` +
  ``secret`` (or ``username`` + ``password``), ``responsetype``; PHP array syntax ``pid[0]=1``;
  booleans are PHP-truthy (``""`` and ``"0"`` are false, ``"false"`` is true);
- always HTTP 200 with ``{"result": "success" | "error", "message"}``; GetInvoice's not-found error
  says ``"status": "error"`` instead; without ``responsetype``, GetOrders and GetInvoice answer
  XML and the other actions NVP (``key=value;key=value``); numbers from the database are strings;
- checks in the server's order: ``IP Banned``, the IP allow-list (``Invalid IP <ip>``, off unless
  set), credentials (``Invalid or missing credentials`` for a missing or unknown identifier,
  ``Authentication Failed`` for a wrong secret), then ``Invalid API Action: "<action>" is not a
  valid API action``. Each wrong secret is a failed login of the caller's IP; after
  ``ban_after_failures`` of them (failures are forgotten 30 minutes after the last one) the IP is
  banned for ``ban_s`` seconds and every call answers ``IP Banned``, good credentials included.
- CancelOrder (``orderid``, ``noemail``): a Pending order only, else ``Order ID not found or Status
  not Pending`` (as AcceptOrder); the order, its services and its unpaid invoice become Cancelled.
  ModuleTerminate (``serviceid`` or ``accountid``): ``Service ID is required``, ``Service ID not
  found``; an Active or Suspended service becomes Terminated, any other status answers a module
  error (our wording: real modules word theirs).
- AddOrder with an unknown ``pid``: the real cart drops the product, then answers
  ``No items remain in the cart. Order cannot proceed.``; with no ``pid`` at all,
  ``No items added to cart so order cannot proceed``. An order's services (one per unit of
  ``qty``) and its invoice (Unpaid; Paid when the total is 0) are created with it.

Faults (:class:`~provisioning.sandbox.common.FaultInjector`) apply to every API call; the
operation is the canonical action name (``AddOrder``, ``GetOrders``, ...; an unknown action counts
under its normalised name). An injected error with ``error_status`` 200 is the WHMCS error envelope
with :data:`TRANSIENT_DB_ERROR`, the message a real WHMCS gives when MySQL fails mid-call (an
``SQLSTATE[...]`` PDO message; clients classify messages starting with ``SQLSTATE[`` as transient);
any other status is an Apache-style HTML error page.

Admin routes (JSON, never subject to faults):

- ``POST /__admin/clients``  a client object or a list of them: ``{"id"?, "firstname", "lastname",
  "email", "status"? (Active|Inactive|Closed, default Active), "companyname"?, "defaultgateway"?,
  "paymethods"?: [PAYMETHOD]}`` → ``{"ids": [...]}``. PAYMETHOD: ``{"id"?, "type"?
  (CreditCard|RemoteCreditCard|PayToken|BankAccount|RemoteBankAccount, default CreditCard),
  "description"?, "gateway_name"?, "card_last_four"?, "expiry_date"? ("MM/YY"), "card_type"?,
  "bank_name"?}``.
- ``GET  /__admin/clients``  ``{"clients": [CLIENT]}`` (with their pay methods).
- ``PATCH /__admin/clients/{id}``  any client field; ``"paymethods"`` replaces the list,
  ``"add_paymethods"`` appends → the client; 404 if unknown.
- ``POST /__admin/clients/{id}/paymethods``  one PAYMETHOD → ``{"id": <paymethod id>}``.
- ``POST /__admin/products``  ``[{"pid", "name", "price"}]`` (or one object) → ``{"pids": [...]}``;
  ``GET /__admin/products`` → ``{"products": [...]}``.
- ``GET  /__admin/orders``  ``{"count", "orders": [{"id", "ordernum", "userid", "date", "status",
  "paymentmethod", "notes", "invoiceid", "amount", "flags": {"noemail", "noinvoiceemail"},
  "accepted": null | {"autosetup", "sendemail"}, "cancelled": null | {"noemail"},
  "services": [{"id", "pid", "status"}]}]}`` oldest first; ``?userid=`` and ``?notes_contains=``
  filter.
- ``GET  /__admin/terminations``  ``{"count", "service_ids": [...]}``: every service ModuleTerminate
  terminated, in order (a service terminated twice would show twice).
- ``GET  /__admin/invoices``  ``{"count", "invoices": [{"id", "userid", "status", "total",
  "orderid"}]}``; ``POST /__admin/invoices/{id}/pay`` marks it Paid → the invoice.
- ``GET/POST /__admin/gateways``  ``{"gateways": [...]}`` (the valid AddOrder payment methods;
  default ``banktransfer, mailin, paypal, stripe``).
- ``GET/POST /__admin/access``  ``{"allowed_ips": [...] | null, "banned": {"<ip>": seconds left},
  "failures": {"<ip>": count}}``; POST takes ``{"allowed_ips": [...] | null}``.
- ``POST /__admin/bans/reset``  lifts every ban and forgets failed logins.
- ``POST /__admin/reset``  forgets clients, products, orders, invoices, bans (not credentials).
- ``GET/POST /__admin/faults``, ``GET /__admin/calls``, ``POST /__admin/calls/reset``:
  see :mod:`provisioning.sandbox.common`.
"""

from __future__ import annotations

import hmac
import http
import random
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from provisioning.sandbox.common import ADMIN_PREFIX, FaultInjector, new_app

API_PATH = "/includes/api.php"
WHMCS_VERSION = "8.13.1-release.1"

# The message of an injected error at HTTP 200: what WHMCS answers when MySQL fails mid-call.
TRANSIENT_DB_ERROR = (
    "SQLSTATE[40001]: Serialization failure: 1213 Deadlock found when trying to get lock; "
    "try restarting transaction"
)
# A failed-login counter is forgotten this long after its last failure (WHMCS: 30 minutes).
FAILURE_MEMORY_S = 1800.0
DEFAULT_GATEWAYS = ("banktransfer", "mailin", "paypal", "stripe")

# Canonical names by normalised action; only these are valid.
ACTIONS = {
    name.lower(): name
    for name in (
        "GetClientsDetails",
        "GetPayMethods",
        "AddOrder",
        "AcceptOrder",
        "CancelOrder",
        "ModuleTerminate",
        "GetOrders",
        "GetInvoice",
    )
}
# Legacy aliases the real ActionFilter resolves.
ACTION_ALIASES = {"getclientsdata": "getclientsdetails", "getclientsdatabyemail": "getclientsdetails"}
# Actions whose default format is XML and which refuse NVP (ActionResponseFormat).
STRUCTURED_ACTIONS = frozenset({"getorders", "getinvoice"})
RESPONSE_FORMATS = ("json", "xml", "nvp")

CARD_TYPES = frozenset({"CreditCard", "RemoteCreditCard", "PayToken"})
BANK_TYPES = frozenset({"BankAccount", "RemoteBankAccount"})
CLIENT_STATUSES = frozenset({"Active", "Inactive", "Closed"})
_ARRAY_KEY = re.compile(r"^([^\[\]]+)\[([^\[\]]*)\]$")


@dataclass(frozen=True)
class Caller:
    """Who called and the response format their answer will have."""

    ip: str
    fmt: str


class ApiError(Exception):
    """An error envelope; ``key`` is ``result`` except for GetInvoice's quirk."""

    def __init__(self, message: str, *, key: str = "result") -> None:
        super().__init__(message)
        self.message = message
        self.key = key


@dataclass
class Client:
    id: int
    firstname: str
    lastname: str
    email: str
    status: str = "Active"
    companyname: str = ""
    defaultgateway: str = ""
    paymethods: list[dict[str, Any]] = field(default_factory=list)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def admin_view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "firstname": self.firstname,
            "lastname": self.lastname,
            "email": self.email,
            "status": self.status,
            "companyname": self.companyname,
            "defaultgateway": self.defaultgateway,
            "paymethods": [dict(pm) for pm in self.paymethods],
        }


@dataclass
class Product:
    pid: int
    name: str
    price: Decimal


@dataclass
class Service:
    id: int
    orderid: int
    userid: int
    pid: int
    amount: Decimal
    status: str = "Pending"


@dataclass
class Invoice:
    id: int
    userid: int
    orderid: int
    date: datetime
    total: Decimal
    paymentmethod: str
    status: str = "Unpaid"
    datepaid: datetime | None = None


@dataclass
class Order:
    id: int
    ordernum: str
    userid: int
    date: datetime
    amount: Decimal
    paymentmethod: str
    notes: str
    ipaddress: str
    invoiceid: int = 0
    status: str = "Pending"
    services: list[Service] = field(default_factory=list)
    # noemail / noinvoiceemail as AddOrder received them; AcceptOrder's autosetup / sendemail.
    flags: dict[str, bool] = field(default_factory=dict)
    accepted: dict[str, bool] | None = None
    # CancelOrder's noemail, once cancelled.
    cancelled: dict[str, bool] | None = None


def php_truthy(value: object) -> bool:
    """PHP's truthiness of a request value: only ``""`` and ``"0"`` (and nothing) are false."""
    if value is None:
        return False
    if isinstance(value, dict):
        return bool(value)
    return str(value) not in ("", "0")


def php_int(value: object) -> int:
    """PHP's ``(int)`` cast of a request value: leading digits, else 0."""
    match = re.match(r"\s*([+-]?\d+)", str(value or ""))
    return int(match.group(1)) if match else 0


def parse_php_form(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Request fields with PHP array syntax folded: ``pid[0]=1`` → ``{"pid": {"0": "1"}}``."""
    params: dict[str, Any] = {}
    for key, value in items:
        match = _ARRAY_KEY.match(key)
        if not match:
            params[key] = value
            continue
        name, index = match.groups()
        bucket = params.get(name)
        if not isinstance(bucket, dict):
            bucket = params[name] = {}
        bucket[index or str(len(bucket))] = value
    return params


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison (compare_digest refuses non-ASCII str, so compare bytes)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "0000-00-00 00:00:00"


def _nvp_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else ""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return "Array"  # PHP's string conversion of an array
    return str(value)


def _xml_fill(parent: ET.Element, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            child = ET.SubElement(parent, key)
            if isinstance(item, dict):
                _xml_fill(child, item)
            else:
                child.text = _nvp_value(item)


def render(data: Mapping[str, Any], fmt: str, action: str) -> web.Response:
    """One API answer in ``fmt`` (json, xml or anything else: nvp), always HTTP 200."""
    if fmt == "json":
        return web.json_response(dict(data))
    if fmt == "xml":
        root = ET.Element("whmcsapi", version=WHMCS_VERSION)
        _xml_fill(root, {"action": action, **data})
        body = ET.tostring(root, encoding="unicode", xml_declaration=True)
        return web.Response(text=body, content_type="text/xml")
    return web.Response(
        text=";".join(f"{k}={_nvp_value(v)}" for k, v in data.items()), content_type="text/plain"
    )


def html_error(status: int) -> web.Response:
    """The error page a web server or proxy in front of WHMCS would send."""
    phrase = http.HTTPStatus(status).phrase
    body = (
        '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n'
        f"<html><head>\n<title>{status} {phrase}</title>\n</head><body>\n<h1>{phrase}</h1>\n"
        "<p>The server is temporarily unable to service your request. Please try again later.</p>\n"
        "<hr>\n<address>Apache Server at whmcs.sandbox.local Port 443</address>\n</body></html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html")


class WhmcsSimulator:
    """An in-memory WHMCS for the sandbox; mutate its state only on the server loop."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        identifier: str | None = None,
        secret: str | None = None,
        ban_after_failures: int = 3,
        ban_s: float = 900.0,
    ) -> None:
        self._rng = random.Random(seed)
        if seed is None:
            self.identifier = identifier or secrets.token_urlsafe(24)
            self.secret = secret or secrets.token_urlsafe(24)
        else:
            self.identifier = identifier or f"{self._rng.getrandbits(128):032x}"
            self.secret = secret or f"{self._rng.getrandbits(128):032x}"
        self.ban_after_failures = ban_after_failures
        self.ban_s = ban_s
        self.injector = FaultInjector(seed=seed)
        self.gateways: list[str] = list(DEFAULT_GATEWAYS)
        self.allowed_ips: list[str] | None = None
        self._reset_data()
        self._handlers: dict[str, Callable[[dict[str, Any], Caller], dict[str, Any]]] = {
            "getclientsdetails": self._get_clients_details,
            "getpaymethods": self._get_pay_methods,
            "addorder": self._add_order,
            "acceptorder": self._accept_order,
            "cancelorder": self._cancel_order,
            "moduleterminate": self._module_terminate,
            "getorders": self._get_orders,
            "getinvoice": self._get_invoice,
        }

    def _reset_data(self) -> None:
        self.clients: dict[int, Client] = {}
        self.products: dict[int, Product] = {}
        self.orders: dict[int, Order] = {}
        self.invoices: dict[int, Invoice] = {}
        # Service ids ModuleTerminate terminated, in order (a repeat would show twice).
        self.terminations: list[int] = []
        self.failures: dict[str, tuple[int, float]] = {}  # ip -> (count, forget at)
        self.bans: dict[str, float] = {}  # ip -> banned until (monotonic)
        self._next = {"client": 1, "paymethod": 1, "order": 1, "invoice": 1, "service": 1}

    def _new_id(self, kind: str) -> int:
        value = self._next[kind]
        self._next[kind] = value + 1
        return value

    def env(self, base_url: str) -> dict[str, str]:
        """Settings variables that point our client at this simulator."""
        return {"WHMCS_URL": base_url, "WHMCS_IDENTIFIER": self.identifier, "WHMCS_SECRET": self.secret}

    def build_app(self) -> web.Application:
        api = [web.post(API_PATH, self._api), web.get(API_PATH, self._api)]
        return new_app(api, self._admin_routes(), self.injector.admin_routes())

    # -- the API --------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        params = parse_php_form(
            [*request.query.items(), *((k, v) for k, v in form.items() if isinstance(v, str))]
        )
        raw_action = str(params.get("action", ""))
        action = re.sub(r"[^0-9a-z]", "", raw_action.lower())
        action = ACTION_ALIASES.get(action, action)
        operation = ACTIONS.get(action, action or "(none)")
        requested = str(params.get("responsetype", "")).lower()
        fmt = self._format(action, requested)

        def error_response(status: int) -> web.StreamResponse:
            if status == 200:
                return render({"result": "error", "message": TRANSIENT_DB_ERROR}, fmt, action)
            return html_error(status)

        async def run() -> web.StreamResponse:
            return self._dispatch(request, params, action, requested, fmt)

        return await self.injector.run(request, operation, run, error_response)

    @staticmethod
    def _format(action: str, requested: str) -> str:
        if requested:
            return requested
        return "xml" if action in STRUCTURED_ACTIONS else "nvp"

    def _dispatch(
        self, request: web.Request, params: dict[str, Any], action: str, requested: str, fmt: str
    ) -> web.Response:
        # Until the response-format middleware has run, errors use the requested format (else NVP).
        early_fmt = requested if requested in RESPONSE_FORMATS else "nvp"
        try:
            self._check_access(request.remote or "")
            self._authenticate(request.remote or "", params)
            if action not in ACTIONS:
                raise ApiError(f'Invalid API Action: "{action}" is not a valid API action')
            if requested and requested not in RESPONSE_FORMATS:
                raise ApiError(
                    f'Unsupported API response type format "{requested}". '
                    f"Supported formats include: {', '.join(RESPONSE_FORMATS)}"
                )
            if requested == "nvp" and action in STRUCTURED_ACTIONS:
                raise ApiError("This API action only supports the XML or JSON response type formats")
        except ApiError as exc:
            return render({exc.key: "error", "message": exc.message}, early_fmt, action)
        try:
            data = self._handlers[action](params, Caller(request.remote or "", fmt))
        except ApiError as exc:
            return render({exc.key: "error", "message": exc.message}, fmt, action)
        return render({"result": "success", **data}, fmt, action)

    def _check_access(self, ip: str) -> None:
        until = self.bans.get(ip)
        if until is not None:
            if until > time.monotonic():
                raise ApiError("IP Banned")
            del self.bans[ip]
        if self.allowed_ips is not None and ip not in self.allowed_ips:
            raise ApiError(f"Invalid IP {ip}")

    def _authenticate(self, ip: str, params: dict[str, Any]) -> None:
        if "identifier" in params:
            identifier, secret = str(params.get("identifier", "")), str(params.get("secret", ""))
            if not identifier or not secret or not _same(identifier, self.identifier):
                raise ApiError("Invalid or missing credentials")
        else:
            # Legacy fields: tried as API credentials, then as an admin login (which we never have).
            identifier, secret = str(params.get("username", "")), str(params.get("password", ""))
            if not identifier or not secret:
                raise ApiError("Invalid or missing credentials")
            if not _same(identifier, self.identifier):
                self._failed_login(ip)
                raise ApiError("Authentication Failed")
        if not _same(secret, self.secret):
            self._failed_login(ip)
            raise ApiError("Authentication Failed")

    def _failed_login(self, ip: str) -> None:
        now = time.monotonic()
        count, forget_at = self.failures.get(ip, (0, 0.0))
        count = count + 1 if forget_at > now else 1
        if count >= self.ban_after_failures:
            self.failures.pop(ip, None)
            self.bans[ip] = now + self.ban_s
        else:
            self.failures[ip] = (count, now + FAILURE_MEMORY_S)

    # -- actions --------------------------------------------------------------------------------

    def _client_or_none(self, raw: object) -> Client | None:
        return self.clients.get(php_int(raw))

    def _get_clients_details(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        client: Client | None
        if params.get("clientid"):
            client = self._client_or_none(params["clientid"])
        elif params.get("email"):
            email = str(params["email"]).lower()
            client = next((c for c in self.clients.values() if c.email.lower() == email), None)
        else:
            raise ApiError("Either clientid Or email Is Required")
        if client is None:
            raise ApiError("Client Not Found")
        details: dict[str, Any] = {
            "userid": client.id,
            "client_id": client.id,
            "id": client.id,
            "uuid": f"{client.id:08x}-0000-4000-8000-000000000000",
            "firstname": client.firstname,
            "lastname": client.lastname,
            "fullname": f"{client.firstname} {client.lastname}",
            "companyname": client.companyname,
            "email": client.email,
            "address1": "",
            "address2": "",
            "city": "",
            "fullstate": "",
            "state": "",
            "postcode": "",
            "countrycode": "US",
            "country": "US",
            "phonenumber": "",
            "tax_id": "",
            "email_verified": False,
            "statecode": "",
            "countryname": "United States",
            "phonecc": 1,
            "billingcid": 0,
            "notes": "",
            "currency": 1,
            "defaultgateway": client.defaultgateway,
            "groupid": 0,
            "status": client.status,
            "credit": "0.00",
            "taxexempt": False,
            "language": "",
            "lastlogin": "No Login Logged",
            "currency_code": "USD",
        }
        details["users"] = {
            "user": [{"id": client.id, "name": details["fullname"], "email": client.email, "is_owner": True}]
        }
        if caller.fmt in ("json", "xml"):
            # The nested copy is only given to structured formats.
            return {**details, "client": {k: v for k, v in details.items() if k != "users"}}
        return details

    def _get_pay_methods(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        if not params.get("clientid"):
            raise ApiError("Client ID Is Required")
        wanted = str(params.get("type", "")).lower()
        if wanted and wanted not in ("creditcard", "bankaccount"):
            raise ApiError("Invalid Pay Method Type. Should be 'BankAccount' or 'CreditCard'")
        client = self._client_or_none(params["clientid"])
        if client is None:
            raise ApiError("Client Not Found")
        methods = client.paymethods
        if params.get("paymethodid"):
            methods = [pm for pm in methods if pm["id"] == php_int(params["paymethodid"])]
        elif wanted:
            types = CARD_TYPES if wanted == "creditcard" else BANK_TYPES
            methods = [pm for pm in methods if pm["type"] in types]
        return {
            "clientid": params["clientid"],
            "paymethods": [self._pay_method_view(client, pm) for pm in methods],
        }

    @staticmethod
    def _pay_method_view(client: Client, pm: dict[str, Any]) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": pm["id"],
            "type": pm["type"],
            "description": pm.get("description", ""),
            "gateway_name": pm.get("gateway_name", ""),
            "contact_type": "Client",
            "contact_id": client.id,
        }
        if pm["type"] in CARD_TYPES:
            view |= {
                "card_last_four": pm.get("card_last_four", ""),
                "expiry_date": pm.get("expiry_date", ""),
                "start_date": "",
                "issue_number": "",
                "card_type": pm.get("card_type", ""),
                "remote_token": "",
            }
        else:
            view |= {"bank_name": pm.get("bank_name", ""), "remote_token": ""}
        view["last_updated"] = client.created.strftime("%d/%m/%Y %H:%M")
        return view

    def _add_order(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        client = self._client_or_none(params.get("clientid"))
        if client is None:
            raise ApiError("Client ID Not Found")
        if client.status == "Closed":
            raise ApiError(f"Unable to add order when client status is {client.status}")
        paymentmethod = str(params.get("paymentmethod", ""))
        if paymentmethod not in self.gateways:
            raise ApiError(f"Invalid Payment Method. Valid options include {','.join(self.gateways)}")
        pids, qtys = params.get("pid"), params.get("qty")
        if isinstance(pids, dict):
            qty_of = qtys if isinstance(qtys, dict) else {}
            wanted = [(p, qty_of.get(i, "1")) for i, p in pids.items() if php_truthy(p)]
        else:
            wanted = [(pids, qtys if qtys is not None else "1")] if php_truthy(pids) else []
        if not wanted:
            raise ApiError("No items added to cart so order cannot proceed")
        # The cart silently drops products that do not exist.
        cart = [
            (self.products[php_int(p)], max(1, php_int(q))) for p, q in wanted if php_int(p) in self.products
        ]
        if not cart:
            raise ApiError("No items remain in the cart. Order cannot proceed.")

        now = datetime.now(UTC)
        total = sum((product.price * qty for product, qty in cart), Decimal("0"))
        order = Order(
            id=self._new_id("order"),
            ordernum=str(self._rng.randrange(10**9, 10**10)),
            userid=client.id,
            date=now,
            amount=total,
            paymentmethod=paymentmethod,
            notes=str(params.get("notes", "")),
            ipaddress=str(params.get("clientip") or caller.ip),
            flags={name: php_truthy(params.get(name)) for name in ("noemail", "noinvoiceemail")},
        )
        for product, qty in cart:
            for _ in range(qty):
                service = Service(self._new_id("service"), order.id, client.id, product.pid, product.price)
                order.services.append(service)
        self.orders[order.id] = order
        result: dict[str, Any] = {
            "orderid": str(order.id),
            "serviceids": ",".join(str(s.id) for s in order.services),
            "productids": ",".join(str(s.id) for s in order.services),
            "addonids": "",
            "domainids": "",
        }
        if not php_truthy(params.get("noinvoice")):
            invoice = Invoice(self._new_id("invoice"), client.id, order.id, now, total, paymentmethod)
            if total == 0:
                invoice.status, invoice.datepaid = "Paid", now
            self.invoices[invoice.id] = invoice
            order.invoiceid = invoice.id
            result["invoiceid"] = str(invoice.id)
        return result

    def _accept_order(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        order = self.orders.get(php_int(params.get("orderid")))
        if order is None or order.status != "Pending":
            raise ApiError("Order ID not found or Status not Pending")
        order.status = "Active"
        order.accepted = {
            "autosetup": php_truthy(params.get("autosetup")),
            "sendemail": php_truthy(params.get("sendemail")),
        }
        for service in order.services:
            service.status = "Active"
        return {}

    def _cancel_order(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        """CancelOrder: a Pending order only (the same message as AcceptOrder's otherwise); its
        services and its unpaid invoice are cancelled with it."""
        order = self.orders.get(php_int(params.get("orderid")))
        if order is None or order.status != "Pending":
            raise ApiError("Order ID not found or Status not Pending")
        order.status = "Cancelled"
        order.cancelled = {"noemail": php_truthy(params.get("noemail"))}
        for service in order.services:
            service.status = "Cancelled"
        invoice = self.invoices.get(order.invoiceid)
        if invoice is not None and invoice.status == "Unpaid":
            invoice.status = "Cancelled"
        return {}

    def _module_terminate(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        """ModuleTerminate (``serviceid``, or ``accountid`` as older callers send it): an Active or
        Suspended service becomes Terminated; any other status is the module's refusal (our choice
        of message: real modules word it their own way)."""
        raw = params.get("serviceid") or params.get("accountid")
        if not php_truthy(raw):
            raise ApiError("Service ID is required")
        service = next((s for o in self.orders.values() for s in o.services if s.id == php_int(raw)), None)
        if service is None:
            raise ApiError("Service ID not found")
        if service.status not in ("Active", "Suspended"):
            raise ApiError(f"Module command failed: the service is {service.status}, not Active or Suspended")
        service.status = "Terminated"
        self.terminations.append(service.id)
        return {}

    def _get_orders(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        limitstart = max(0, php_int(params.get("limitstart")))
        limitnum = php_int(params.get("limitnum")) or 25
        order_id, userid = php_int(params.get("id")), php_int(params.get("userid"))
        status = str(params.get("status", ""))
        matches = [
            o
            for o in sorted(self.orders.values(), key=lambda o: o.id, reverse=True)
            if (not order_id or o.id == order_id)
            and (not userid or o.userid == userid)
            and (not status or o.status.lower() == status.lower())
        ]
        page = matches[limitstart : limitstart + max(limitnum, 0)]
        data: dict[str, Any] = {
            "totalresults": str(len(matches)),
            "startnumber": limitstart,
            "numreturned": len(page),
        }
        if page:
            data["orders"] = {"order": [self._order_view(o) for o in page]}
        return data

    def _order_view(self, order: Order) -> dict[str, Any]:
        client = self.clients.get(order.userid)
        invoice = self.invoices.get(order.invoiceid)
        lineitems: dict[str, Any] | list[Any] = []
        if order.services:
            lineitems = {"lineitem": [self._line_item(s) for s in order.services]}
        return {
            "id": str(order.id),
            "ordernum": order.ordernum,
            "userid": str(order.userid),
            "contactid": "0",
            "requestor_id": "0",
            "admin_requestor_id": "1",
            "date": _when(order.date),
            "nameservers": "",
            "transfersecret": "",
            "renewals": "",
            "promocode": "",
            "promotype": "",
            "promovalue": "",
            "orderdata": "[]",
            "amount": _money(order.amount),
            "paymentmethod": order.paymentmethod,
            "invoiceid": str(order.invoiceid),
            "status": order.status,
            "ipaddress": order.ipaddress,
            "fraudmodule": "",
            "fraudoutput": "",
            "notes": order.notes,
            "paymentmethodname": order.paymentmethod.title(),
            "paymentstatus": invoice.status if invoice else None,
            "name": f"{client.firstname} {client.lastname}" if client else "",
            "currencyprefix": "$",
            "currencysuffix": " USD",
            "frauddata": "",
            "validationdata": "",
            "lineitems": lineitems,
        }

    def _line_item(self, service: Service) -> dict[str, Any]:
        product = self.products.get(service.pid)
        return {
            "type": "product",
            "relid": str(service.id),
            "producttype": "Other Product/Service",
            "product": f"eSIM - {product.name if product else service.pid}",
            "domain": "",
            "billingcycle": "Monthly",
            "amount": f"${_money(service.amount)} USD",
            "status": service.status,
        }

    def _get_invoice(self, params: dict[str, Any], _: Caller) -> dict[str, Any]:
        invoice = self.invoices.get(php_int(params.get("invoiceid")))
        if invoice is None:
            raise ApiError("Invoice ID Not Found", key="status")
        paid = invoice.total if invoice.status == "Paid" else Decimal("0")
        order = self.orders.get(invoice.orderid)
        items = [
            {
                "id": str(s.id),
                "type": "Hosting",
                "relid": str(s.id),
                "description": self._line_item(s)["product"],
                "amount": _money(s.amount),
                "taxed": "0",
            }
            for s in (order.services if order else [])
        ]
        data: dict[str, Any] = {
            "invoiceid": invoice.id,
            "invoicenum": "",
            "userid": str(invoice.userid),
            "date": invoice.date.strftime("%Y-%m-%d"),
            "duedate": invoice.date.strftime("%Y-%m-%d"),
            "datepaid": _when(invoice.datepaid),
            "lastcaptureattempt": "0000-00-00 00:00:00",
            "subtotal": _money(invoice.total),
            "credit": "0.00",
            "tax": "0.00",
            "tax2": "0.00",
            "total": _money(invoice.total),
            "balance": _money(invoice.total - paid),
            "taxrate": "0.00",
            "taxrate2": "0.00",
            "status": invoice.status,
            "paymentmethod": invoice.paymentmethod,
            "notes": "",
            "ccgateway": invoice.paymentmethod == "stripe",
            "items": {"item": items} if items else [],
            "transactions": "",
        }
        if paid:
            data["transactions"] = {
                "transaction": [
                    {
                        "id": str(invoice.id),
                        "userid": str(invoice.userid),
                        "gateway": invoice.paymentmethod,
                        "date": _when(invoice.datepaid),
                        "description": "Invoice Payment",
                        "amountin": _money(paid),
                        "fees": "0.00",
                        "amountout": "0.00",
                        "transid": f"sandbox-{invoice.id}",
                        "invoiceid": str(invoice.id),
                    }
                ]
            }
        return data

    # -- admin ----------------------------------------------------------------------------------

    def _make_pay_method(self, data: Mapping[str, Any]) -> dict[str, Any]:
        pm_type = str(data.get("type", "CreditCard"))
        if pm_type not in CARD_TYPES | BANK_TYPES:
            raise ValueError(f"unknown pay method type {pm_type!r}")
        pm_id = int(data["id"]) if data.get("id") is not None else self._new_id("paymethod")
        self._next["paymethod"] = max(self._next["paymethod"], pm_id + 1)
        pm: dict[str, Any] = {
            "id": pm_id,
            "type": pm_type,
            "description": str(data.get("description", "")),
            "gateway_name": str(data.get("gateway_name", "stripe")),
        }
        if pm_type in CARD_TYPES:
            pm |= {
                "card_last_four": str(data.get("card_last_four", "4242")),
                "expiry_date": str(data.get("expiry_date", "12/99")),
                "card_type": str(data.get("card_type", "Visa")),
            }
        else:
            pm["bank_name"] = str(data.get("bank_name", "Sandbox Bank"))
        return pm

    def _apply_client_fields(self, client: Client, data: Mapping[str, Any]) -> None:
        for name in ("firstname", "lastname", "email", "companyname", "defaultgateway"):
            if name in data:
                setattr(client, name, str(data[name]))
        if "status" in data:
            if data["status"] not in CLIENT_STATUSES:
                raise ValueError(f"status must be one of {sorted(CLIENT_STATUSES)}")
            client.status = data["status"]
        if "paymethods" in data:
            client.paymethods = [self._make_pay_method(pm) for pm in data["paymethods"]]
        for pm in data.get("add_paymethods", []):
            client.paymethods.append(self._make_pay_method(pm))

    def _admin_routes(self) -> list[web.RouteDef]:
        p = ADMIN_PREFIX

        async def body_list(request: web.Request) -> list[dict[str, Any]]:
            body = await request.json()
            items = body if isinstance(body, list) else [body]
            if not all(isinstance(item, dict) for item in items):
                raise ValueError("expected an object or a list of objects")
            return items

        def bad_request(exc: Exception) -> web.Response:
            return web.json_response({"error": str(exc)}, status=400)

        def client_of(request: web.Request) -> Client:
            client = self.clients.get(php_int(request.match_info["id"]))
            if client is None:
                raise web.HTTPNotFound(text='{"error": "client not found"}', content_type="application/json")
            return client

        async def add_clients(request: web.Request) -> web.Response:
            try:
                items = await body_list(request)
                ids = []
                for item in items:
                    client_id = int(item["id"]) if item.get("id") is not None else self._new_id("client")
                    self._next["client"] = max(self._next["client"], client_id + 1)
                    client = Client(
                        client_id,
                        str(item.get("firstname", "")),
                        str(item.get("lastname", "")),
                        str(item.get("email", "")),
                    )
                    self._apply_client_fields(client, {k: v for k, v in item.items() if k != "id"})
                    self.clients[client_id] = client
                    ids.append(client_id)
            except (ValueError, TypeError, KeyError) as exc:
                return bad_request(exc)
            return web.json_response({"ids": ids})

        async def list_clients(_: web.Request) -> web.Response:
            return web.json_response({"clients": [c.admin_view() for c in self.clients.values()]})

        async def update_client(request: web.Request) -> web.Response:
            client = client_of(request)
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("expected an object")
                self._apply_client_fields(client, body)
            except (ValueError, TypeError, KeyError) as exc:
                return bad_request(exc)
            return web.json_response(client.admin_view())

        async def add_pay_method(request: web.Request) -> web.Response:
            client = client_of(request)
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("expected an object")
                pm = self._make_pay_method(body)
            except (ValueError, TypeError) as exc:
                return bad_request(exc)
            client.paymethods.append(pm)
            return web.json_response({"id": pm["id"]})

        async def add_products(request: web.Request) -> web.Response:
            try:
                items = await body_list(request)
                new = [
                    Product(
                        int(i["pid"]),
                        str(i.get("name", f"Product {i['pid']}")),
                        Decimal(str(i.get("price", "0"))),
                    )
                    for i in items
                ]
            except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
                return bad_request(exc)
            for product in new:
                self.products[product.pid] = product
            return web.json_response({"pids": [product.pid for product in new]})

        async def list_products(_: web.Request) -> web.Response:
            products = [
                {"pid": p.pid, "name": p.name, "price": _money(p.price)} for p in self.products.values()
            ]
            return web.json_response({"products": products})

        async def list_orders(request: web.Request) -> web.Response:
            userid = php_int(request.query.get("userid"))
            contains = request.query.get("notes_contains")
            orders = [
                {
                    "id": o.id,
                    "ordernum": o.ordernum,
                    "userid": o.userid,
                    "date": _when(o.date),
                    "status": o.status,
                    "paymentmethod": o.paymentmethod,
                    "notes": o.notes,
                    "invoiceid": o.invoiceid or None,
                    "amount": _money(o.amount),
                    "flags": o.flags,
                    "accepted": o.accepted,
                    "cancelled": o.cancelled,
                    "services": [{"id": s.id, "pid": s.pid, "status": s.status} for s in o.services],
                }
                for o in sorted(self.orders.values(), key=lambda o: o.id)
                if (not userid or o.userid == userid) and (contains is None or contains in o.notes)
            ]
            return web.json_response({"count": len(orders), "orders": orders})

        def invoice_view(invoice: Invoice) -> dict[str, Any]:
            return {
                "id": invoice.id,
                "userid": invoice.userid,
                "orderid": invoice.orderid,
                "status": invoice.status,
                "total": _money(invoice.total),
            }

        async def list_invoices(_: web.Request) -> web.Response:
            invoices = [invoice_view(i) for i in sorted(self.invoices.values(), key=lambda i: i.id)]
            return web.json_response({"count": len(invoices), "invoices": invoices})

        async def list_terminations(_: web.Request) -> web.Response:
            return web.json_response({"count": len(self.terminations), "service_ids": self.terminations})

        async def pay_invoice(request: web.Request) -> web.Response:
            invoice = self.invoices.get(php_int(request.match_info["id"]))
            if invoice is None:
                return web.json_response({"error": "invoice not found"}, status=404)
            invoice.status, invoice.datepaid = "Paid", datetime.now(UTC)
            return web.json_response(invoice_view(invoice))

        async def get_gateways(_: web.Request) -> web.Response:
            return web.json_response({"gateways": self.gateways})

        async def set_gateways(request: web.Request) -> web.Response:
            body = await request.json()
            gateways = body.get("gateways") if isinstance(body, dict) else None
            if not isinstance(gateways, list) or not all(isinstance(g, str) and g for g in gateways):
                return bad_request(ValueError('expected {"gateways": ["name", ...]}'))
            self.gateways = list(gateways)
            return await get_gateways(request)

        async def get_access(_: web.Request) -> web.Response:
            now = time.monotonic()
            return web.json_response(
                {
                    "allowed_ips": self.allowed_ips,
                    "banned": {ip: round(until - now, 3) for ip, until in self.bans.items() if until > now},
                    "failures": {ip: count for ip, (count, forget) in self.failures.items() if forget > now},
                }
            )

        async def set_access(request: web.Request) -> web.Response:
            body = await request.json()
            ips = body.get("allowed_ips") if isinstance(body, dict) else "?"
            if ips is not None and not (isinstance(ips, list) and all(isinstance(ip, str) for ip in ips)):
                return bad_request(ValueError('expected {"allowed_ips": ["ip", ...] | null}'))
            self.allowed_ips = ips
            return await get_access(request)

        async def reset_bans(request: web.Request) -> web.Response:
            self.bans.clear()
            self.failures.clear()
            return await get_access(request)

        async def reset_all(_: web.Request) -> web.Response:
            self._reset_data()
            return web.json_response({"reset": True})

        return [
            web.post(f"{p}/clients", add_clients),
            web.get(f"{p}/clients", list_clients),
            web.patch(f"{p}/clients/{{id}}", update_client),
            web.post(f"{p}/clients/{{id}}/paymethods", add_pay_method),
            web.post(f"{p}/products", add_products),
            web.get(f"{p}/products", list_products),
            web.get(f"{p}/orders", list_orders),
            web.get(f"{p}/invoices", list_invoices),
            web.get(f"{p}/terminations", list_terminations),
            web.post(f"{p}/invoices/{{id}}/pay", pay_invoice),
            web.get(f"{p}/gateways", get_gateways),
            web.post(f"{p}/gateways", set_gateways),
            web.get(f"{p}/access", get_access),
            web.post(f"{p}/access", set_access),
            web.post(f"{p}/bans/reset", reset_bans),
            web.post(f"{p}/reset", reset_all),
        ]
