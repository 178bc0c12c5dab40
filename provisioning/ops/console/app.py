"""The console's Flask app: pages over the ledger, and the operators' actions with a dry run first.

Every page reads through the functions the CLI uses (:mod:`provisioning.ops.status`,
:mod:`provisioning.ops.actions`, the ledger, the inventory); nothing here decides
what a run is or what an action does. Every request but the login form needs a
user (401 otherwise, :mod:`~provisioning.ops.console.guard`); a login is a session
kept on the server (:mod:`~provisioning.ops.console.sessions`) and login attempts
are throttled; every form carries a CSRF token (Flask-WTF); requeue and resend
need the operator role and a dry run of the same items by the same user first
(:mod:`~provisioning.ops.console.views.actions`); every action is logged with the user.

:func:`create_app` only assembles: the configuration, the shared state on the app
(:mod:`~provisioning.ops.console.state`), the hooks and the Blueprints.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from celery import Celery
from flask import Flask
from flask_wtf.csrf import CSRFProtect
from itsdangerous import URLSafeTimedSerializer

from provisioning.core.settings import Settings
from provisioning.ledger import BEGIN, RunState
from provisioning.ops.console import guard
from provisioning.ops.console.formatting import age, mask_emails, when
from provisioning.ops.console.sessions import ConsoleSessionInterface
from provisioning.ops.console.state import EXTENSION, ConsoleState
from provisioning.ops.console.stores import console_sessions, login_throttle
from provisioning.ops.console.views import actions, auth, pages
from provisioning.runs.chain import CHAIN
from provisioning.runs.services import Services

__all__ = ["create_app", "mask_emails"]

# The session cookie's name (it carries a server-side session's id, or the login form's CSRF secret).
SESSION_COOKIE = "provisioning_console"


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    publisher: Callable[[], Celery] | None = None,
    secret_key: bytes | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """The console. ``publisher`` builds the Celery app that sends requeued runs (on first use);
    ``clock`` is what sessions and the login throttle take as now (tests move it)."""
    if not settings.console_users:
        raise ValueError(
            'CONSOLE_USERS has no user: add one, e.g. CONSOLE_USERS=\'{"alice": {"role": "operator", '
            '"password_hash": "<the output of provisioning console hash-password>"}}\''
        )
    services = services or Services(settings)
    key = secret_key or (
        settings.console_secret_key.get_secret_value().encode()
        if settings.console_secret_key
        else secrets.token_bytes(32)
    )
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=key,
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.console_cookie_secure,
        PERMANENT_SESSION_LIFETIME=settings.console_session_ttl_s,
        # A form stays valid as long as the login: the session, not a clock, bounds it.
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=1_000_000,
    )
    state = ConsoleState(
        settings=settings,
        services=services,
        sessions=console_sessions(settings, services.redis, clock),
        throttle=login_throttle(settings, services.redis, clock),
        confirmations=URLSafeTimedSerializer(key, salt="provisioning-console-dry-run"),
        make_publisher=publisher or (lambda: _make_publisher(settings)),
        clock=clock,
    )
    app.extensions[EXTENSION] = state
    app.session_interface = ConsoleSessionInterface(state.sessions)

    app.jinja_env.filters.update(mask=mask_emails, when=when, age=age)
    app.jinja_env.globals.update(steps=[BEGIN, *CHAIN.names], states=[s.value for s in RunState])
    guard.install(app)
    # After guard's authenticate: a request without a user gets 401 before any CSRF check.
    CSRFProtect().init_app(app)
    for blueprint in (auth.bp, pages.bp, actions.bp):
        app.register_blueprint(blueprint)
    return app


def _make_publisher(settings: Settings) -> Celery:
    from provisioning.runs.publishing import make_publisher

    return make_publisher(settings)
