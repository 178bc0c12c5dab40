"""Logging in and out: the password checked against CONSOLE_USERS, the user kept in the session."""

from __future__ import annotations

from flask import Blueprint, g, redirect, request, session, url_for
from werkzeug.wrappers import Response as BaseResponse

from provisioning.core.logs import get_logger
from provisioning.ops.console.auth import check_password
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
    name = request.form.get("username", "").strip()
    principal = check_password(console().settings.console_users, name, request.form.get("password", ""))
    if principal is None:
        log.warning("console_login_failed", user=name, remote=request.remote_addr)
        return page("login.html", 401, message=WRONG_PASSWORD, next=next_url)
    session.clear()
    session.permanent = True
    session["user"] = principal.name
    log.info("console_login", user=principal.name, role=principal.role, remote=request.remote_addr)
    return redirect(next_url)


@bp.post("/logout")
def logout() -> BaseResponse:
    log.info("console_logout", user=user().name)
    session.clear()
    return redirect(url_for("auth.login"))
