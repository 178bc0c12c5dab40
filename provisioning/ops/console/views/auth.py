"""Logging in and out: a throttled password check, then a new server-side session; logout ends it.

The throttle (:mod:`provisioning.ledger.login_throttle`) counts an attempt before
its password is checked; a held attempt is answered 429 with how long to wait, and
its password is not checked at all. A lock is logged once, by the failure that
reaches it, with the user and the client address, never the password.
"""

from __future__ import annotations

import math

from flask import Blueprint, Response, g, redirect, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from provisioning.core.logs import get_logger
from provisioning.ledger.login_throttle import MAX_NAME_CHARS, Hold, Scope
from provisioning.ops.console.auth import check_password, client_address
from provisioning.ops.console.formatting import duration, when
from provisioning.ops.console.sessions import end_session, start_session
from provisioning.ops.console.state import console
from provisioning.ops.console.web import page, safe_next, user

log = get_logger(__name__)

bp = Blueprint("auth", __name__)

WRONG_PASSWORD = "Unknown user or wrong password."  # noqa: S105 (the message, no password)


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse:
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.user is not None:
            return redirect(next_url)
        return page("login.html", next=next_url)
    state = console()
    # Bounded before it is counted, logged or checked (no user has a longer name).
    name = request.form.get("username", "").strip()[:MAX_NAME_CHARS]
    address = client_address(state.settings, request.remote_addr, request.headers.get("X-Forwarded-For"))
    attempt = state.throttle.attempt(name, address)
    if attempt.held is not None:
        return held(attempt.held, next_url)
    principal = check_password(state.settings.console_users, name, request.form.get("password", ""))
    if principal is None:
        log.warning("console_login_failed", user=name, remote=address)
        for scope in attempt.locks:
            log.warning(
                "console_login_locked",
                scope=scope.value,
                user=name,
                remote=address,
                lock_s=state.throttle.policy.lock_s,
            )
        message = WRONG_PASSWORD
        if attempt.if_failed is not None:
            message = f"{message} {hold_message(attempt.if_failed, state.clock())}"
        return page("login.html", 401, message=message, next=next_url)
    state.throttle.succeeded(name, address)
    start_session(state.sessions, principal.name)
    log.info("console_login", user=principal.name, role=principal.role, remote=address)
    return redirect(next_url)


@bp.post("/logout")
def logout() -> BaseResponse:
    log.info("console_logout", user=user().name)
    end_session(console().sessions)
    return redirect(url_for("auth.login"))


def held(hold: Hold, next_url: str) -> Response:
    """The answer to an attempt the throttle holds: 429, with how long to wait."""
    now = console().clock()
    response = page("login.html", 429, message=hold_message(hold, now), next=next_url)
    response.headers["Retry-After"] = str(max(1, math.ceil(hold.until - now)))
    return response


def hold_message(hold: Hold, now: float) -> str:
    who = "for this user" if hold.scope is Scope.USER else "from your address"
    wait = duration(hold.until - now)
    if hold.locked:
        return (
            f"Too many failed logins {who}: logins are locked for {wait} (until {when(hold.until)}). "
            "Try again then, or ask an operator to unlock them."
        )
    return f"Too many failed logins {who}: wait {wait} before trying again."
