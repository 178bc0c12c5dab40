"""What every request goes through: who is asking (401 without a user), the security headers, the
error pages. Installed on the app by :func:`install`, before Flask-WTF's CSRF check, so that a
request without a user gets 401 before any CSRF answer."""

from __future__ import annotations

from flask import Flask, Response, g, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from provisioning.core.logs import get_logger
from provisioning.ops.console.auth import Principal, principal_from_proxy, trusted_proxies
from provisioning.ops.console.sessions import current_session
from provisioning.ops.console.state import console
from provisioning.ops.console.web import Refused, page

log = get_logger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Endpoints a request without a user may reach.
OPEN_ENDPOINTS = frozenset({"auth.login", "static"})


def install(app: Flask) -> None:
    app.before_request(authenticate)
    app.after_request(security_headers)
    app.register_error_handler(Refused, refused)
    app.register_error_handler(CSRFError, csrf_refused)
    app.register_error_handler(HTTPException, http_error)


def current_user() -> Principal | None:
    """The auth proxy's user (from a trusted address), else the user of the server-side session."""
    settings = console().settings
    header = settings.console_auth_proxy_header
    if header and request.headers.get(header) and request.remote_addr in trusted_proxies(settings):
        named = request.headers.get(header, "").strip()
        principal = principal_from_proxy(settings, request.remote_addr, named)
        if principal is None:
            raise Refused(f"The auth proxy names {named!r}, who is not in CONSOLE_USERS.", 403)
        return principal
    name = current_session().user
    user = settings.console_users.get(name) if name is not None else None
    if name is None or user is None or user.password_hash is None:
        return None
    return Principal(name, user.role, "password")


def authenticate() -> Response | None:
    g.user = None
    try:
        g.user = current_user()
    except Refused as exc:
        log.warning("console_forbidden", remote=request.remote_addr, path=request.path, reason=str(exc))
        return page("error.html", exc.status, message=str(exc))
    if g.user is None and request.endpoint not in OPEN_ENDPOINTS:
        response = page("login.html", 401, message="Log in to continue.", next=request.full_path)
        response.headers["WWW-Authenticate"] = 'Cookie realm="provisioning console", form-action="/login"'
        return response
    return None


def security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def refused(exc: Refused) -> Response:
    return page("error.html", exc.status, message=str(exc))


def csrf_refused(exc: CSRFError) -> Response:
    user = g.get("user")
    log.warning(
        "console_csrf_refused", user=user.name if user else None, path=request.path, reason=exc.description
    )
    message = (
        f"The form was refused: {exc.description} Nothing was changed. Reload the page and submit it again."
    )
    return page("error.html", 400, message=message)


def http_error(exc: HTTPException) -> Response:
    return page("error.html", exc.code or 500, message=f"{exc.name}: {exc.description}")
