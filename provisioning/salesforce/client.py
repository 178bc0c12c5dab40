"""The REST client the workers and the operators' tools use, on simple-salesforce.

One SOQL query reads an Order, one PATCH writes it; ``provisioning salesforce check`` adds the
describe, limits and Tooling API calls. Every call goes through simple-salesforce's ``Salesforce``
object (``query``, ``query_more``, ``restful``, ``limits``, ``toolingexecute``), built on our JWT
session (:class:`JWTBearerAuth`: simple-salesforce's own JWT login only builds
``*.salesforce.com`` hosts) and our ``requests.Session`` (:func:`provisioning.core.http.make_session`:
a configured CA bundle wins over ``REQUESTS_CA_BUNDLE``). A 401 ``INVALID_SESSION_ID`` renews the
token once (shared by all threads) and repeats the call; a request that was never sent is sent
once more; nothing else is retried here. Errors are translated in one place:
:func:`provisioning.salesforce.errors.from_answer` (Salesforce's error answers, which
simple-salesforce raises as its own exceptions) and
:func:`provisioning.salesforce.errors.from_transport` (transport failures). Every answer's
``Sforce-Limit-Info: api-usage=N/M`` is kept: :meth:`SalesforceClient.api_usage`.
simple-salesforce parses that header into its ``api_usage`` only for a successful answer (it
raises on an error answer first), so a response hook on our session reads it from every answer,
errors included, with simple-salesforce's parser (``Salesforce.parse_api_usage``).

requests costs a few tenths of a millisecond of CPU per call more than urllib3's pools
(``bench/salesforce_client_cpu.py``, docs/benchmarks.md): about a millisecond per run, against the
tens of milliseconds Celery and the broker spend on one.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, TypeVar

import requests
from pydantic import ValidationError
from simple_salesforce import exceptions as sf_exceptions
from simple_salesforce.api import Salesforce
from simple_salesforce.format import format_soql
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from provisioning.core import calls
from provisioning.core.errors import PicklableError
from provisioning.core.http import TRANSPORT_EXCEPTIONS, classify, connection_retrying, make_session
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
    first_error,
    from_answer,
    from_transport,
)
from provisioning.salesforce.ids import normalize_id
from provisioning.step.order import Order, OrderItem
from provisioning.step.spec import System

log = get_logger(__name__)

REST_CONNECT_TIMEOUT_S = 10.0
REST_READ_TIMEOUT_S = 30.0
# Tries of one call when the session expired: the first, and one after a fresh login.
SESSION_ATTEMPTS = 2

_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Activation_Error__c is a Text(255) by default.
ACTIVATION_ERROR_MAX_CHARS = 255

T = TypeVar("T")


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

    # The Order fields the service writes (every PATCH's keys): :meth:`patch` refuses any other, so
    # this is what the permission set must let it edit and what the check asks the org.
    WRITTEN = frozenset(
        {
            "activation_status",
            "whmcs_order_id",
            "esim_iccid",
            "activation_error",
            "activated_at",
            "esim_status",
            "esim_status_at",
        }
    )

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
        for name, value in values.items():
            if name not in self.WRITTEN:
                raise ValueError(f"unknown Order field {name!r} to write; written: {sorted(self.WRITTEN)}")
            if name == "activation_error" and isinstance(value, str):
                value = value[:ACTIVATION_ERROR_MAX_CHARS]
            body[getattr(self, name)] = value
        return body


@dataclass(frozen=True)
class FieldUse:
    """One field the service reads or writes: on which object, under which API name, and how."""

    sobject: str  # Order, Account, Contact, OrderItem, Product2
    name: str  # the API name in this org
    logical: str | None  # OrderFieldNames' name (the SF_FIELD_* setting), None for a standard field
    reads: bool
    writes: bool

    @property
    def setting(self) -> str | None:
        return None if self.logical is None else f"SF_FIELD_{self.logical.upper()}"


# The Order query's columns: (relationship path, object, logical name or a standard field's API name).
# order_query writes them as SOQL and fields_used lists them: one list for both.
_ORDER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("", "Order", "Id"),
    ("", "Order", "OrderNumber"),
    ("", "Order", "activation_status"),
    ("Account.", "Account", "whmcs_client_id"),
    ("BillToContact.", "Contact", "Email"),
    ("BillToContact.", "Contact", "FirstName"),
    ("", "Order", "sim_type"),
    ("", "Order", "eid"),
    ("", "Order", "whmcs_order_id"),
    ("", "Order", "esim_iccid"),
    ("", "Order", "activated_at"),
)
_ITEM_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("", "OrderItem", "Quantity"),
    ("Product2.", "Product2", "whmcs_product_id"),
)
# The lookups the query follows (read through their relationship names).
_LOOKUPS: tuple[tuple[str, str], ...] = (
    ("Order", "AccountId"),
    ("Order", "BillToContactId"),
    ("OrderItem", "Product2Id"),
)


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
    """Reads and writes Orders, publishes the provisioning event and asks the org about itself, over REST."""

    def __init__(
        self,
        *,
        auth: JWTBearerAuth,
        session: requests.Session,
        api_version: str = DEFAULT_SF_API_VERSION,
        field_names: OrderFieldNames | None = None,
        event_object: str = DEFAULT_PROVISION_EVENT,
    ) -> None:
        self._auth = auth
        self._session = session
        self.api_version = api_version
        self.field_names = field_names or OrderFieldNames()
        self.event_object = event_object
        self._timeout = (REST_CONNECT_TIMEOUT_S, REST_READ_TIMEOUT_S)
        self._lock = threading.Lock()
        # simple-salesforce's Salesforce object for the current token (one per token: a renewal builds
        # the next; a thread still holding the old one meets 401 and renews, at most once).
        self._org: tuple[AccessToken, Salesforce] | None = None
        self._api_usage: tuple[int, int] | None = None
        if session is not None:
            session.hooks["response"].append(self._read_usage)
        self.api_calls = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        session: requests.Session | None = None,
        *,
        auth: JWTBearerAuth | None = None,
    ) -> SalesforceClient:
        return cls(
            auth=auth
            if auth is not None
            else JWTBearerAuth.from_settings(settings, make_session(settings.tls_ca_bundle)),
            session=session if session is not None else make_session(settings.tls_ca_bundle),
            api_version=settings.sf_api_version,
            field_names=OrderFieldNames.from_settings(settings),
            event_object=settings.sf_provision_event_channel.removeprefix("/event/"),
        )

    def __repr__(self) -> str:
        return f"SalesforceClient(api_version={self.api_version!r}, api_calls={self.api_calls})"

    def api_usage(self) -> tuple[int, int] | None:
        """(used, limit) of the org's daily API requests, from the last answer's ``Sforce-Limit-Info``."""
        return self._api_usage

    # -- what the service reads and writes ----------------------------------------------------

    def _api_name(self, name: str) -> tuple[str, str | None]:
        """(API name, logical name) of a column: OrderFieldNames' names are mapped, others are standard."""
        if name in OrderFieldNames.__dataclass_fields__:
            return getattr(self.field_names, name), name
        return name, None

    def fields_used(self) -> tuple[FieldUse, ...]:
        """Every field the Order query reads and the PATCHes write, on its object, in this org's names."""
        used: dict[tuple[str, str], FieldUse] = {}
        for _, sobject, column in (*_ORDER_COLUMNS, *_ITEM_COLUMNS):
            name, logical = self._api_name(column)
            used[(sobject, name)] = FieldUse(sobject, name, logical, reads=True, writes=False)
        for sobject, lookup in _LOOKUPS:
            used[(sobject, lookup)] = FieldUse(sobject, lookup, None, reads=True, writes=False)
        for logical in sorted(OrderFieldNames.WRITTEN):
            name = getattr(self.field_names, logical)
            reads = ("Order", name) in used
            used[("Order", name)] = FieldUse("Order", name, logical, reads=reads, writes=True)
        return tuple(used.values())

    def order_query(self, order_id: str) -> str:
        """The one SOQL query :meth:`fetch_order` sends."""

        def columns(spec: tuple[tuple[str, str, str], ...]) -> str:
            return ", ".join(path + self._api_name(column)[0] for path, _, column in spec)

        # Field names are checked API names (OrderFieldNames), hence :literal; the Id is quoted.
        items = format_soql("(SELECT {:literal} FROM OrderItems)", columns(_ITEM_COLUMNS))
        return format_soql(
            "SELECT {:literal}, {:literal} FROM Order WHERE Id = {}",
            columns(_ORDER_COLUMNS),
            items,
            normalize_id(order_id),
        )

    # -- the operations ---------------------------------------------------------------------

    def fetch_order(self, order_id: str) -> Order:
        """The Order and its items, from ONE SOQL query; OrderNotFound if there is none."""
        order_id = normalize_id(order_id)
        soql = self.order_query(order_id)
        result = self._call(
            "query Order", lambda org: org.query(soql, timeout=self._timeout), not_found=OrderNotFound
        )
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
        self._call(
            f"update Order {order_id}",
            lambda org: org.restful(
                f"sobjects/Order/{order_id}", method="PATCH", json=body, timeout=self._timeout
            ),
            not_found=OrderNotFound,
        )

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
        page = self._call("query waiting Orders", lambda org: org.query(soql, timeout=self._timeout))
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
            page = self._call("query waiting Orders (next page)", self._next_page(str(next_url)))

    def _next_page(self, url: str) -> Callable[[Salesforce], Any]:
        return lambda org: org.query_more(url, identifier_is_url=True, timeout=self._timeout)

    def publish_event(self, order_id: str, idem_key: str | None = None) -> str:
        """Publish the provisioning Platform Event as an org does (REST POST); returns its id.

        ``order_id`` is sent as given (not validated), so tests can publish bad events.
        """
        payload: dict[str, object] = {"OrderId__c": order_id}
        if idem_key is not None:
            payload["IdemKey__c"] = idem_key
        result = self._call(
            f"publish {self.event_object}",
            lambda org: org.restful(
                f"sobjects/{self.event_object}/", method="POST", json=payload, timeout=self._timeout
            ),
        )
        if not isinstance(result, dict) or not result.get("success", True) or not result.get("id"):
            raise SalesforceRequestError(f"publishing {self.event_object} failed: {result!r}")
        return str(result["id"])

    # -- the org's own description (provisioning salesforce check) ------------------------------

    def describe(self, sobject: str) -> dict[str, Any]:
        """``GET sobjects/{sobject}/describe``: the object's fields as the integration user sees them.

        A field the user may not read is not in the answer; an object it may not read is a 404
        (SalesforceRequestError with ``error_code`` NOT_FOUND), as one that does not exist.
        """
        if not _API_NAME.fullmatch(sobject):
            raise ValueError(f"{sobject!r} is not a Salesforce API name")
        result = self._call(
            f"describe {sobject}",
            lambda org: org.restful(f"sobjects/{sobject}/describe", timeout=self._timeout),
        )
        return result if isinstance(result, dict) else {}

    def limits(self) -> dict[str, Any]:
        """``GET limits``: the org's limits (``DailyApiRequests``: ``Max``, ``Remaining``)."""
        result = self._call("limits", lambda org: org.limits(timeout=self._timeout))
        return result if isinstance(result, dict) else {}

    def tooling_query(self, soql: str) -> list[dict[str, Any]]:
        """The records of a Tooling API query (``tooling/query/?q=``), the first page."""
        result = self._call(
            "Tooling API query",
            lambda org: org.toolingexecute("query/", params={"q": soql}, timeout=self._timeout),
        )
        if not isinstance(result, dict):
            raise SalesforceRequestError(
                f"Tooling API query: an answer that is not JSON ({str(result)[:80]!r})"
            )
        return list(result.get("records") or [])

    # -- plumbing ---------------------------------------------------------------------------

    def _call(
        self,
        operation: str,
        request: Callable[[Salesforce], T],
        *,
        not_found: type[SalesforceError] | None = None,
    ) -> T:
        """One API call through simple-salesforce; after a 401 INVALID_SESSION_ID, one fresh login and one repeat."""
        renewing = Retrying(
            stop=stop_after_attempt(SESSION_ATTEMPTS),
            retry=retry_if_exception_type(_SessionExpired),
            before_sleep=self._renew,
            reraise=True,
        )
        try:
            result: T = renewing(self._call_once, operation, request, not_found)
            return result
        except _SessionExpired as expired:
            raise SalesforceAuthError(
                f"Salesforce {operation}: HTTP 401 {expired.code}: {expired.message}"
                " (again, right after a fresh login)",
                status=401,
                error_code=expired.code,
            ) from expired

    def _salesforce(self) -> tuple[AccessToken, Salesforce]:
        token = self._auth.token()
        current = self._org
        if current is not None and current[0] is token:
            return current
        with self._lock:
            if self._org is None or self._org[0] is not token:
                org = Salesforce(
                    instance_url=token.instance_url,
                    session_id=token.bearer(),
                    version=self.api_version,
                    session=self._session,
                    object_pairs_hook=dict,
                )
                self._org = (token, org)
            return self._org

    def _call_once(
        self,
        operation: str,
        request: Callable[[Salesforce], T],
        not_found: type[SalesforceError] | None,
    ) -> T:
        token, org = self._salesforce()
        with self._lock:
            self.api_calls += 1
        calls.going_out(System.SALESFORCE)
        try:
            result: T = connection_retrying()(request, org)
        except sf_exceptions.SalesforceExpiredSession as exc:
            code, message = first_error(exc.content)
            if code == "INVALID_SESSION_ID":
                raise _SessionExpired(token, code, message) from None
            raise from_answer(exc, f"Salesforce {operation}") from None
        except sf_exceptions.SalesforceError as exc:
            raise from_answer(exc, f"Salesforce {operation}", not_found=not_found) from None
        except ValueError:
            # requests' JSONDecodeError: not Salesforce answering (a proxy's page, say).
            raise _not_json(operation) from None
        except TRANSPORT_EXCEPTIONS as exc:
            raise from_transport(classify(exc), f"Salesforce {operation}") from exc
        if isinstance(result, str | bytes):
            # Text where Salesforce answers a JSON object or array (toolingexecute hands text back).
            raise _not_json(operation)
        return result

    def _read_usage(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        """The session's response hook: ``Sforce-Limit-Info`` of every answer, an error's too."""
        header = response.headers.get("Sforce-Limit-Info")
        if header:
            usage = Salesforce.parse_api_usage(header).get("api-usage")
            if usage is not None:
                self._api_usage = (int(usage.used), int(usage.total))

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


def _not_json(operation: str) -> SalesforceRequestError:
    return SalesforceRequestError(
        f"Salesforce {operation}: an answer that is not JSON (check SF_LOGIN_URL and any proxy in between)"
    )


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
