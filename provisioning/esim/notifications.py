"""ES2+ handleDownloadProgressInfo (SGP.22 5.3.5, SM-DP+ → operator): what a notification says.

The SM-DP+ POSTs ``/gsma/rsp2/es2plus/handleDownloadProgressInfo`` with
``{"header": {"functionRequesterIdentifier", "functionCallIdentifier"}, "iccid",
"profileType", "timestamp" (YYYY-MM-DDThh:mm:ssTZD), "notificationPointId" (int),
"notificationPointStatus": {"status", "statusCodeData"?}, "eid"?, "resultData"?}``
and expects HTTP 204 with an empty body. Notification points: 1 eligibility and
retry-limit check, 2 confirmation failure, 3 BPP download, 4 BPP installation.

What each one does to the eSIM's state (the ledger's state machine decides whether
it applies: ``provisioning/ledger/lua/esim_notify.lua``):

- point 3, Executed-Success: downloaded; point 4, Executed-Success: installed;
- any point whose status is Failed: error, with the statusCodeData as the reason;
- points 1 and 2 with success (and any higher point): recorded, no change.

A malformed body is answered as the ES2+ functions answer a malformed request (the
simulator's choice, the spec's request-format codes were not consulted): HTTP 200,
``Failed`` with 1.1/2.2 (a mandatory element missing) or 1.1/2.1 (malformed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from provisioning.core.iccid import normalize_iccid
from provisioning.ledger.esim_status import EsimState

FUNCTION = "handleDownloadProgressInfo"
PATH = "/gsma/rsp2/es2plus/" + FUNCTION
POINT_ELIGIBILITY, POINT_CONFIRMATION_FAILURE, POINT_DOWNLOAD, POINT_INSTALLATION = 1, 2, 3, 4
SUCCESS = "Executed-Success"
# 'YYYY-MM-DDThh:mm:ssTZD': TZD is Z or ±hh:mm (fractions of a second tolerated).
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
REASON_MAX_CHARS = 200


@dataclass(frozen=True)
class Notification:
    requester: str
    call_id: str
    iccid: str
    profile_type: str
    timestamp_ms: int
    point: int
    status: str
    reason: str  # the statusCodeData in words, for a Failed point ('' otherwise)
    eid: str | None = None

    @property
    def wanted(self) -> EsimState | None:
        """The state this notification asks for (None: recorded only)."""
        if self.status != SUCCESS and self.status.startswith(("Failed", "Expired")):
            return EsimState.ERROR
        if self.status == SUCCESS and self.point == POINT_DOWNLOAD:
            return EsimState.DOWNLOADED
        if self.status == SUCCESS and self.point == POINT_INSTALLATION:
            return EsimState.INSTALLED
        return None


@dataclass(frozen=True)
class Malformed:
    subject: str
    reason: str
    message: str

    def envelope(self) -> dict[str, Any]:
        return {
            "header": {
                "functionExecutionStatus": {
                    "status": "Failed",
                    "statusCodeData": {
                        "subjectCode": self.subject,
                        "reasonCode": self.reason,
                        "message": self.message,
                    },
                }
            }
        }


def _missing(name: str) -> Malformed:
    return Malformed("1.1", "2.2", f"{name} is required")


def _bad(name: str, why: str) -> Malformed:
    return Malformed("1.1", "2.1", f"{name} {why}")


def parse_timestamp_ms(value: str) -> int:
    """ES2+'s timestamp as milliseconds since the epoch (ValueError when it is not one)."""
    if not _TIMESTAMP.match(value):
        raise ValueError("not YYYY-MM-DDThh:mm:ssTZD")
    return round(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def parse(body: object) -> Notification | Malformed:
    """A notification from the request's JSON body, or why it is malformed."""
    if not isinstance(body, dict):
        return _bad("the body", "must be a JSON object")
    header = body.get("header")
    if not isinstance(header, dict):
        return _missing("header")
    for key in ("functionRequesterIdentifier", "functionCallIdentifier"):
        if key not in header:
            return _missing(f"header.{key}")
        if not isinstance(header[key], str) or not header[key]:
            return _bad(f"header.{key}", "must be a non-empty string")
    for key in ("iccid", "profileType", "timestamp", "notificationPointId", "notificationPointStatus"):
        if body.get(key) is None:
            return _missing(key)
    try:
        iccid = normalize_iccid(str(body["iccid"])) if isinstance(body["iccid"], str) else ""
    except ValueError:
        iccid = ""
    if not iccid:
        return _bad("iccid", "is not an ICCID")
    if not isinstance(body["profileType"], str):
        return _bad("profileType", "must be a string")
    try:
        timestamp_ms = parse_timestamp_ms(str(body["timestamp"]))
    except ValueError:
        return _bad("timestamp", "must be YYYY-MM-DDThh:mm:ssTZD")
    point = body["notificationPointId"]
    if isinstance(point, bool) or not isinstance(point, int) or point < 1:
        return _bad("notificationPointId", "must be a positive integer")
    status = body["notificationPointStatus"]
    if not isinstance(status, dict) or not isinstance(status.get("status"), str) or not status["status"]:
        return _bad("notificationPointStatus", "must be an object with a status")
    eid = body.get("eid")
    return Notification(
        requester=header["functionRequesterIdentifier"],
        call_id=header["functionCallIdentifier"],
        iccid=iccid,
        profile_type=body["profileType"],
        timestamp_ms=timestamp_ms,
        point=point,
        status=status["status"],
        reason=_reason(point, status) if status["status"] != SUCCESS else "",
        eid=eid if isinstance(eid, str) else None,
    )


def _reason(point: int, status: dict[str, Any]) -> str:
    codes = status.get("statusCodeData")
    codes = codes if isinstance(codes, dict) else {}
    where = {
        POINT_ELIGIBILITY: "eligibility check",
        POINT_CONFIRMATION_FAILURE: "confirmation",
        POINT_DOWNLOAD: "download",
        POINT_INSTALLATION: "installation",
    }.get(point, f"point {point}")
    code = "/".join(str(codes[k]) for k in ("subjectCode", "reasonCode") if codes.get(k) is not None)
    message = str(codes.get("message") or status["status"])
    return (
        f"{where} failed ({code}): {message}"[:REASON_MAX_CHARS]
        if code
        else f"{where} failed: {message}"[:REASON_MAX_CHARS]
    )
