"""WHMCS External API client (``POST <WHMCS_URL>/includes/api.php``), on urllib3's pools (:func:`make_pool`).

Always asks for ``responsetype=json`` and reads the body, never the status alone (WHMCS answers
its errors at HTTP 200). Numbers arrive as strings and are coerced by the models here. Errors
are those of :mod:`provisioning.whmcs.errors`, translated in :meth:`WhmcsClient._call` only
(transport failures through :func:`provisioning.core.http.classify`).

Retries: one, and only when resending cannot apply anything twice: any action whose
connection could not even be opened, or a read action whose connection was lost. Nothing else
is retried here (the Celery tasks own the retry policy); an auth error never is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import Any

import urllib3
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from provisioning.core import calls
from provisioning.core.errors import TransientError
from provisioning.core.http import (
    TRANSPORT_EXCEPTIONS,
    Failure,
    TransportFailure,
    classify,
    connection_retrying,
    make_pool,
    mark_busy,
    status_failure,
)
from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.step.spec import System
from provisioning.whmcs.errors import (
    WhmcsAuthError,
    WhmcsClientNotFound,
    WhmcsError,
    WhmcsOrderNotPending,
    WhmcsPermanentError,
    WhmcsTransientError,
    from_transport,
)

log = get_logger(__name__)

API_PATH = "includes/api.php"
# Opening a TCP+TLS connection to WHMCS.
CONNECT_TIMEOUT_S = 5.0
# Waiting for an answer: AddOrder runs hooks and creates invoices, so it can take seconds.
READ_TIMEOUT_S = 30.0
# GetOrders page size while looking for an order by its note.
ORDERS_PAGE_SIZE = 100

READ_ACTIONS = frozenset({"GetClientsDetails", "GetPayMethods", "GetOrders"})
# Error messages of WHMCS's access control, authentication and authorisation layers.
AUTH_MESSAGE_PREFIXES = (
    "Authentication Failed",
    "Invalid IP",
    "IP Banned",
    "Invalid or missing credentials",
    "Invalid Access Key",
    "Invalid administrative identifier",
    "Invalid password provided",
    "Administrator Account Disabled",
    "Access Denied",
    "Invalid Permissions",
)
CLIENT_NOT_FOUND_MESSAGES = frozenset({"Client Not Found", "Client ID Not Found"})
ORDER_NOT_PENDING_MESSAGE = "Order ID not found or Status not Pending"
# A PDO error from WHMCS's database (deadlock, lost connection): worth another try later.
TRANSIENT_MESSAGE_PREFIXES = ("SQLSTATE[",)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, coerce_numbers_to_str=True)


def _optional_id(value: object) -> int | None:
    """WHMCS writes "no id" as "", "0" or nothing."""
    if value in (None, "", "0", 0):
        return None
    return int(str(value))


def _id_list(value: object) -> list[int]:
    """A comma-separated id list such as AddOrder's ``serviceids``."""
    return [int(part) for part in str(value or "").split(",") if part.strip()]


class WhmcsClientDetails(_Model):
    """What GetClientsDetails says about a client that provisioning needs (no personal data)."""

    id: int
    status: str
    currency_code: str | None = None
    default_gateway: str | None = Field(None, alias="defaultgateway")


class PayMethod(_Model):
    """One stored pay method of a client (GetPayMethods); tokens are not kept."""

    id: int
    type: str
    description: str = ""
    gateway_name: str = ""
    card_last_four: str | None = None
    card_type: str | None = None
    expiry_date: str | None = None
    bank_name: str | None = None

    def is_expired(self, today: date) -> bool:
        """A card whose ``MM/YY`` expiry month is over; pay methods without an expiry never are."""
        match = re.fullmatch(r"\s*(\d{1,2})\s*/\s*(\d{2}|\d{4})\s*", self.expiry_date or "")
        if not match:
            return False
        month, year = int(match.group(1)), int(match.group(2))
        year += 2000 if year < 100 else 0
        return (year, month) < (today.year, today.month)


class AddOrderResult(_Model):
    order_id: int
    service_ids: list[int]
    invoice_id: int | None


class WhmcsOrder(_Model):
    """One order of GetOrders."""

    id: int
    order_num: str = Field("", alias="ordernum")
    user_id: int = Field(alias="userid")
    date: str = ""
    amount: Decimal = Decimal("0")
    payment_method: str = Field("", alias="paymentmethod")
    invoice_id: int | None = Field(None, alias="invoiceid")
    status: str
    payment_status: str | None = Field(None, alias="paymentstatus")
    notes: str = ""
    service_ids: list[int] = Field(default_factory=list)
    # Each service's status (Pending, Active, Suspended, Terminated, Cancelled), by service id.
    service_statuses: dict[int, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_api(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lineitems" in data:
            items = data["lineitems"].get("lineitem", []) if isinstance(data["lineitems"], dict) else []
            products = [i for i in items if isinstance(i, dict) and i.get("type") == "product"]
            ids = [int(i["relid"]) for i in products]
            statuses = {int(i["relid"]): str(i.get("status", "")) for i in products}
            data = {**data, "service_ids": ids, "service_statuses": statuses}
        return data

    @field_validator("invoice_id", mode="before")
    @classmethod
    def _invoice(cls, value: object) -> int | None:
        return _optional_id(value)


def note_matches(notes: str, note: str) -> bool:
    """Whether ``note`` appears in ``notes`` as a whole (bounded by whitespace or the ends).

    A plain substring test would let run ``X:a`` adopt the order of run ``X:ab``.
    """
    return re.search(rf"(?<!\S){re.escape(note)}(?!\S)", notes) is not None


class WhmcsClient:
    """The WHMCS API calls provisioning makes. Thread-safe as far as its session is."""

    def __init__(
        self,
        *,
        session: urllib3.PoolManager,
        url: str,
        identifier: SecretStr,
        secret: SecretStr,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        base = str(url).rstrip("/")
        self.endpoint = base if base.endswith(".php") else f"{base}/{API_PATH}"
        self._session = session
        self._identifier = identifier
        self._secret = secret
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings, session: urllib3.PoolManager | None = None) -> WhmcsClient:
        settings.require("whmcs_url", "whmcs_identifier", "whmcs_secret")
        assert settings.whmcs_identifier is not None
        assert settings.whmcs_secret is not None
        return cls(
            session=session or make_pool(settings.tls_ca_bundle, url=str(settings.whmcs_url)),
            url=str(settings.whmcs_url),
            identifier=settings.whmcs_identifier,
            secret=settings.whmcs_secret,
        )

    def __repr__(self) -> str:
        return f"WhmcsClient(endpoint={self.endpoint!r})"

    # -- actions ----------------------------------------------------------------------------

    def get_client(self, client_id: int) -> WhmcsClientDetails:
        """GetClientsDetails; raises WhmcsClientNotFound."""
        return WhmcsClientDetails.model_validate(
            self._call("GetClientsDetails", {"clientid": str(client_id)})
        )

    def get_pay_methods(self, client_id: int, *, kind: str | None = None) -> list[PayMethod]:
        """GetPayMethods (``kind``: ``CreditCard`` or ``BankAccount``); raises WhmcsClientNotFound."""
        params = {"clientid": str(client_id)}
        if kind:
            params["type"] = kind
        body = self._call("GetPayMethods", params)
        return [PayMethod.model_validate(pm) for pm in body.get("paymethods") or []]

    def add_order(
        self, *, client_id: int, payment_method: str, items: Sequence[tuple[int, int]], notes: str
    ) -> AddOrderResult:
        """AddOrder of ``items`` ((pid, qty) pairs) without WHMCS's e-mails; the order stays Pending.

        Not idempotent: after a WhmcsTransientError the order may exist; find it with
        :meth:`find_order_by_note` before calling this again.
        """
        if not items or any(qty < 1 for _, qty in items):
            raise ValueError("add_order needs at least one (pid, qty) item with qty >= 1")
        params = {
            "clientid": str(client_id),
            "paymentmethod": payment_method,
            "notes": notes,
            "noinvoiceemail": "1",
            "noemail": "1",
        }
        for i, (pid, qty) in enumerate(items):
            params[f"pid[{i}]"] = str(pid)
            params[f"qty[{i}]"] = str(qty)
        body = self._call("AddOrder", params)
        return AddOrderResult(
            order_id=int(body["orderid"]),
            service_ids=_id_list(body.get("serviceids")),
            invoice_id=_optional_id(body.get("invoiceid")),
        )

    def accept_order(self, order_id: int, *, autosetup: bool = True, send_email: bool = False) -> None:
        """AcceptOrder; on a repeat WHMCS answers WhmcsOrderNotPending (confirm with get_order)."""
        # "0" is false in PHP; leaving a flag out would fall back to the product's setting.
        params = {
            "orderid": str(order_id),
            "autosetup": str(int(autosetup)),
            "sendemail": str(int(send_email)),
        }
        self._call("AcceptOrder", params)

    def cancel_order(self, order_id: int, *, send_email: bool = False) -> None:
        """CancelOrder of a Pending order (its services and invoice are cancelled with it).

        Anything but Pending (a repeat after a lost answer, an accepted order) answers
        WhmcsOrderNotPending: look the order up with :meth:`get_orders`.
        """
        self._call("CancelOrder", {"orderid": str(order_id), "noemail": "0" if send_email else "1"})

    def terminate_service(self, service_id: int) -> None:
        """ModuleTerminate of one service of an accepted order (its module deprovisions it).

        Not idempotent in general (what a repeat answers is the module's): check the service's status
        (:meth:`get_orders`' line items) before calling it again.
        """
        self._call("ModuleTerminate", {"serviceid": str(service_id)})

    def get_orders(
        self,
        *,
        client_id: int | None = None,
        order_id: int | None = None,
        status: str | None = None,
        limit: int = 25,
        offset: int = 0,
    ) -> list[WhmcsOrder]:
        """One page of GetOrders, newest first."""
        return self._orders_page(
            client_id=client_id, order_id=order_id, status=status, limit=limit, offset=offset
        )[1]

    def find_order_by_note(
        self, client_id: int, note: str, *, page_size: int = ORDERS_PAGE_SIZE
    ) -> WhmcsOrder | None:
        """The newest order of the client whose notes contain ``note`` (see :func:`note_matches`).

        Pages through GetOrders newest first; orders added meanwhile only push older ones to later
        pages, so none is skipped.
        """
        if not note.strip():
            raise ValueError("note must not be blank")
        offset = 0
        while True:
            total, orders = self._orders_page(client_id=client_id, limit=page_size, offset=offset)
            for order in orders:
                if note_matches(order.notes, note):
                    return order
            offset += len(orders)
            if not orders or offset >= total:
                return None

    def _orders_page(
        self,
        *,
        client_id: int | None = None,
        order_id: int | None = None,
        status: str | None = None,
        limit: int,
        offset: int,
    ) -> tuple[int, list[WhmcsOrder]]:
        params = {"limitstart": str(offset), "limitnum": str(limit)}
        if client_id is not None:
            params["userid"] = str(client_id)
        if order_id is not None:
            params["id"] = str(order_id)
        if status:
            params["status"] = status
        body = self._call("GetOrders", params)
        # No match: WHMCS leaves the "orders" key out altogether.
        raw = (body.get("orders") or {}).get("order") or []
        orders = [WhmcsOrder.model_validate(o) for o in (raw if isinstance(raw, list) else [raw])]
        return int(body.get("totalresults") or 0), orders

    # -- transport ----------------------------------------------------------------------------

    def _call(self, action: str, params: Mapping[str, str]) -> dict[str, Any]:
        """POST one action; the single place where transport and API errors become WhmcsErrors."""
        data = {
            **params,
            "action": action,
            "identifier": self._identifier.get_secret_value(),
            "secret": self._secret.get_secret_value(),
            "responsetype": "json",
        }
        # A read may also be resent when its connection was lost: reading twice changes nothing.
        retrying = connection_retrying(
            also_resend=lambda failure: action in READ_ACTIONS and failure.kind is Failure.CONNECTION_LOST
        )
        started = time.monotonic()
        calls.going_out(System.WHMCS)
        try:
            response = retrying(
                self._session.request,
                "POST",
                self.endpoint,
                fields=data,
                encode_multipart=False,
                timeout=self._timeout,
                redirect=False,
            )
            body = self._read(action, response)
        except TRANSPORT_EXCEPTIONS as exc:
            error = from_transport(classify(exc), action)
            log.warning("whmcs_call_failed", action=action, error=type(error).__name__, reason=str(error))
            raise error from exc
        except WhmcsError as error:
            log.warning(
                "whmcs_call_failed",
                action=action,
                error=type(error).__name__,
                status=error.status,
                reason=str(error),
            )
            raise
        log.debug("whmcs_call", action=action, elapsed_ms=round((time.monotonic() - started) * 1000, 1))
        return body

    def _scrub(self, text: str) -> str:
        for value in (self._secret.get_secret_value(), self._identifier.get_secret_value()):
            if value:
                text = text.replace(value, "***")
        return text

    def _read(self, action: str, response: urllib3.BaseHTTPResponse) -> dict[str, Any]:
        status = response.status
        if 300 <= status < 400:
            raise WhmcsPermanentError(
                f"WHMCS {action}: unexpected redirect (HTTP {status}) to {response.headers.get('Location')!r}; "
                "check WHMCS_URL",
                action=action,
                status=status,
            )
        busy = status_failure(status)
        if busy is not None:
            error = from_transport(TransportFailure(busy, f"HTTP {status}"), action, status=status)
            raise mark_busy(error, status, response.headers) if isinstance(error, TransientError) else error
        if status in (401, 403):
            raise WhmcsAuthError(
                f"WHMCS {action}: HTTP {status} (access refused)", action=action, status=status
            )
        if status >= 400:
            raise WhmcsPermanentError(f"WHMCS {action}: HTTP {status}", action=action, status=status)
        try:
            body = json.loads(response.data)
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            raise WhmcsTransientError(
                f"WHMCS {action}: answer is not JSON ({kind}, {len(response.data)} bytes)",
                action=action,
                status=status,
            ) from None
        if not isinstance(body, dict):
            raise WhmcsTransientError(
                f"WHMCS {action}: answer is not a JSON object", action=action, status=status
            )
        result = body.get("result")
        if result == "success":
            return body
        if result == "error":
            raise self._api_error(action, self._scrub(str(body.get("message") or "")), status)
        raise WhmcsTransientError(f"WHMCS {action}: answer without a result", action=action, status=status)

    @staticmethod
    def _api_error(action: str, message: str, status: int) -> WhmcsError:
        cls: type[WhmcsError] = WhmcsPermanentError
        if message.startswith(TRANSIENT_MESSAGE_PREFIXES):
            cls = WhmcsTransientError
        elif message.startswith(AUTH_MESSAGE_PREFIXES):
            cls = WhmcsAuthError
        elif message in CLIENT_NOT_FOUND_MESSAGES:
            cls = WhmcsClientNotFound
        elif message == ORDER_NOT_PENDING_MESSAGE:
            cls = WhmcsOrderNotPending
        return cls(
            f"WHMCS {action}: {message or 'error without a message'}",
            action=action,
            status=status,
            api_message=message,
        )
