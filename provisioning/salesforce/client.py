"""The REST client the workers use: one SOQL query to read an Order, one PATCH to write it.

The REST calls go out on urllib3's pools (:func:`provisioning.core.http.make_pool`), as
WHMCS and ES2+ do: on the hot path requests' per-call layers (settings merges,
cookies, hooks, runtime Protocol checks) cost more CPU than the call itself.
simple-salesforce builds our SOQL (``format_soql``: its quoting of values);
the JWT login keeps its ``requests.Session``. Errors are translated in
:func:`_status_error` (Salesforce's answers) and through
:func:`provisioning.core.http.classify` (transport failures); a 401
``INVALID_SESSION_ID`` renews the token once (through :class:`JWTBearerAuth`,
shared by all threads) and repeats the call, and a request that was never sent
is sent once more: nothing else is retried here.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple
from urllib.parse import urlencode

import urllib3
from pydantic import ValidationError
from simple_salesforce.format import format_soql
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from provisioning.core.errors import PicklableError
from provisioning.core.http import (
    TRANSPORT_EXCEPTIONS,
    classify,
    connection_retrying,
    make_pool,
    make_session,
    status_failure,
)
from provisioning.core.logs import get_logger
from provisioning.core.settings import (
    DEFAULT_ORDER_FIELD_NAMES,
    DEFAULT_PROVISION_EVENT,
    DEFAULT_SF_API_VERSION,
    Settings,
)
from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.errors import (
    OrderNotFound,
    SalesforceAuthError,
    SalesforceError,
    SalesforceRequestError,
    SalesforceUnavailable,
    from_transport,
)
from provisioning.salesforce.ids import normalize_id
from provisioning.step.order import Order, OrderItem

log = get_logger(__name__)

REST_CONNECT_TIMEOUT_S = 10.0
REST_READ_TIMEOUT_S = 30.0
# Tries of one call when the session expired: the first, and one after a fresh login.
SESSION_ATTEMPTS = 2

# errorCodes worth retrying later whatever the HTTP status says.
TRANSIENT_ERROR_CODES = frozenset(
    {"REQUEST_LIMIT_EXCEEDED", "UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "QUERY_TIMEOUT"}
)
_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Activation_Error__c is a Text(255) by default.
ACTIVATION_ERROR_MAX_CHARS = 255
# Characters of a non-JSON error body kept in the error's message.
ERROR_BODY_MAX_CHARS = 200


@dataclass(frozen=True)
class OrderFieldNames:
    """API names of the Order fields we read and write (an org may name them differently)."""

    activation_status: str = DEFAULT_ORDER_FIELD_NAMES["activation_status"]
    whmcs_client_id: str = DEFAULT_ORDER_FIELD_NAMES["whmcs_client_id"]
    sim_type: str = DEFAULT_ORDER_FIELD_NAMES["sim_type"]
    eid: str = DEFAULT_ORDER_FIELD_NAMES["eid"]
    whmcs_product_id: str = DEFAULT_ORDER_FIELD_NAMES["whmcs_product_id"]
    whmcs_order_id: str = DEFAULT_ORDER_FIELD_NAMES["whmcs_order_id"]
    esim_iccid: str = DEFAULT_ORDER_FIELD_NAMES["esim_iccid"]
    activation_error: str = DEFAULT_ORDER_FIELD_NAMES["activation_error"]
    activated_at: str = DEFAULT_ORDER_FIELD_NAMES["activated_at"]
    esim_status: str = DEFAULT_ORDER_FIELD_NAMES["esim_status"]
    esim_status_at: str = DEFAULT_ORDER_FIELD_NAMES["esim_status_at"]

    def __post_init__(self) -> None:
        # They are pasted into SOQL, so they must be plain API names.
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not _API_NAME.fullmatch(value):
                raise ValueError(f"Order field name {f.name}={value!r} is not a Salesforce API name")

    @classmethod
    def from_settings(cls, settings: Settings) -> OrderFieldNames:
        return cls(**{f.name: getattr(settings, f"sf_field_{f.name}") for f in fields(cls)})

    def patch(self, **values: object) -> dict[str, object]:
        """A PATCH body from logical names: ``patch(activation_status="Activated", whmcs_order_id="7")``.

        ``activation_error`` is cut to 255 characters; None clears a field.
        """
        body: dict[str, object] = {}
        known = {f.name for f in fields(self)}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown Order field {name!r}; known: {sorted(known)}")
            if name == "activation_error" and isinstance(value, str):
                value = value[:ACTIVATION_ERROR_MAX_CHARS]
            body[getattr(self, name)] = value
        return body


class WaitingOrder(NamedTuple):
    """An Order the backfill found in ``Activating``; ``last_modified`` as Salesforce wrote it."""

    order_id: str
    last_modified: str


class _SessionExpired(PicklableError):
    """401 INVALID_SESSION_ID: the token that was refused, to renew it once."""

    def __init__(self, token: AccessToken, code: str | None, message: str) -> None:
        super().__init__(message)
        self.token = token
        self.code = code
        self.message = message


class SalesforceClient:
    """Reads and writes Orders and publishes the provisioning event over REST."""

    def __init__(
        self,
        *,
        auth: JWTBearerAuth,
        session: urllib3.PoolManager,
        api_version: str = DEFAULT_SF_API_VERSION,
        field_names: OrderFieldNames | None = None,
        event_object: str = DEFAULT_PROVISION_EVENT,
    ) -> None:
        self._auth = auth
        self._session = session
        self.api_version = api_version
        self.field_names = field_names or OrderFieldNames()
        self.event_object = event_object
        self._timeout = urllib3.Timeout(connect=REST_CONNECT_TIMEOUT_S, read=REST_READ_TIMEOUT_S)
        self._lock = threading.Lock()
        self.api_calls = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        session: urllib3.PoolManager | None = None,
        *,
        auth: JWTBearerAuth | None = None,
    ) -> SalesforceClient:
        # The proxy is chosen for the login host: an org's instance is under the same domain.
        login_url = str(settings.sf_login_url)
        return cls(
            auth=auth
            if auth is not None
            else JWTBearerAuth.from_settings(settings, make_session(settings.tls_ca_bundle)),
            session=session if session is not None else make_pool(settings.tls_ca_bundle, url=login_url),
            api_version=settings.sf_api_version,
            field_names=OrderFieldNames.from_settings(settings),
            event_object=settings.sf_provision_event_channel.removeprefix("/event/"),
        )

    def __repr__(self) -> str:
        return f"SalesforceClient(api_version={self.api_version!r}, api_calls={self.api_calls})"

    # -- the operations ---------------------------------------------------------------------

    def order_query(self, order_id: str) -> str:
        """The one SOQL query :meth:`fetch_order` sends."""
        n = self.field_names
        # Field names are checked API names (OrderFieldNames), hence :literal; the Id is quoted.
        items = format_soql("(SELECT Quantity, Product2.{:literal} FROM OrderItems)", n.whmcs_product_id)
        columns = (
            f"Id, OrderNumber, {n.activation_status}, Account.{n.whmcs_client_id}, "
            f"BillToContact.Email, BillToContact.FirstName, {n.sim_type}, {n.eid}, "
            f"{n.whmcs_order_id}, {n.esim_iccid}, {n.activated_at}, {items}"
        )
        return format_soql("SELECT {:literal} FROM Order WHERE Id = {}", columns, normalize_id(order_id))

    def fetch_order(self, order_id: str) -> Order:
        """The Order and its items, from ONE SOQL query; OrderNotFound if there is none."""
        order_id = normalize_id(order_id)
        soql = self.order_query(order_id)
        result = self._call("query Order", "GET", "query/", query={"q": soql}, order_id=order_id)
        records = (result.get("records") or []) if isinstance(result, dict) else []
        if not records:
            raise OrderNotFound(
                f"no Order {order_id} (or the integration user cannot see it)", error_code="NOT_FOUND"
            )
        return self._order_from_record(order_id, records[0])

    def update_order(self, order_id: str, fields: Mapping[str, object]) -> None:
        """ONE PATCH of ``fields`` (API name -> value; datetimes become ISO 8601 UTC)."""
        order_id = normalize_id(order_id)
        body = {name: _json_value(value) for name, value in fields.items()}
        if not body:
            return
        self._call("update Order", "PATCH", f"sobjects/Order/{order_id}", body=body, order_id=order_id)

    def waiting_orders_query(self, modified_before: dt.datetime, limit: int) -> str:
        """The backfill's SOQL: Orders in Activating not modified since ``modified_before``, oldest first."""
        n = self.field_names
        stamp = modified_before.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return format_soql(
            "SELECT Id, LastModifiedDate FROM Order WHERE {:literal} = 'Activating' "
            "AND LastModifiedDate < {:literal} ORDER BY LastModifiedDate LIMIT {:literal}",
            n.activation_status,
            stamp,
            str(int(limit)),
        )

    def waiting_orders(self, modified_before: dt.datetime, *, limit: int) -> list[WaitingOrder]:
        """Orders still ``Activating`` and last modified before ``modified_before``: one query, paged.

        Each page (2,000 records on a real org) is one API call.
        """
        soql = self.waiting_orders_query(modified_before, limit)
        page = self._call("query waiting Orders", "GET", "query/", query={"q": soql})
        found: list[WaitingOrder] = []
        while True:
            for record in page.get("records") or []:
                found.append(
                    WaitingOrder(
                        order_id=normalize_id(str(record["Id"])),
                        last_modified=str(record.get("LastModifiedDate") or ""),
                    )
                )
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url:
                return found
            # nextRecordsUrl is a path on the instance, version included.
            page = self._call("query waiting Orders (next page)", "GET", str(next_url))

    def publish_event(self, order_id: str, idem_key: str | None = None) -> str:
        """Publish the provisioning Platform Event as an org does (REST POST); returns its id.

        ``order_id`` is sent as given (not validated), so tests can publish bad events.
        """
        payload: dict[str, object] = {"OrderId__c": order_id}
        if idem_key is not None:
            payload["IdemKey__c"] = idem_key
        result = self._call(
            f"publish {self.event_object}", "POST", f"sobjects/{self.event_object}/", body=payload
        )
        if not isinstance(result, dict) or not result.get("success", True) or not result.get("id"):
            raise SalesforceRequestError(f"publishing {self.event_object} failed: {result!r}")
        return str(result["id"])

    # -- plumbing ---------------------------------------------------------------------------

    def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: object = None,
        order_id: str | None = None,
    ) -> Any:
        """One API call (``path`` under the versioned REST root, or from ``/``); its JSON answer.

        After a 401 INVALID_SESSION_ID, one fresh login and one repeat.
        """
        renewing = Retrying(
            stop=stop_after_attempt(SESSION_ATTEMPTS),
            retry=retry_if_exception_type(_SessionExpired),
            before_sleep=self._renew,
            reraise=True,
        )
        try:
            return renewing(self._call_once, operation, method, path, query, body, order_id)
        except _SessionExpired as expired:
            raise SalesforceAuthError(
                f"Salesforce {operation}: HTTP 401 {expired.code}: {expired.message}"
                " (again, right after a fresh login)",
                status=401,
                error_code=expired.code,
            ) from expired

    def _call_once(
        self,
        operation: str,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: object,
        order_id: str | None,
    ) -> Any:
        token = self._auth.token()
        root = token.instance_url.rstrip("/")
        url = root + path if path.startswith("/") else f"{root}/services/data/v{self.api_version}/{path}"
        if query:
            url = f"{url}?{urlencode(query)}"
        headers = {"Authorization": f"Bearer {token.bearer()}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self._lock:
            self.api_calls += 1
        try:
            response = connection_retrying()(
                self._session.request,
                method,
                url,
                body=data,
                headers=headers,
                timeout=self._timeout,
                redirect=False,
            )
        except TRANSPORT_EXCEPTIONS as exc:
            raise from_transport(classify(exc), f"Salesforce {operation}") from exc
        content = _content(response.data)
        status = response.status
        if status == 401:
            code, message = _first_error(content)
            if code == "INVALID_SESSION_ID":
                raise _SessionExpired(token, code, message)
            raise SalesforceAuthError(
                f"Salesforce {operation}: HTTP 401 {code}: {message}", status=401, error_code=code
            )
        if status >= 300:
            raise _status_error(operation, status, content, order_id=order_id)
        if isinstance(content, str):
            # Not Salesforce answering (a proxy's page, say): the same call meets it again.
            raise SalesforceRequestError(
                f"Salesforce {operation}: HTTP {status} with a body that is not JSON "
                "(check SF_LOGIN_URL and any proxy in between)",
                status=status,
            )
        return content

    def _renew(self, state: RetryCallState) -> None:
        expired = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(expired, _SessionExpired)
        log.info("salesforce_session_expired", operation=state.args[0])
        self._auth.renew(expired.token)

    def _order_from_record(self, order_id: str, record: Mapping[str, Any]) -> Order:
        n = self.field_names
        account = record.get("Account") or {}
        contact = record.get("BillToContact") or {}
        item_records = (record.get("OrderItems") or {}).get("records") or []
        try:
            return Order(
                id=record.get("Id") or order_id,
                order_number=_text(record.get("OrderNumber")),
                activation_status=_text(record.get(n.activation_status)),
                whmcs_client_id=_text(account.get(n.whmcs_client_id)),
                email=_text(contact.get("Email")),
                first_name=_text(contact.get("FirstName")),
                sim_type=_text(record.get(n.sim_type)),
                eid=_text(record.get(n.eid)),
                whmcs_order_id=_text(record.get(n.whmcs_order_id)),
                esim_iccid=_text(record.get(n.esim_iccid)),
                activated_at=_text(record.get(n.activated_at)),
                items=tuple(
                    OrderItem(
                        quantity=item.get("Quantity"),
                        whmcs_product_id=_text((item.get("Product2") or {}).get(n.whmcs_product_id)),
                    )
                    for item in item_records
                ),
            )
        except ValidationError as exc:
            where = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
            raise SalesforceRequestError(f"Order {order_id}: unexpected field values ({where})") from None


def _content(data: bytes) -> Any:
    """An answer's body: its JSON, the text of anything else, None when empty (a 204)."""
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")[:ERROR_BODY_MAX_CHARS]


def _status_error(
    operation: str, status: int, content: object, *, order_id: str | None = None
) -> SalesforceError:
    """THE place where an HTTP error answer of Salesforce becomes one of our errors."""
    code, message = _first_error(content)
    text = f"Salesforce {operation}: HTTP {status} {code or ''}: {message}".replace("  ", " ")
    if code in TRANSIENT_ERROR_CODES or status_failure(status) is not None:
        return SalesforceUnavailable(text, status=status, error_code=code)
    if order_id is not None and status == 404:
        return OrderNotFound(f"no Order {order_id} ({text})", status=status, error_code=code)
    return SalesforceRequestError(text, status=status, error_code=code)


def _first_error(content: object) -> tuple[str | None, str]:
    """errorCode and message of a Salesforce error body (a JSON array of errors, usually)."""
    first = content[0] if isinstance(content, list) and content else content
    if isinstance(first, dict):
        code = first.get("errorCode") or first.get("error")
        message = first.get("message") or first.get("error_description") or ""
        return (str(code) if code else None), str(message)
    if isinstance(content, bytes):
        content = content.decode("utf-8", "replace")
    return None, str(content)[:200]


def _text(value: object) -> str | None:
    """Ids and numbers as text: a Number(18,0) field arrives as 42.0, which means "42"."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value
