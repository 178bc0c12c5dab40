"""The console's Flask app: pages over the ledger, and the operators' actions with a dry run first.

Every page reads through the functions the CLI uses (:mod:`provisioning.ops.status`,
:mod:`provisioning.ops.actions`, the ledger, the inventory); nothing here decides
what a run is or what an action does. Every request but the login form needs a
user (401 otherwise); every form carries a CSRF token (Flask-WTF); requeue and
resend need the operator role and a dry run of the same items by the same user
first; every action is logged with the user.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from flask import Flask, Response, g, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.exceptions import HTTPException

from provisioning.core.errors import PicklableError
from provisioning.core.logs import get_logger
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import BEGIN, Provisioning, RunRecord, RunState
from provisioning.ops.actions import Outcome, requeue, resend_email
from provisioning.ops.console.auth import Principal, check_password, principal_from_proxy, trusted_proxies
from provisioning.ops.status import (
    RunFilter,
    describe_effects,
    describe_run,
    list_runs,
    order_status,
    parse_duration_s,
    started_by,
)
from provisioning.runs.chain import CHAIN
from provisioning.runs.services import Services
from provisioning.salesforce.ids import normalize_id

log = get_logger(__name__)

# A dry run's confirmation is valid this long; after it, run the dry run again.
DRY_RUN_VALID_S = 600
# Rows on the runs page.
RUNS_PAGE_ROWS = 200
QUARANTINE_PAGE_ROWS = 200
# The Order page reloads itself this often while a run of the Order is in flight.
ORDER_REFRESH_S = 3
# At most this many items in one requeue or resend.
MAX_ITEMS_PER_ACTION = 500

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])([A-Za-z0-9._%+-]*)@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Endpoints a request without a user may reach.
_OPEN_ENDPOINTS = frozenset({"login", "static"})


def mask_emails(text: object) -> str:
    """Every e-mail address in ``text`` reduced to its first character and its domain."""
    return _EMAIL.sub(lambda m: f"{m.group(1)}•••@{m.group(3)}", "" if text is None else str(text))


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@dataclass
class TimelineEntry:
    at: float | None
    what: str
    detail: str = ""
    kind: str = "info"  # info, step, error, end
    # Free text that may quote an address (errors, notes) is masked; ids (results) are shown as they are.
    free_text: bool = True


def timeline(run: RunRecord, provisioning: Provisioning) -> list[TimelineEntry]:
    """A run's life in the chain's order: created (by whom), each step (its last error, then when it was
    done, with the result ids and this run's attempts), a requeue (by whom, from which failure), the end."""
    entries = [TimelineEntry(run.created_at, f"created by {started_by(run)}")]
    for spec in CHAIN:
        rec = CHAIN.record(run, provisioning, spec)
        if rec.last_error:
            entries.append(TimelineEntry(None, f"{spec.name}: error", rec.last_error, "error"))
        if rec.done:
            ids = ", ".join(f"{k}={v}" for k, v in (rec.result or {}).items())
            attempts = (
                f"{rec.attempts} attempt{'s' if rec.attempts != 1 else ''} by this run"
                if rec.attempts
                else ""
            )
            detail = "; ".join(x for x in (ids, attempts) if x) or "done by an earlier run of the Order"
            entries.append(TimelineEntry(rec.at, f"{spec.name} done", detail, "step", free_text=False))
        elif rec.attempts:
            entries.append(
                TimelineEntry(None, f"{spec.name} not done yet", f"{rec.attempts} attempts", "step")
            )
    if run.state is RunState.FAILED:
        entries.append(
            TimelineEntry(run.updated_at, f"failed at {run.failed_step}", run.error or "", "error")
        )
    elif run.finished_at:
        entries.append(
            TimelineEntry(run.finished_at, run.state.value, describe_run(run, provisioning), "end")
        )
    requeued_at = run.markers.get("requeued_at")
    if requeued_at:
        by = run.markers.get("requeued_by") or "an operator"
        at = float(requeued_at)
        entry = TimelineEntry(at, f"requeued by {by}", run.markers.get("requeued_from", ""), "info")
        # Before the first thing this run did after the requeue.
        later = next((i for i, e in enumerate(entries) if e.at is not None and e.at > at), len(entries))
        entries.insert(later, entry)
    return entries


class Refused(PicklableError):
    """Bad input from the browser: the message says what was wrong; nothing was changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    publisher: Callable[[], Celery] | None = None,
    secret_key: bytes | None = None,
) -> Flask:
    """The console. ``publisher`` builds the Celery app that sends requeued runs (on first use)."""
    if not settings.console_users:
        raise ValueError(
            'CONSOLE_USERS has no user: add one, e.g. CONSOLE_USERS=\'{"alice": {"role": "operator", '
            '"password_hash": "<the output of provisioning console hash-password>"}}\''
        )
    services = services or Services(settings)
    app = Flask(__name__)
    key = secret_key or (
        settings.console_secret_key.get_secret_value().encode()
        if settings.console_secret_key
        else secrets.token_bytes(32)
    )
    app.config.update(
        SECRET_KEY=key,
        SESSION_COOKIE_NAME="provisioning_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.console_cookie_secure,
        PERMANENT_SESSION_LIFETIME=settings.console_session_ttl_s,
        # A form stays valid as long as the login: the session, not a clock, bounds it.
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=1_000_000,
    )
    csrf = CSRFProtect()
    confirmations = URLSafeTimedSerializer(key, salt="provisioning-console-dry-run")
    publisher_app: list[Celery] = []

    def celery_app() -> Celery:
        if not publisher_app:
            from provisioning.runs.publishing import make_publisher

            publisher_app.append(publisher() if publisher else make_publisher(settings))
        return publisher_app[0]

    app.jinja_env.filters.update(mask=mask_emails, when=when, age=age)
    app.jinja_env.globals.update(steps=[BEGIN, *CHAIN.names], states=[s.value for s in RunState])

    # -- who is asking ------------------------------------------------------------------------
    def current_user() -> Principal | None:
        header = settings.console_auth_proxy_header
        if header and request.headers.get(header) and request.remote_addr in trusted_proxies(settings):
            named = request.headers.get(header, "").strip()
            principal = principal_from_proxy(settings, request.remote_addr, named)
            if principal is None:
                raise Refused(f"The auth proxy names {named!r}, who is not in CONSOLE_USERS.", 403)
            return principal
        name = session.get("user")
        user = settings.console_users.get(name) if isinstance(name, str) else None
        if user is None or user.password_hash is None:
            return None
        return Principal(str(name), user.role, "password")

    @app.before_request
    def authenticate() -> Response | None:
        g.user = None
        try:
            g.user = current_user()
        except Refused as exc:
            log.warning("console_forbidden", remote=request.remote_addr, path=request.path, reason=str(exc))
            return _page("error.html", exc.status, message=str(exc))
        if g.user is None and request.endpoint not in _OPEN_ENDPOINTS:
            response = _page("login.html", 401, message="Log in to continue.", next=request.full_path)
            response.headers["WWW-Authenticate"] = 'Cookie realm="provisioning console", form-action="/login"'
            return response
        return None

    # After authenticate: a request without a user gets 401 before any CSRF check.
    csrf.init_app(app)

    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _page(template: str, status: int = 200, **context: Any) -> Response:
        return Response(render_template(template, user=g.get("user"), **context), status=status)

    def require_operator(what: str) -> None:
        user: Principal = g.user
        if not user.can_act:
            log.warning("console_forbidden", user=user.name, role=user.role, action=what)
            raise Refused(
                f"Your role ({user.role}) cannot {what}; ask an operator. Nothing was changed.", 403
            )

    @app.errorhandler(Refused)
    def refused(exc: Refused) -> Response:
        return _page("error.html", exc.status, message=str(exc))

    @app.errorhandler(CSRFError)
    def csrf_refused(exc: CSRFError) -> Response:
        user = g.get("user")
        log.warning(
            "console_csrf_refused",
            user=user.name if user else None,
            path=request.path,
            reason=exc.description,
        )
        message = (
            f"The form was refused: {exc.description} Nothing was changed. "
            "Reload the page and submit it again."
        )
        return _page("error.html", 400, message=message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _page("error.html", exc.code or 500, message=f"{exc.name}: {exc.description}")

    # -- logging in -----------------------------------------------------------------------------
    @app.route("/login", methods=["GET", "POST"])
    def login() -> Response:
        next_url = _safe_next(request.values.get("next"))
        if request.method == "GET":
            if g.user is not None:
                return redirect(next_url)  # type: ignore[return-value]
            return _page("login.html", next=next_url)
        name = request.form.get("username", "").strip()
        principal = check_password(settings.console_users, name, request.form.get("password", ""))
        if principal is None:
            log.warning("console_login_failed", user=name, remote=request.remote_addr)
            return _page("login.html", 401, message="Unknown user or wrong password.", next=next_url)
        session.clear()
        session.permanent = True
        session["user"] = principal.name
        log.info("console_login", user=principal.name, role=principal.role, remote=request.remote_addr)
        return redirect(next_url)  # type: ignore[return-value]

    @app.post("/logout")
    def logout() -> Response:
        log.info("console_logout", user=g.user.name)
        session.clear()
        return redirect(url_for("login"))  # type: ignore[return-value]

    # -- reading ------------------------------------------------------------------------------
    @app.get("/")
    def index() -> Response:
        return redirect(url_for("runs"))  # type: ignore[return-value]

    @app.get("/runs")
    def runs() -> Response:
        args = request.args
        chosen = {k: args.get(k, "").strip() for k in ("state", "step", "older_than", "newer_than", "order")}
        try:
            flt = _run_filter(chosen)
        except ValueError as exc:
            return _page("runs.html", 400, rows=[], chosen=chosen, message=str(exc))
        rows = list_runs(services.ledger, flt, limit=RUNS_PAGE_ROWS)
        return _page("runs.html", rows=rows, chosen=chosen, limit=RUNS_PAGE_ROWS)

    @app.get("/orders/<order_id>")
    def order(order_id: str) -> Response:
        try:
            oid = normalize_id(order_id)
        except ValueError as exc:
            raise Refused(f"{order_id!r} is not a Salesforce Order Id: {exc}", 404) from None
        state = order_status(services.ledger, oid)
        if not state.runs:
            raise Refused(
                f"The ledger holds no run of Order {oid} (unknown, or past the retention period).", 404
            )
        try:
            email = services.ledger.orders.snapshot(oid).get("email")
        except LookupError:
            email = None
        in_flight = any(r.state.unfinished for r in state.runs)
        return _page(
            "order.html",
            order_id=oid,
            effects=describe_effects(state.provisioning),
            email=mask_emails(email) if email else None,
            runs=[
                {
                    "run": r,
                    "outcome": describe_run(r, state.provisioning),
                    "started_by": started_by(r),
                    "timeline": timeline(r, state.provisioning),
                }
                for r in reversed(state.runs)
            ],
            refresh_s=ORDER_REFRESH_S if in_flight else None,
        )

    @app.get("/runs/<path:run_id>")
    def run(run_id: str) -> Response:
        try:
            rid = RunId.parse(run_id)
        except ValueError as exc:
            raise Refused(f"{run_id!r} is not a run id (OrderId:IdemKey): {exc}", 404) from None
        if services.ledger.runs.get(rid) is None:
            raise Refused(f"Run {rid} is not in the ledger (unknown, or past the retention period).", 404)
        return redirect(url_for("order", order_id=rid.order_id, _anchor=f"run-{rid}"))  # type: ignore[return-value]

    @app.get("/failed")
    def failed() -> Response:
        return _page("failed.html", runs=services.ledger.registries.failed())

    @app.get("/emails")
    def emails() -> Response:
        ledger = services.ledger
        found = [
            (oid, at, ledger.orders.provisioning(oid).email_error)
            for oid, at in ledger.registries.undelivered()
        ]
        return _page("emails.html", found=found)

    @app.get("/quarantine")
    def quarantine() -> Response:
        return _page("quarantine.html", entries=services.ledger.registries.quarantined(QUARANTINE_PAGE_ROWS))

    @app.get("/esim")
    def esim() -> Response:
        threshold = settings.esim_stock_warn_threshold
        stock = services.inventory.stock()
        return _page("esim.html", stock=stock, threshold=threshold, low=stock.free < threshold)

    @app.get("/listener")
    def listener() -> Response:
        state = services.ledger.listener.state(settings.sf_provision_event_channel)
        return _page("listener.html", state=state, lock_ttl_s=settings.listener_lock_ttl_s)

    # -- acting: a dry run first, then the confirmation of exactly what it showed ---------------
    def _items(field: str, normalize: Callable[[str], str]) -> list[str]:
        raw = [v.strip() for v in request.form.getlist(field) if v.strip()]
        if not raw:
            raise Refused("Nothing was selected: tick at least one row. Nothing was changed.")
        if len(raw) > MAX_ITEMS_PER_ACTION:
            raise Refused(f"At most {MAX_ITEMS_PER_ACTION} at a time. Nothing was changed.")
        return list(dict.fromkeys(normalize(v) for v in raw))

    def _confirmation(action: str, items: list[str]) -> str:
        return confirmations.dumps({"action": action, "items": sorted(items), "user": g.user.name})

    def _confirmed(action: str, items: list[str]) -> None:
        token = request.form.get("confirmation", "")
        try:
            data = confirmations.loads(token, max_age=DRY_RUN_VALID_S)
        except BadSignature:
            data = None
        expected = {"action": action, "items": sorted(items), "user": g.user.name}
        if data != expected:
            raise Refused(
                "This confirmation does not match a dry run of these items by you in the last "
                f"{DRY_RUN_VALID_S // 60} minutes: run the dry run again. Nothing was changed."
            )

    def _log_action(action: str, items: list[str], outcomes: list[Outcome]) -> None:
        log.warning(
            "console_action",
            user=g.user.name,
            via=g.user.via,
            action=action,
            items=items,
            outcomes=[f"{o.target}: {o.action}" for o in outcomes],
        )

    @app.post("/failed/dry-run")
    def requeue_dry_run() -> Response:
        require_operator("requeue runs")
        ids = _items("run_id", str)
        outcomes = requeue(services, celery_app(), ids, dry_run=True, user=_actor())
        _log_action("requeue dry run", ids, outcomes)
        ready = [o.target for o in outcomes if o.action == "would requeue"]
        return _page(
            "dry_run.html",
            title="Requeue: dry run",
            outcomes=outcomes,
            ready=ready,
            field="run_id",
            confirm_url=url_for("requeue_runs"),
            cancel_url=url_for("failed"),
            confirm_label=f"Requeue {len(ready)} run{'s' if len(ready) != 1 else ''}",
            confirmation=_confirmation("requeue", ready) if ready else None,
        )

    @app.post("/failed/requeue")
    def requeue_runs() -> Response:
        require_operator("requeue runs")
        ids = _items("run_id", str)
        _confirmed("requeue", ids)
        outcomes = requeue(services, celery_app(), ids, dry_run=False, user=_actor())
        _log_action("requeue", ids, outcomes)
        return _page("done.html", title="Requeue", outcomes=outcomes)

    @app.post("/emails/dry-run")
    def resend_dry_run() -> Response:
        require_operator("resend e-mails")
        ids = _items("order_id", _order_id)
        outcomes = resend_email(services, ids, dry_run=True, user=_actor())
        _log_action("resend dry run", ids, outcomes)
        ready = [o.target for o in outcomes if o.action == "would send"]
        return _page(
            "dry_run.html",
            title="Resend welcome e-mails: dry run",
            outcomes=outcomes,
            ready=ready,
            field="order_id",
            confirm_url=url_for("resend_emails"),
            cancel_url=url_for("emails"),
            confirm_label=f"Send {len(ready)} e-mail{'s' if len(ready) != 1 else ''} again",
            confirmation=_confirmation("resend", ready) if ready else None,
        )

    @app.post("/emails/resend")
    def resend_emails() -> Response:
        require_operator("resend e-mails")
        ids = _items("order_id", _order_id)
        _confirmed("resend", ids)
        outcomes = resend_email(services, ids, dry_run=False, user=_actor())
        _log_action("resend", ids, outcomes)
        return _page("done.html", title="Resend welcome e-mails", outcomes=outcomes)

    return app


def _actor() -> str:
    """The user the operations log with every action: who, through the console."""
    user: Principal = g.user
    return f"console:{user.name}"


def _order_id(text: str) -> str:
    try:
        return normalize_id(text)
    except ValueError as exc:
        raise Refused(f"{text!r} is not a Salesforce Order Id: {exc}. Nothing was changed.") from None


def _safe_next(value: str | None) -> str:
    """Only a path of this site, never another host (no open redirect)."""
    if not value:
        return "/runs"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return "/runs"
    return value.rstrip("?") or "/runs"


def _run_filter(chosen: dict[str, str]) -> RunFilter:
    state = chosen["state"]
    step = chosen["step"]
    if state and state not in {s.value for s in RunState}:
        raise ValueError(f"unknown state {state!r}: choose one of the list")
    if step and step not in {BEGIN, *CHAIN.names}:
        raise ValueError(f"unknown step {step!r}: choose one of the list")
    order_id = None
    if chosen["order"]:
        try:
            order_id = normalize_id(chosen["order"].partition(":")[0])
        except ValueError as exc:
            raise ValueError(f"Order: {chosen['order']!r} is not a Salesforce Order Id: {exc}") from None
    return RunFilter(
        states=frozenset({RunState(state)}) if state else frozenset(),
        step=step or None,
        older_than_s=parse_duration_s(chosen["older_than"]) if chosen["older_than"] else None,
        newer_than_s=parse_duration_s(chosen["newer_than"]) if chosen["newer_than"] else None,
        order_id=order_id,
    )
