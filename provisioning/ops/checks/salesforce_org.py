"""``provisioning salesforce check``: the live org against what the service needs, one line per item.

With the service's own settings and credentials: the JWT login; every field the service reads or
writes (its Order query's columns and its PATCHes' keys, :meth:`SalesforceClient.fields_used`, in
the org's names from the ``SF_FIELD_*`` settings) exists, has a type compatible with what
``salesforce/`` declares for it, and the integration user may read it and edit what it writes
(describe answers only the fields the user may read, ``updateable`` the ones it may edit); the
Platform Event of ``SF_PROVISION_EVENT_CHANNEL`` exists with its fields and the user may subscribe
to it (Pub/Sub GetTopic's ``can_subscribe``; on CometD a subscription is made and dropped); the
project's flows are active (Tooling API); the daily API budget left. Every problem is a line of its
own with its remedy, and nothing stops at the first one: a misspelled channel or field is named
here, not found by the listener or a worker at run time.

:func:`org_lines` gives the lines; ``provisioning check`` shows them after its own login and event
lines (``login=False, subscribe=False``: each problem said once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from simple_salesforce.format import format_soql

from provisioning.core.http import make_session
from provisioning.core.settings import DEFAULT_ORDER_FIELD_NAMES, Settings
from provisioning.ops.checks.results import CheckResult
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import FieldUse, SalesforceClient
from provisioning.salesforce.errors import (
    SalesforceError,
    SalesforceEventNotFound,
    SalesforceEventPermissionError,
    event_not_found_remedy,
    event_permission_remedy,
)
from provisioning.salesforce.metadata import FieldDecl, MetadataError, Project, project

# How long the CometD probe waits for its subscription to be answered.
SUBSCRIBE_TIMEOUT_S = 30.0
# Below this share of the daily API requests left, the budget line is a WARN.
LOW_BUDGET_SHARE = 0.10
# A Text field the service only reads may hold a number instead (42.0 reads as "42").
_NUMBER_TYPES = frozenset({"double", "int", "long"})
_TEXT_TYPES = frozenset({"string", "textarea"})
SOURCE_HINT = "salesforce/force-app/main/default"


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "OK", detail)


def _fail(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "FAIL", detail)


def _text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    remedy = getattr(exc, "remedy", None)
    return f"{type(exc).__name__}: {text}" + (f"; fix: {remedy}" if remedy and remedy not in text else "")


class OrgCheck:
    """The items of one check run against one org."""

    def __init__(self, settings: Settings, *, metadata: Project | None = None) -> None:
        self.settings = settings
        self.metadata = metadata or project()
        session = make_session(settings.tls_ca_bundle)
        self.auth = JWTBearerAuth.from_settings(settings, session)
        self.client = SalesforceClient.from_settings(settings, auth=self.auth)
        self.permission_set = self.metadata.permission_set.name
        self.channel = settings.sf_provision_event_channel
        self.event = self.channel.removeprefix("/event/")

    # -- the items ----------------------------------------------------------------------------

    def login(self) -> CheckResult:
        token = self.auth.token()
        return _ok("login", f"JWT login OK as {self.settings.sf_username}; instance {token.instance_url}")

    def fields(self) -> list[CheckResult]:
        uses = self.client.fields_used()
        results: list[CheckResult] = []
        for sobject in dict.fromkeys(u.sobject for u in uses):
            mine = [u for u in uses if u.sobject == sobject]
            try:
                described = self.client.describe(sobject)
            except SalesforceError as exc:
                results.append(self._object_failure(sobject, [u.name for u in mine], exc))
                continue
            found = {str(f.get("name")): f for f in described.get("fields") or []}
            results += [self._field(use, found.get(use.name)) for use in mine]
        return results

    def event_fields(self) -> list[CheckResult]:
        declared = self._declared_event_fields()
        try:
            described = self.client.describe(self.event)
        except SalesforceError as exc:
            return [self._object_failure(self.event, list(declared), exc, event=True)]
        found = {str(f.get("name")): f for f in described.get("fields") or []}
        results = []
        for name, decl in declared.items():
            use = FieldUse(self.event, name, None, reads=True, writes=False)
            results.append(self._field(use, found.get(name), decl))
        return results

    def subscription(self) -> CheckResult:
        name = f"event {self.channel}"
        try:
            detail = self._pubsub() if self.settings.sf_events_transport == "pubsub" else self._cometd()
        except SalesforceEventNotFound as exc:
            return _fail(name, f"{_text(exc)} (SF_PROVISION_EVENT_CHANNEL={self.channel})")
        except SalesforceEventPermissionError as exc:
            return _fail(name, _text(exc))
        except (SalesforceError, TimeoutError) as exc:
            return _fail(name, _text(exc))
        return _ok(name, detail)

    def flows(self) -> list[CheckResult]:
        names = sorted(self.metadata.flows)
        soql = format_soql(
            "SELECT DeveloperName, ActiveVersionId, LatestVersionId FROM FlowDefinition WHERE DeveloperName IN {}",
            names,
        )
        try:
            records = self.client.tooling_query(soql)
        except SalesforceError as exc:
            return [
                _fail(
                    f"flow {n}",
                    f"its state could not be read with the Tooling API ({_text(exc)}); the check needs the "
                    "Tooling API (on a real org the user may need 'View Setup and Configuration'), or check "
                    f"by hand in Setup, Flows that {n} is active",
                )
                for n in names
            ]
        by_name = {str(r.get("DeveloperName")): r for r in records}
        results = []
        for n in names:
            record = by_name.get(n)
            where = f"{SOURCE_HINT}/flows/{n}.flow-meta.xml"
            if record is None:
                results.append(
                    _fail(f"flow {n}", f"not in the org: deploy {where} (docs/salesforce-setup.md, step 3)")
                )
            elif not record.get("ActiveVersionId"):
                results.append(
                    _fail(
                        f"flow {n}",
                        f"deployed but inactive, so approvals start nothing: activate it (Setup, Flows, {n}, "
                        f"Activate) or deploy {where} again (its status is Active)",
                    )
                )
            else:
                latest = record.get("ActiveVersionId") == record.get("LatestVersionId")
                results.append(
                    _ok(
                        f"flow {n}",
                        "active"
                        + ("" if latest else " (an older version: the latest is not the active one)"),
                    )
                )
        return results

    def budget(self) -> CheckResult:
        try:
            daily = self.client.limits().get("DailyApiRequests") or {}
            maximum, remaining = int(daily["Max"]), int(daily["Remaining"])
        except (SalesforceError, KeyError, TypeError, ValueError) as exc:
            return _fail("api budget", f"the org's limits could not be read: {_text(exc)}")
        usage = self.client.api_usage()
        header = f" (Sforce-Limit-Info: api-usage={usage[0]}/{usage[1]})" if usage else ""
        detail = f"{remaining:,} of {maximum:,} daily API requests left{header}"
        if remaining <= 0:
            return _fail(
                "api budget",
                f"{detail}: every call is refused with REQUEST_LIMIT_EXCEEDED until the 24-hour window moves "
                "on; raise the org's allocation or lower what else uses it",
            )
        if remaining < maximum * LOW_BUDGET_SHARE:
            return CheckResult("api budget", "WARN", f"{detail}: less than {LOW_BUDGET_SHARE:.0%} left")
        return _ok("api budget", detail)

    # -- one field ----------------------------------------------------------------------------

    def _declared_event_fields(self) -> dict[str, FieldDecl]:
        """The fields the listener reads: those salesforce/ declares for its event (whatever the channel)."""
        events = self.metadata.events()
        return dict(events[0].fields) if events else {}

    def _declaration(self, use: FieldUse) -> FieldDecl | None:
        """What salesforce/ declares for this field: under its default name (the org may use another)."""
        name = DEFAULT_ORDER_FIELD_NAMES[use.logical] if use.logical else use.name
        return self.metadata.field(use.sobject, name)

    def _field(
        self, use: FieldUse, found: Mapping[str, Any] | None, decl: FieldDecl | None = None
    ) -> CheckResult:
        name = f"field {use.sobject}.{use.name}"
        setting = f" ({use.setting})" if use.setting else ""
        decl = decl or self._declaration(use)
        if found is None:
            return _fail(name, self._missing(use, decl))
        problems = _type_problems(decl, found, writes=use.writes) if decl is not None else []
        if use.writes and not found.get("updateable"):
            problems.append(
                f"the integration user may not edit it, and the service writes it: grant Edit on "
                f"{use.sobject}.{use.name} in the permission set {self.permission_set}"
            )
        if problems:
            return _fail(name, f"{use.sobject}.{use.name}{setting}: " + "; ".join(problems))
        kind = decl.type_text() if decl is not None else str(found.get("type"))
        access = "read and written" if use.writes and use.reads else "written" if use.writes else "read"
        return _ok(name, f"{kind}{setting}, {access}")

    def _missing(self, use: FieldUse, decl: FieldDecl | None) -> str:
        where = f"{use.sobject}.{use.name}"
        fixes = []
        if decl is not None:
            fixes.append(f"deploy {SOURCE_HINT}/objects/{decl.sobject}/fields/{decl.name}.field-meta.xml")
        fixes.append(f"grant Read on {where} in the permission set {self.permission_set}")
        if use.setting:
            fixes.append(f"or set {use.setting} to the API name the org gives this field")
        return (
            f"{where} is not in the org, or the integration user may not read it (describe does not list "
            f"it): {', '.join(fixes)}"
        )

    def _object_failure(
        self, sobject: str, fields: Iterable[str], exc: SalesforceError, *, event: bool = False
    ) -> CheckResult:
        names = ", ".join(fields)
        if exc.error_code == "NOT_FOUND":
            fix = f"the org has no {sobject}, or the integration user may not read it: " + (
                event_not_found_remedy(self.channel) + f"; or {event_permission_remedy(self.channel)}"
                if event
                else f"grant Read on {sobject} in the permission set {self.permission_set}"
            )
            return _fail(f"object {sobject}", f"{fix} (its fields {names} were not checked)")
        return _fail(
            f"object {sobject}", f"describe failed: {_text(exc)} (its fields {names} were not checked)"
        )

    # -- the subscription, per transport ------------------------------------------------------

    def _pubsub(self) -> str:
        from provisioning.salesforce.pubsub import PubSubClient

        client = PubSubClient.from_settings(self.settings, auth=self.auth)
        try:
            info = client.topic_info()
        finally:
            client.close()
        if not info.can_subscribe:
            raise SalesforceEventPermissionError(
                f"Pub/Sub GetTopic says the integration user cannot subscribe to {info.topic_name} "
                "(can_subscribe is false)",
                remedy=event_permission_remedy(self.channel),
            )
        return f"exists; the integration user may subscribe (Pub/Sub GetTopic at {self.settings.sf_pubsub_endpoint})"

    def _cometd(self) -> str:
        from provisioning.core.replay_id import LATEST
        from provisioning.salesforce.streaming import StreamingClient

        stream = StreamingClient.from_settings(self.settings, auth=self.auth)
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                for _ in stream.batches(LATEST):
                    pass
            except BaseException as exc:  # reported by the caller
                failure.append(exc)

        thread = threading.Thread(target=consume, name="check-cometd", daemon=True)
        thread.start()
        try:
            _wait(lambda: stream.counters.subscribes > 0 or bool(failure), SUBSCRIBE_TIMEOUT_S)
        finally:
            stream.stop()
            thread.join(SUBSCRIBE_TIMEOUT_S)
        if failure:
            raise failure[0]
        if stream.counters.subscribes == 0:
            raise TimeoutError(f"CometD: no answer to the subscription within {SUBSCRIBE_TIMEOUT_S:.0f} s")
        return "exists; the integration user may subscribe (a CometD subscription was made and dropped)"


def _wait(predicate: Callable[[], bool], timeout_s: float) -> None:
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        pause.wait(0.05)


def _type_problems(decl: FieldDecl, found: Mapping[str, Any], *, writes: bool) -> list[str]:
    """What makes the org's field unfit for what salesforce/ declares (and the service does with it)."""
    kind = str(found.get("type"))
    expected = decl.describe_type
    declared = f"salesforce/ declares {decl.type_text()}"
    if expected == "string":
        if kind in _TEXT_TYPES:
            length = int(found.get("length") or 0)
            if writes and decl.length is not None and length < decl.length:
                return [
                    f"it is Text({length}), the service writes up to {decl.length} characters ({declared})"
                ]
            return []
        if kind in _NUMBER_TYPES and not writes:
            return []
        return [f"it is a {kind} field, {declared}"]
    if kind != expected:
        return [f"it is a {kind} field, {declared}"]
    if expected == "picklist":
        values = {str(v.get("value")) for v in found.get("picklistValues") or [] if v.get("active", True)}
        missing = [v for v in decl.picklist_values if v not in values]
        if missing:
            return [f"its picklist lacks {', '.join(missing)} ({declared}): add the values"]
    return []


def org_lines(settings: Settings, *, login: bool = True, subscribe: bool = True) -> list[CheckResult]:
    """Every item of the check, in order; a refused login is the one line (nothing else can be asked)."""
    try:
        check = OrgCheck(settings)
    except MetadataError as exc:
        # What the org must have is not known without salesforce/ (a package built without it).
        return [
            _fail("salesforce/ project", f"{exc}; reinstall the package from a checkout that has salesforce/")
        ]
    except SalesforceError as exc:  # the key file holds no usable key, say: no login is possible
        return [_fail("login", _text(exc)), CheckResult("org", "SKIP", "not checked: login failed (above)")]
    results: list[CheckResult] = []
    if login:
        try:
            results.append(check.login())
        except SalesforceError as exc:
            return [
                _fail("login", _text(exc)),
                CheckResult("org", "SKIP", "not checked: login failed (above)"),
            ]
    results += check.fields()
    results += check.event_fields()
    if subscribe:
        results.append(check.subscription())
    results += check.flows()
    results.append(check.budget())
    return results
