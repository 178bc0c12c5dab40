"""SM-DP+ simulator: the ES2+ interface (GSMA SGP.22) over HTTPS, with a profile pool.

ES2+ functions, POST JSON to ``/gsma/rsp2/es2plus/<function>``:

- ``downloadOrder`` ``{eid?, iccid?, profileType?}`` → ``{iccid}``
- ``confirmOrder``  ``{iccid, releaseFlag, eid?, matchingId?, confirmationCode?, smdsAddress?}``
  → ``{matchingId, smdpAddress, eid?}``
- ``cancelOrder``   ``{iccid, finalProfileStatusIndicator: "Available"|"Unavailable", eid?, matchingId?}``
- ``releaseProfile`` ``{iccid}``

Requests carry ``X-Admin-Protocol: gsma/rsp/v2.x.y`` (without it: HTTP 400 and a
``Failed`` 1.1/2.2 envelope) and a body ``{"header": {"functionRequesterIdentifier",
"functionCallIdentifier"}, ...}``. Answers are HTTP 200 with ``X-Admin-Protocol``
and ``{"header": {"functionExecutionStatus": {"status", "statusCodeData"?}}, ...}``;
``status`` is ``Executed-Success`` or ``Failed`` with ``statusCodeData
{subjectCode, reasonCode, subjectIdentifier?, message}``.

Profile states (as pySim's SM-DP+): ``available`` → downloadOrder → ``allocated``
(no EID) or ``linked`` (EID) → confirmOrder → ``confirmed`` (releaseFlag false) or
``released`` (true); releaseProfile: confirmed → released; cancelOrder: any ordered
state → ``available`` (associations cleared) or ``unavailable``. ``downloaded`` and
``installed`` (a device took the profile) are set through the admin route only.
The first requester to order a profile owns it until it is cancelled.

Status codes (subjectCode/reasonCode):

- 8.2.1/3.9 unknown ICCID (a malformed ICCID is unknown too); 8.2.1/3.3 downloadOrder of a
  profile that is not available, or cancelOrder after download; 8.2.1/3.5 invalid state
  transition; 8.2.1/1.2 profile ordered by another requester; 8.2.5/3.9 unknown profileType;
  8.2.5/3.7 no available profile of that type; 8.2.5/3.10 profileType does not match the
  given ICCID; 8.1.1/3.10 a different EID is linked; 8.1.1/2.1 malformed EID; 8.1.1/2.2
  smdsAddress without an EID; 8.2.6/3.3 matchingId used by another profile; 8.2.6/3.10
  cancelOrder with a different matchingId; 2.1/2.2 neither iccid nor profileType (pySim's choice).
- Our choices (the spec's request-format codes were not consulted): 1.1/2.2 a mandatory
  element (header field, iccid, releaseFlag, ...) missing; 1.1/2.1 an element malformed
  (including a body that is not a JSON object).
- A **repeated** confirmOrder (profile already confirmed/released, whatever the matchingId)
  answers 8.2.1/3.5. pySim returns the original matchingId when it matches; real SM-DP+
  vary, and our client must cope with the stricter answer, so the simulator gives that one.
  A repeated releaseProfile answers 8.2.1/3.5 too (pySim: success).

Faults (``injector``, operation = the function name, see ``common.py``): an injected
error with ``error_status`` 200 answers status ``Expired`` (statusCodeData 8.9/5.1
"Inaccessible"), which clients classify as transient; 429 (with ``Retry-After: 1``) and
5xx answer a plain-text body, as a gateway would. Nothing is applied on an injected error.

Admin routes (JSON, never faulted):

- ``POST /__admin/profiles`` ``{"iccids": [...], "profile_type": "default"}`` or
  ``{"count": N, "profile_type": "default"}`` (generates valid ICCIDs: 19 digits, ``89``,
  Luhn) → ``{"iccids": [...canonical...], "added": n, "skipped": [already in the pool]}``;
  400 ``{"error", "invalid": [{"iccid", "reason"}]}`` when an ICCID is malformed (none added).
- ``GET /__admin/profiles?state=&profile_type=`` → ``{"profiles": [{"iccid", "profile_type",
  "state", "eid", "matching_id", "owner", "updated_at"}]}`` in pool order.
- ``GET /__admin/profiles/summary`` → ``{"available": n, "allocated": n, ..., "total": n}``.
- ``GET /__admin/profiles/{iccid}`` → one profile (404 ``{"error"}`` when unknown).
- ``POST /__admin/profiles/{iccid}`` ``{"state": "installed"}`` → the profile; sets any state
  (simulates the device side; ``available`` also clears EID, matchingId and owner).
- ``DELETE /__admin/profiles`` → ``{"deleted": n}`` (empties the pool).
- ``GET /__admin/requests?function=`` → ``{"requests": [{"function", "requester", "call_id",
  "iccid", "status", "subject_code", "reason_code"}]}``: the last function calls that reached
  the pool (not those failed by an injected fault), oldest first.
- ``/__admin/faults`` and ``/__admin/calls`` from :class:`FaultInjector`.

Notifications (ES2+ handleDownloadProgressInfo, SM-DP+ → operator): once configured, every
profile released (confirmOrder with releaseFlag true, or releaseProfile) is followed, after
``delay_ms``, by what the device does: ``installed`` (point 3 BPP download, then point 4 BPP
installation, both Executed-Success; the profile becomes downloaded, then installed),
``download_failed`` (point 3 Failed 8.2.6/3.8 "download failed on the device"; the profile stays
released) or ``never`` (nothing: the profile is never downloaded). Each is POSTed over HTTPS with
``X-Admin-Protocol``, the header's functionRequesterIdentifier (``requester``) and, when given,
a client certificate (mutual TLS); anything but 204 is sent again (at least once: up to
``attempts`` tries, backing off from 0.2 s).

- ``POST /__admin/notify`` ``{"url", "outcome"?: "installed"|"download_failed"|"never",
  "delay_ms"?, "requester"?, "ca_file"?, "cert_file"?, "key_file"?, "attempts"?}`` → the setting;
  ``{"url": null}`` turns notifications off. ``GET /__admin/notify`` → the setting and
  ``"sent": [{"iccid", "point", "status", "timestamp", "http_status", "attempts"}]``.
- ``POST /__admin/notify/send`` ``{"iccid", "point", "status"? ("Executed-Success"),
  "timestamp"? (now), "reason"?}`` → ``{"http_status", "attempts"}``: one notification now (the
  tests' duplicates, out-of-order arrivals and bursts).
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from provisioning.core.errors import PicklableError
from provisioning.core.iccid import make_iccid, normalize_iccid
from provisioning.sandbox.common import ADMIN_PREFIX, FaultInjector, new_app

API_PREFIX = "/gsma/rsp2/es2plus"
FUNCTIONS = ("downloadOrder", "confirmOrder", "cancelOrder", "releaseProfile")
DEFAULT_PROTOCOL = "gsma/rsp/v2.5.0"
PROTOCOL_RE = re.compile(r"^gsma/rsp/v2\.\d+\.\d+$")
EID_RE = re.compile(r"^\d{32}$")

STATES = (
    "available",
    "allocated",
    "linked",
    "confirmed",
    "released",
    "downloaded",
    "installed",
    "unavailable",
)
ORDERED = frozenset({"allocated", "linked", "confirmed", "released"})
FINAL_STATUSES = {"Available": "available", "Unavailable": "unavailable"}
# Generated ICCIDs: 89 (telecom), 882 (international), 99 (test issuer), 11-digit serial, check digit.
GENERATED_PREFIX = "8988299"
RETRY_AFTER_S = 1
# Function calls kept for GET /__admin/requests.
REQUEST_LOG_SIZE = 1000
# Notifications: what the device does after a release, the requester id the simulator sends, the log.
NOTIFY_OUTCOMES = ("installed", "download_failed", "never")
DEFAULT_NOTIFY_REQUESTER = "smdp-sandbox"
NOTIFY_LOG_SIZE = 10_000
NOTIFY_ATTEMPTS = 5
NOTIFY_BACKOFF_S = 0.2
NOTIFY_TIMEOUT_S = 10.0
POINT_DOWNLOAD, POINT_INSTALLATION = 3, 4


@dataclass
class NotifySettings:
    url: str | None = None
    outcome: str = "installed"
    delay_ms: int = 0
    requester: str = DEFAULT_NOTIFY_REQUESTER
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    attempts: int = NOTIFY_ATTEMPTS


class FunctionFailed(PicklableError):
    """A ``Failed`` answer, raised inside a function's handler."""

    def __init__(self, subject: str, reason: str, message: str, subject_id: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject
        self.reason = reason
        self.message = message
        self.subject_id = subject_id

    def status_code_data(self) -> dict[str, str]:
        data = {"subjectCode": self.subject, "reasonCode": self.reason, "message": self.message}
        if self.subject_id:
            data["subjectIdentifier"] = self.subject_id
        return data


@dataclass
class Profile:
    iccid: str
    profile_type: str
    state: str = "available"
    eid: str | None = None
    matching_id: str | None = None
    owner: str | None = None
    updated_at: float = 0.0

    def reset(self, state: str) -> None:
        self.state = state
        self.eid = None
        self.matching_id = None
        self.owner = None


class SmdpSimulator:
    """An SM-DP+ with an in-memory profile pool; state lives on the server loop."""

    def __init__(self, *, seed: int | None = None, address: str = "smdp.sandbox.local") -> None:
        self.address = address
        self.injector = FaultInjector(seed=seed)
        self.profiles: dict[str, Profile] = {}
        # matchingId -> ICCID of the profile that took it; may be stale (checked on use), never missing.
        self._matching_ids: dict[str, str] = {}
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self._rng = random.Random(seed)
        self.requester_id = DEFAULT_NOTIFY_REQUESTER
        self.notify = NotifySettings()
        self.notified: collections.deque[dict[str, Any]] = collections.deque(maxlen=NOTIFY_LOG_SIZE)
        self._notify_session: Any = None
        self._calls = 0
        self._pending: set[asyncio.Task[None]] = set()

    def env(self, base_url: str) -> dict[str, str]:
        """Settings that point our client at this simulator."""
        return {"SMDP_URL": base_url, "SMDP_ADDRESS": self.address}

    def build_app(self) -> web.Application:
        api = [web.post(f"{API_PREFIX}/{name}", self._handler(name)) for name in FUNCTIONS]
        admin = [
            web.post(f"{ADMIN_PREFIX}/profiles", self._admin_seed),
            web.get(f"{ADMIN_PREFIX}/profiles", self._admin_list),
            web.delete(f"{ADMIN_PREFIX}/profiles", self._admin_clear),
            web.get(f"{ADMIN_PREFIX}/profiles/summary", self._admin_summary),
            web.get(f"{ADMIN_PREFIX}/profiles/{{iccid}}", self._admin_get),
            web.post(f"{ADMIN_PREFIX}/profiles/{{iccid}}", self._admin_set_state),
            web.get(f"{ADMIN_PREFIX}/requests", self._admin_requests),
            web.post(f"{ADMIN_PREFIX}/notify", self._admin_set_notify),
            web.get(f"{ADMIN_PREFIX}/notify", self._admin_get_notify),
            web.post(f"{ADMIN_PREFIX}/notify/send", self._admin_send_notification),
        ]
        return new_app(api, admin, self.injector.admin_routes())

    # -- pool ------------------------------------------------------------------------------------

    def add_profiles(self, iccids: list[str], profile_type: str) -> tuple[list[str], list[str]]:
        """Add canonical ICCIDs to the pool; returns (added, already present)."""
        added, skipped = [], []
        for iccid in iccids:
            if iccid in self.profiles:
                skipped.append(iccid)
                continue
            self.profiles[iccid] = Profile(iccid=iccid, profile_type=profile_type, updated_at=time.time())
            added.append(iccid)
        return added, skipped

    def generate_iccids(self, count: int) -> list[str]:
        result: list[str] = []
        while len(result) < count:
            iccid = make_iccid(f"{GENERATED_PREFIX}{self._rng.randrange(10**11):011d}")
            if iccid not in self.profiles and iccid not in result:
                result.append(iccid)
        return result

    def _profile(self, iccid: object) -> Profile:
        if not isinstance(iccid, str):
            raise FunctionFailed("1.1", "2.1", "iccid must be a string")
        try:
            key = normalize_iccid(iccid)
        except ValueError:
            key = None
        profile = self.profiles.get(key) if key else None
        if profile is None:
            raise FunctionFailed("8.2.1", "3.9", "Profile ICCID unknown", iccid)
        return profile

    @staticmethod
    def _check_owner(profile: Profile, requester: str) -> None:
        if profile.owner is not None and profile.owner != requester:
            raise FunctionFailed(
                "8.2.1", "1.2", "Not authorized: the profile was ordered by another operator", profile.iccid
            )

    @staticmethod
    def _touch(profile: Profile, state: str) -> None:
        profile.state = state
        profile.updated_at = time.time()

    # -- ES2+ functions --------------------------------------------------------------------------

    def download_order(self, requester: str, body: dict[str, Any]) -> dict[str, Any]:
        iccid, eid, profile_type = body.get("iccid"), body.get("eid"), body.get("profileType")
        if iccid is None and profile_type is None:
            raise FunctionFailed("2.1", "2.2", "iccid or profileType is required")
        eid = _optional_eid(eid)
        if profile_type is not None and not isinstance(profile_type, str):
            raise FunctionFailed("1.1", "2.1", "profileType must be a string")
        if iccid is not None:
            profile = self._profile(iccid)
            if profile_type is not None and profile_type != profile.profile_type:
                raise FunctionFailed("8.2.5", "3.10", "profileType does not match the profile", profile.iccid)
            if profile.state != "available":
                raise FunctionFailed("8.2.1", "3.3", "ICCID already in use", profile.iccid)
        else:
            typed = [p for p in self.profiles.values() if p.profile_type == profile_type]
            if not typed:
                raise FunctionFailed("8.2.5", "3.9", "Unknown profileType", str(profile_type))
            free = next((p for p in typed if p.state == "available"), None)
            if free is None:
                raise FunctionFailed(
                    "8.2.5", "3.7", "Profile type unavailable: no available profile", str(profile_type)
                )
            profile = free
        profile.eid = eid
        profile.owner = requester
        self._touch(profile, "linked" if eid else "allocated")
        return {"iccid": profile.iccid}

    def confirm_order(self, requester: str, body: dict[str, Any]) -> dict[str, Any]:
        _require(body, "iccid", "releaseFlag")
        release = body["releaseFlag"]
        if not isinstance(release, bool):
            raise FunctionFailed("1.1", "2.1", "releaseFlag must be a boolean")
        profile = self._profile(body["iccid"])
        self._check_owner(profile, requester)
        if profile.state not in ("allocated", "linked"):
            raise FunctionFailed(
                "8.2.1", "3.5", f"Invalid state transition from {profile.state}", profile.iccid
            )
        eid = _optional_eid(body.get("eid"))
        if eid and profile.eid and eid != profile.eid:
            raise FunctionFailed("8.1.1", "3.10", "A different EID is associated with this profile", eid)
        if body.get("smdsAddress") and not (eid or profile.eid):
            raise FunctionFailed("8.1.1", "2.2", "EID required with smdsAddress")
        matching_id = body.get("matchingId")
        if matching_id is not None and (not isinstance(matching_id, str) or not matching_id):
            raise FunctionFailed("8.2.6", "2.1", "matchingId must be a non-empty string")
        if matching_id:
            other = self._holder_of(matching_id)
            if other is not None and other is not profile:
                raise FunctionFailed("8.2.6", "3.3", "matchingId already in use", matching_id)
        else:
            matching_id = self._new_matching_id()
        profile.eid = eid or profile.eid
        profile.matching_id = matching_id
        self._matching_ids[matching_id] = profile.iccid
        self._touch(profile, "released" if release else "confirmed")
        if release:
            self._after_release(profile)
        answer: dict[str, Any] = {"matchingId": matching_id, "smdpAddress": self.address}
        if profile.eid:
            answer["eid"] = profile.eid
        return answer

    def cancel_order(self, requester: str, body: dict[str, Any]) -> dict[str, Any]:
        _require(body, "iccid", "finalProfileStatusIndicator")
        final = FINAL_STATUSES.get(body["finalProfileStatusIndicator"])
        if final is None:
            raise FunctionFailed("1.1", "2.1", "finalProfileStatusIndicator must be Available or Unavailable")
        profile = self._profile(body["iccid"])
        self._check_owner(profile, requester)
        if profile.state in ("downloaded", "installed"):
            raise FunctionFailed(
                "8.2.1", "3.3", "ICCID already in use: the profile was downloaded", profile.iccid
            )
        if profile.state not in ORDERED:
            raise FunctionFailed(
                "8.2.1", "3.5", "Invalid state transition: the profile is not ordered", profile.iccid
            )
        eid = _optional_eid(body.get("eid"))
        if eid and profile.eid and eid != profile.eid:
            raise FunctionFailed("8.1.1", "3.10", "A different EID is associated with this profile", eid)
        matching_id = body.get("matchingId")
        if matching_id and profile.matching_id and matching_id != profile.matching_id:
            raise FunctionFailed("8.2.6", "3.10", "A different matchingId is associated with this profile")
        profile.reset(final)
        profile.updated_at = time.time()
        return {}

    def release_profile(self, requester: str, body: dict[str, Any]) -> dict[str, Any]:
        _require(body, "iccid")
        profile = self._profile(body["iccid"])
        self._check_owner(profile, requester)
        if profile.state != "confirmed":
            raise FunctionFailed(
                "8.2.1", "3.5", f"Invalid state transition from {profile.state}", profile.iccid
            )
        self._touch(profile, "released")
        self._after_release(profile)
        return {}

    # -- notifications (handleDownloadProgressInfo, SM-DP+ -> operator) ---------------------------

    def _after_release(self, profile: Profile) -> None:
        """What the device does with a released profile, told to the operator after the delay."""
        settings = self.notify
        if settings.url is None or settings.outcome == "never":
            return
        iccid, outcome = profile.iccid, settings.outcome
        task = asyncio.get_running_loop().create_task(self._device(iccid, outcome, settings.delay_ms / 1000))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _device(self, iccid: str, outcome: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        profile = self.profiles.get(iccid)
        if profile is None or profile.state != "released":
            return  # cancelled meanwhile: no device will download it
        if outcome == "download_failed":
            await self.send_notification(
                iccid, POINT_DOWNLOAD, "Failed", reason=("8.2.6", "3.8", "download failed on the device")
            )
            return
        self._touch(profile, "downloaded")
        await self.send_notification(iccid, POINT_DOWNLOAD, "Executed-Success")
        self._touch(profile, "installed")
        await self.send_notification(iccid, POINT_INSTALLATION, "Executed-Success", offset_ms=1)

    def _session(self) -> Any:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector

        if self._notify_session is None or self._notify_session.closed:
            settings = self.notify
            context = ssl.create_default_context(cafile=settings.ca_file)
            if settings.cert_file:
                context.load_cert_chain(settings.cert_file, settings.key_file)
            self._notify_session = ClientSession(
                connector=TCPConnector(ssl=context, limit=20), timeout=ClientTimeout(total=NOTIFY_TIMEOUT_S)
            )
        return self._notify_session

    async def send_notification(
        self,
        iccid: str,
        point: int,
        status: str,
        *,
        timestamp: str | None = None,
        reason: tuple[str, str, str] | None = None,
        offset_ms: int = 0,
    ) -> dict[str, Any]:
        """POST one handleDownloadProgressInfo to the operator, again until it answers 204."""
        settings = self.notify
        if settings.url is None:
            raise ValueError("notifications are not configured: POST /__admin/notify first")
        moment = time.time() + offset_ms / 1000
        stamp = timestamp or datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        point_status: dict[str, Any] = {"status": status}
        if reason is not None:
            point_status["statusCodeData"] = {
                "subjectCode": reason[0],
                "reasonCode": reason[1],
                "message": reason[2],
            }
        self._calls += 1
        body = {
            "header": {
                "functionRequesterIdentifier": settings.requester,
                "functionCallIdentifier": f"FCI-{int(moment)}-{self._calls}",
            },
            "iccid": iccid,
            "profileType": self.profiles[iccid].profile_type if iccid in self.profiles else "default",
            "timestamp": stamp,
            "notificationPointId": point,
            "notificationPointStatus": point_status,
        }
        record: dict[str, Any] = {
            "iccid": iccid,
            "point": point,
            "status": status,
            "timestamp": stamp,
            "http_status": None,
            "attempts": 0,
        }
        self.notified.append(record)
        for attempt in range(settings.attempts):
            record["attempts"] = attempt + 1
            try:
                async with self._session().post(
                    settings.url, json=body, headers={"X-Admin-Protocol": DEFAULT_PROTOCOL}
                ) as response:
                    await response.read()
                    record["http_status"] = response.status
                    if response.status == 204:
                        break
            except Exception as exc:
                record["http_status"] = None
                record["error"] = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(NOTIFY_BACKOFF_S * 2**attempt)
        return record

    async def _admin_set_notify(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return _admin_error("the body must be JSON")
        if not isinstance(data, dict):
            return _admin_error("the body must be a JSON object")
        outcome = data.get("outcome", "installed")
        if outcome not in NOTIFY_OUTCOMES:
            return _admin_error(f"outcome must be one of {list(NOTIFY_OUTCOMES)}")
        known = {f for f in NotifySettings.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            return _admin_error(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if self._notify_session is not None:
            await self._notify_session.close()
            self._notify_session = None
        self.notify = NotifySettings(**{**asdict(NotifySettings()), **data})
        return web.json_response(asdict(self.notify))

    async def _admin_get_notify(self, _: web.Request) -> web.Response:
        return web.json_response({**asdict(self.notify), "sent": list(self.notified)})

    async def _admin_send_notification(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return _admin_error("the body must be JSON")
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("iccid"), str)
            or not isinstance(data.get("point"), int)
        ):
            return _admin_error('give {"iccid": "...", "point": N}')
        reason = data.get("reason")
        try:
            record = await self.send_notification(
                data["iccid"],
                data["point"],
                str(data.get("status", "Executed-Success")),
                timestamp=data.get("timestamp"),
                reason=tuple(reason) if isinstance(reason, list) and len(reason) == 3 else None,
            )
        except ValueError as exc:
            return _admin_error(str(exc))
        return web.json_response(record)

    def _holder_of(self, matching_id: str) -> Profile | None:
        """The profile carrying ``matching_id`` now (a dict lookup: a scan of the pool made confirmOrder O(n))."""
        profile = self.profiles.get(self._matching_ids.get(matching_id, ""))
        return profile if profile is not None and profile.matching_id == matching_id else None

    def _new_matching_id(self) -> str:
        while True:
            candidate = f"MID-{self._rng.getrandbits(48):012X}"
            if self._holder_of(candidate) is None:
                return candidate

    # -- HTTP ------------------------------------------------------------------------------------

    def _handler(self, function: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        injector = self.injector
        method = {
            "downloadOrder": self.download_order,
            "confirmOrder": self.confirm_order,
            "cancelOrder": self.cancel_order,
            "releaseProfile": self.release_profile,
        }[function]

        async def handle(request: web.Request) -> web.StreamResponse:
            protocol = request.headers.get("X-Admin-Protocol", "")

            async def action() -> web.StreamResponse:
                if not PROTOCOL_RE.match(protocol):
                    failure = FunctionFailed(
                        "1.1", "2.2", "X-Admin-Protocol header gsma/rsp/v2.x.y is required"
                    )
                    return _envelope(DEFAULT_PROTOCOL, {}, failure, http_status=400)
                try:
                    body = await request.json()
                except ValueError:
                    body = None
                record: dict[str, Any] = {
                    "function": function,
                    "requester": None,
                    "call_id": None,
                    "iccid": None,
                }
                self.requests.append(record)
                try:
                    if not isinstance(body, dict):
                        raise FunctionFailed("1.1", "2.1", "the body must be a JSON object")
                    header = body.get("header")
                    if isinstance(header, dict):
                        record["requester"] = header.get("functionRequesterIdentifier")
                        record["call_id"] = header.get("functionCallIdentifier")
                    record["iccid"] = body.get("iccid")
                    requester = _requester(body)
                    # No await from here on: check and change of the pool are one step on the loop.
                    answer = method(requester, body)
                except FunctionFailed as failure:
                    record.update(status="Failed", subject_code=failure.subject, reason_code=failure.reason)
                    return _envelope(protocol, {}, failure)
                record.update(status="Executed-Success", subject_code=None, reason_code=None)
                record["iccid"] = answer.get("iccid", record["iccid"])
                return _envelope(protocol, answer)

            def error_response(status: int) -> web.StreamResponse:
                if status == 200:
                    return web.json_response(
                        {
                            "header": {
                                "functionExecutionStatus": {
                                    "status": "Expired",
                                    "statusCodeData": {
                                        "subjectCode": "8.9",
                                        "reasonCode": "5.1",
                                        "message": "Inaccessible: try again later",
                                    },
                                }
                            }
                        },
                        headers={
                            "X-Admin-Protocol": protocol if PROTOCOL_RE.match(protocol) else DEFAULT_PROTOCOL
                        },
                    )
                headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
                return web.Response(status=status, text=f"{status} {_reason(status)}\n", headers=headers)

            return await injector.run(request, function, action, error_response)

        return handle

    async def _admin_seed(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return _admin_error("the body must be JSON")
        if not isinstance(data, dict):
            return _admin_error("the body must be a JSON object")
        profile_type = data.get("profile_type", "default")
        if not isinstance(profile_type, str) or not profile_type:
            return _admin_error("profile_type must be a non-empty string")
        if "iccids" in data:
            given = data["iccids"]
            if not isinstance(given, list):
                return _admin_error("iccids must be a list")
            iccids, invalid = [], []
            for value in given:
                try:
                    iccids.append(normalize_iccid(str(value)))
                except ValueError as exc:
                    invalid.append({"iccid": str(value), "reason": str(exc)})
            if invalid:
                return web.json_response(
                    {"error": "malformed ICCIDs; none added", "invalid": invalid}, status=400
                )
        elif "count" in data:
            count = data["count"]
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 100_000:
                return _admin_error("count must be an integer between 0 and 100000")
            iccids = self.generate_iccids(count)
        else:
            return _admin_error('give "iccids": [...] or "count": N')
        added, skipped = self.add_profiles(iccids, profile_type)
        return web.json_response({"iccids": iccids, "added": len(added), "skipped": skipped})

    async def _admin_list(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in STATES:
            return _admin_error(f"unknown state {state!r}; known: {list(STATES)}")
        profile_type = request.query.get("profile_type")
        profiles = [
            asdict(p)
            for p in self.profiles.values()
            if (state is None or p.state == state)
            and (profile_type is None or p.profile_type == profile_type)
        ]
        return web.json_response({"profiles": profiles})

    async def _admin_summary(self, _: web.Request) -> web.Response:
        counts: collections.Counter[str] = collections.Counter(p.state for p in self.profiles.values())
        return web.json_response({**{s: counts.get(s, 0) for s in STATES}, "total": len(self.profiles)})

    async def _admin_get(self, request: web.Request) -> web.Response:
        profile = self._admin_lookup(request.match_info["iccid"])
        if profile is None:
            return web.json_response({"error": "unknown ICCID"}, status=404)
        return web.json_response(asdict(profile))

    async def _admin_set_state(self, request: web.Request) -> web.Response:
        profile = self._admin_lookup(request.match_info["iccid"])
        if profile is None:
            return web.json_response({"error": "unknown ICCID"}, status=404)
        try:
            data = await request.json()
        except ValueError:
            return _admin_error("the body must be JSON")
        state = data.get("state") if isinstance(data, dict) else None
        if state not in STATES:
            return _admin_error(f"state must be one of {list(STATES)}")
        if state == "available":
            profile.reset("available")
        self._touch(profile, state)
        return web.json_response(asdict(profile))

    async def _admin_requests(self, request: web.Request) -> web.Response:
        function = request.query.get("function")
        selected = [r for r in self.requests if function is None or r["function"] == function]
        return web.json_response({"requests": selected})

    async def _admin_clear(self, _: web.Request) -> web.Response:
        deleted = len(self.profiles)
        self.profiles.clear()
        return web.json_response({"deleted": deleted})

    def _admin_lookup(self, iccid: str) -> Profile | None:
        try:
            return self.profiles.get(normalize_iccid(iccid))
        except ValueError:
            return None


def _envelope(
    protocol: str, answer: dict[str, Any], failure: FunctionFailed | None = None, *, http_status: int = 200
) -> web.Response:
    execution: dict[str, Any] = {"status": "Executed-Success"}
    if failure is not None:
        execution = {"status": "Failed", "statusCodeData": failure.status_code_data()}
    body = {"header": {"functionExecutionStatus": execution}, **answer}
    return web.json_response(body, status=http_status, headers={"X-Admin-Protocol": protocol})


def _requester(body: dict[str, Any]) -> str:
    header = body.get("header")
    if not isinstance(header, dict):
        raise FunctionFailed("1.1", "2.2", "header is required")
    for key in ("functionRequesterIdentifier", "functionCallIdentifier"):
        if key not in header:
            raise FunctionFailed("1.1", "2.2", f"header.{key} is required")
        if not isinstance(header[key], str) or not header[key]:
            raise FunctionFailed("1.1", "2.1", f"header.{key} must be a non-empty string")
    return str(header["functionRequesterIdentifier"])


def _require(body: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if body.get(key) is None:
            raise FunctionFailed("1.1", "2.2", f"{key} is required")


def _optional_eid(eid: object) -> str | None:
    if eid is None:
        return None
    if not isinstance(eid, str) or not EID_RE.match(eid):
        raise FunctionFailed("8.1.1", "2.1", "EID must be 32 decimal digits")
    return eid


def _admin_error(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def _reason(status: int) -> str:
    return {
        429: "Too Many Requests",
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }.get(status, "Error")
