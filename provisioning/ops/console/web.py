"""What every view uses: the page it answers with, the user asking, and a refusal that changes nothing."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Response, g, render_template

from provisioning.core.errors import PicklableError
from provisioning.core.logs import get_logger
from provisioning.ops.console.auth import Principal

log = get_logger(__name__)


class Refused(PicklableError):
    """Bad input from the browser: the message says what was wrong; nothing was changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def page(template: str, status: int = 200, **context: Any) -> Response:
    return Response(render_template(template, user=g.get("user"), **context), status=status)


def user() -> Principal:
    """The user of this request (every view but the login form's has one: see guard.authenticate)."""
    principal: Principal = g.user
    return principal


def actor() -> str:
    """The user the operations log with every action: who, through the console."""
    return f"console:{user().name}"


def require_operator(what: str) -> None:
    principal = user()
    if not principal.can_act:
        log.warning("console_forbidden", user=principal.name, role=principal.role, action=what)
        raise Refused(
            f"Your role ({principal.role}) cannot {what}; ask an operator. Nothing was changed.", 403
        )


def safe_next(value: str | None) -> str:
    """Only a path of this site, never another host (no open redirect)."""
    if not value:
        return "/runs"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return "/runs"
    return value.rstrip("?") or "/runs"
