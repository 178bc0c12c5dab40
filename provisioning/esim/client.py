"""ES2+ client (GSMA SGP.22): the operator side of downloadOrder, confirmOrder, cancelOrder, releaseProfile.

Every function is an HTTPS POST of JSON to ``{url}/gsma/rsp2/es2plus/<function>``
with ``X-Admin-Protocol``; the SM-DP+ answers HTTP 200 even when the function
failed, and ``header.functionExecutionStatus`` says which. Errors are mapped in
one place (:meth:`Es2PlusClient._call`, transport failures through
:func:`provisioning.core.http.classify`) to :mod:`provisioning.esim.errors`.

Retry safety is the caller's business (docs/architecture.md; the eSIM step): order an
explicit ``iccid`` claimed from the inventory and confirm with
:func:`matching_id_for`, so that a repeat is recognisable
(8.2.1/3.3 and 8.2.1/3.5). This client repeats nothing but a connection that
could not be opened (the request was never sent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from provisioning.core import calls
from provisioning.core.errors import TransientError
from provisioning.core.http import (
    TRANSPORT_EXCEPTIONS,
    TransportFailure,
    classify,
    connection_retrying,
    make_pool,
    mark_busy,
    status_failure,
)
from provisioning.core.iccid import normalize_iccid
from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.esim.errors import (
    TRANSIENT_REASON_CODES,
    Es2PlusFunctionFailed,
    Es2PlusFunctionUnavailable,
    Es2PlusProtocolError,
    Es2PlusServerError,
    FunctionStatus,
    from_transport,
)
from provisioning.step.spec import System

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 5.0
# An SM-DP+ answers ES2+ synchronously; generous, since a timed-out call is ambiguous.
READ_TIMEOUT_S = 30.0

ADMIN_PROTOCOL = "gsma/rsp/v2.5.0"
ADMIN_PROTOCOL_PREFIX = "gsma/rsp/v2."
API_PATH = "/gsma/rsp2/es2plus/"
# cancelOrder's finalProfileStatusIndicator: back to the SM-DP+'s stock, or retired.
FINAL_PROFILE_STATUSES = ("Available", "Unavailable")
SUCCESS_STATUSES = frozenset({"Executed-Success", "Executed-WithWarning"})
_HEADERS = {
    "X-Admin-Protocol": ADMIN_PROTOCOL,
    "Accept": "application/json",
    "Content-Type": "application/json",
}
_TIMEOUT = urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)


@dataclass(frozen=True)
class ConfirmResult:
    matching_id: str
    # Optional in the answer: fall back to the configured SM-DP+ address.
    smdp_address: str | None


def matching_id_for(key: str) -> str:
    """A matchingId derived from the Order's effect key: every run of the Order confirms with the same one.

    Activation codes allow upper-case letters, digits and ``-`` in the matchingId,
    and the key may hold ``#`` and lower case, hence a digest (grouped like vendor codes).
    """
    digest = hashlib.sha256(key.encode()).hexdigest().upper()[:20]
    return "-".join(digest[i : i + 5] for i in range(0, 20, 5))


def activation_code(smdp_address: str, matching_id: str) -> str:
    """The activation code for the QR code: ``LPA:1$<SM-DP+ address>$<matchingId>``."""
    return f"LPA:1${smdp_address}${matching_id}"


def smdp_address_from_settings(settings: Settings) -> str:
    """``SMDP_ADDRESS``, else the host of ``SMDP_URL``."""
    if settings.smdp_address:
        return settings.smdp_address
    settings.require("smdp_url")
    return urlsplit(str(settings.smdp_url)).hostname or ""


class Es2PlusClient:
    """One operator's ES2+ connection to one SM-DP+."""

    def __init__(self, *, session: urllib3.PoolManager, url: str, requester_id: str) -> None:
        self._session = session
        self._base = url.rstrip("/") + API_PATH
        self._requester_id = requester_id

    @classmethod
    def from_settings(
        cls, settings: Settings, *, session: urllib3.PoolManager | None = None
    ) -> Es2PlusClient:
        settings.require("smdp_url")
        return cls(
            session=session or make_pool(settings.tls_ca_bundle, url=str(settings.smdp_url)),
            url=str(settings.smdp_url),
            requester_id=settings.smdp_requester_id,
        )

    def __repr__(self) -> str:
        return f"Es2PlusClient(url={self._base!r}, requester_id={self._requester_id!r})"

    # -- functions --------------------------------------------------------------------------

    def download_order(
        self, *, iccid: str | None = None, eid: str | None = None, profile_type: str | None = None
    ) -> str:
        """Reserve a profile (this ``iccid``, or the next of ``profile_type``); returns its ICCID."""
        if iccid is None and profile_type is None:
            raise ValueError("download_order needs an iccid or a profile_type")
        body = _drop_none({"iccid": iccid, "eid": eid, "profileType": profile_type})
        answer = self._call("downloadOrder", body)
        value = answer.get("iccid")
        if not isinstance(value, str):
            raise Es2PlusProtocolError("downloadOrder: the answer has no iccid")
        try:
            return normalize_iccid(value)
        except ValueError as exc:
            raise Es2PlusProtocolError(f"downloadOrder: the answer's iccid is malformed ({exc})") from None

    def confirm_order(
        self, *, iccid: str, matching_id: str | None, eid: str | None = None, release: bool = True
    ) -> ConfirmResult:
        """Confirm the reserved profile; with ``release`` it can be downloaded at once."""
        body = _drop_none({"iccid": iccid, "eid": eid, "matchingId": matching_id})
        body["releaseFlag"] = release
        answer = self._call("confirmOrder", body)
        returned = answer.get("matchingId")
        if not isinstance(returned, str) or not returned:
            raise Es2PlusProtocolError("confirmOrder: the answer has no matchingId")
        address = answer.get("smdpAddress")
        return ConfirmResult(matching_id=returned, smdp_address=address if isinstance(address, str) else None)

    def cancel_order(
        self,
        *,
        iccid: str,
        final_status: str = "Available",
        eid: str | None = None,
        matching_id: str | None = None,
    ) -> None:
        """Undo an order of ``iccid`` not yet downloaded; ``final_status`` ``Available`` puts the profile
        back in the SM-DP+'s stock, ``Unavailable`` retires it.

        After a download the SM-DP+ answers Failed 8.2.1/3.3 (``is_iccid_in_use``); a profile not
        ordered (a repeat after an ``Available`` reset) answers 8.2.1/3.5 (``is_invalid_transition``).
        """
        if final_status not in FINAL_PROFILE_STATUSES:
            raise ValueError(f"final_status must be one of {FINAL_PROFILE_STATUSES}, not {final_status!r}")
        body = _drop_none({"iccid": iccid, "eid": eid, "matchingId": matching_id})
        body["finalProfileStatusIndicator"] = final_status
        self._call("cancelOrder", body)

    def release_profile(self, *, iccid: str) -> None:
        """Release a profile confirmed with ``releaseFlag`` false (a repeat may answer 8.2.1/3.5)."""
        self._call("releaseProfile", {"iccid": iccid})

    # -- transport ----------------------------------------------------------------------------

    def _call(self, function: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one function and return the answer's body; every answer that is not a success is classified here."""
        call_id = str(uuid.uuid4())
        payload = {
            "header": {"functionRequesterIdentifier": self._requester_id, "functionCallIdentifier": call_id},
            **body,
        }
        started = time.monotonic()
        calls.going_out(System.SMDP)
        response = self._post(function, payload)
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        status = response.status
        busy = status_failure(status)
        if busy is not None:
            log.warning("es2plus_http_error", function=function, call_id=call_id, http_status=status)
            error = from_transport(TransportFailure(busy, f"HTTP {status}"), function, status=status)
            raise mark_busy(error, status, response.headers) if isinstance(error, TransientError) else error
        try:
            answer = json.loads(response.data)
        except ValueError:
            answer = None
        if status != 200:
            detail = _status_of(function, answer)
            why = f": {detail.describe()}" if detail else ""
            raise Es2PlusProtocolError(f"{function}: HTTP {status}{why}", status_code=status)
        if not isinstance(answer, dict):
            # A gateway's HTML page in front of the SM-DP+, typically: worth another try.
            raise Es2PlusServerError(f"{function}: the answer is not a JSON object", status_code=status)
        protocol = response.headers.get("X-Admin-Protocol", "")
        if not protocol.startswith(ADMIN_PROTOCOL_PREFIX):
            raise Es2PlusProtocolError(
                f"{function}: X-Admin-Protocol {protocol!r} is not {ADMIN_PROTOCOL_PREFIX}*"
            )
        outcome = _status_of(function, answer)
        if outcome is None:
            raise Es2PlusProtocolError(f"{function}: the answer has no header.functionExecutionStatus.status")
        # A success at DEBUG (the run's last line has the ICCID); any other outcome at INFO, with the
        # call id the SM-DP+ vendor's support asks for.
        log.log(
            logging.DEBUG if outcome.status in SUCCESS_STATUSES else logging.INFO,
            "es2plus_call",
            function=function,
            call_id=call_id,
            status=outcome.status,
            subject_code=outcome.subject_code,
            reason_code=outcome.reason_code,
            elapsed_ms=elapsed_ms,
        )
        if outcome.status in SUCCESS_STATUSES:
            return answer
        if outcome.status == "Expired" or outcome.reason_code in TRANSIENT_REASON_CODES:
            raise Es2PlusFunctionUnavailable(outcome)
        if outcome.status == "Failed":
            raise Es2PlusFunctionFailed(outcome)
        raise Es2PlusProtocolError(f"{function}: unknown status {outcome.status!r}")

    def _post(self, function: str, payload: dict[str, Any]) -> urllib3.BaseHTTPResponse:
        """The one place where transport exceptions become ours; only a request never sent is sent again."""
        try:
            response: urllib3.BaseHTTPResponse = connection_retrying()(
                self._session.request,
                "POST",
                self._base + function,
                body=json.dumps(payload).encode(),
                headers=_HEADERS,
                timeout=_TIMEOUT,
                redirect=False,
            )
            return response
        except TRANSPORT_EXCEPTIONS as exc:
            raise from_transport(classify(exc), function) from exc


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _status_of(function: str, answer: object) -> FunctionStatus | None:
    if not isinstance(answer, dict):
        return None
    header = answer.get("header")
    execution = header.get("functionExecutionStatus") if isinstance(header, dict) else None
    if not isinstance(execution, dict) or not isinstance(execution.get("status"), str):
        return None
    codes = execution.get("statusCodeData")
    codes = codes if isinstance(codes, dict) else {}

    def text(key: str) -> str | None:
        value = codes.get(key)
        return str(value) if value is not None else None

    return FunctionStatus(
        function=function,
        status=execution["status"],
        subject_code=text("subjectCode"),
        reason_code=text("reasonCode"),
        subject_identifier=text("subjectIdentifier"),
        message=text("message"),
    )
