"""Flask's session kept on the server once someone logs in: the cookie carries only an opaque id.

A logged-in session is a record in Redis (:class:`~provisioning.ledger.console_sessions.ConsoleSessions`):
logging out deletes it, ``provisioning console revoke-sessions`` deletes all of a
user's, and it ends ``CONSOLE_SESSION_TTL_S`` after the login; a copy of the cookie
is worth nothing after any of these. Logging in always starts a new session with a
new id (the one held before, if any, is ended), so an id planted in a browser
before the login is never the one that gets logged in.

Before a login the session holds only the login form's CSRF secret, and that stays
in a signed cookie as Flask keeps it by default: a visitor who never logs in
stores nothing on the server, so loading the login page in a loop costs Redis
nothing. Such a cookie never logs anyone in (one signed by an older console that
names a user is not believed).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

from flask import Flask, Request, Response, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin

from provisioning.ledger.console_sessions import SESSION_ID_BYTES, ConsoleSessions, SessionRecord

# Where Flask-WTF keeps the CSRF secret (WTF_CSRF_FIELD_NAME's default): a key's name, no secret.
CSRF_SECRET = "csrf_token"  # noqa: S105
# What a session id looks like in the cookie (secrets.token_urlsafe); a signed cookie has dots.
_SESSION_ID = re.compile(rf"[A-Za-z0-9_-]{{{math.ceil(SESSION_ID_BYTES * 4 / 3)}}}")


class ConsoleSession(SecureCookieSession):
    """The session of one request: on the server when ``sid`` is set, else in the signed cookie."""

    def __init__(
        self,
        initial: dict[str, Any] | None = None,
        *,
        sid: str | None = None,
        record: SessionRecord | None = None,
    ) -> None:
        super().__init__(initial)
        self.sid = sid
        self.record = record
        # A login gave this session its id in this request: the cookie must carry it.
        self.sid_is_new = False

    @property
    def user(self) -> str | None:
        """Who is logged in: only ever from a record on the server."""
        return self.record.user if self.record is not None else None


class ConsoleSessionInterface(SecureCookieSessionInterface):
    def __init__(self, store: ConsoleSessions) -> None:
        self.store = store

    def open_session(self, app: Flask, request: Request) -> ConsoleSession:
        value = request.cookies.get(self.get_cookie_name(app), "")
        if _SESSION_ID.fullmatch(value):
            record = self.store.load(value)
            if record is not None:
                return ConsoleSession(record.data, sid=value, record=record)
            ended = ConsoleSession()
            ended.modified = True  # the cookie names a session that has ended: it is deleted
            return ended
        signed = super().open_session(app, request)
        return ConsoleSession({k: v for k, v in (signed or {}).items() if k == CSRF_SECRET})

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        current = cast(ConsoleSession, session)
        if current.sid is None or current.record is None:
            super().save_session(app, current, response)
            return
        response.vary.add("Cookie")
        if current.modified:
            self.store.save(current.sid, replace(current.record, data=dict(current)))
        if current.sid_is_new:
            response.set_cookie(
                self.get_cookie_name(app),
                current.sid,
                expires=datetime.fromtimestamp(current.record.expires_at, UTC),
                httponly=self.get_cookie_httponly(app),
                domain=self.get_cookie_domain(app),
                path=self.get_cookie_path(app),
                secure=self.get_cookie_secure(app),
                partitioned=self.get_cookie_partitioned(app),
                samesite=self.get_cookie_samesite(app),
            )


def current_session() -> ConsoleSession:
    return cast(ConsoleSession, session._get_current_object())  # type: ignore[attr-defined]


def start_session(store: ConsoleSessions, user: str) -> None:
    """Log ``user`` in: a new session with a new id; the session this request came with ends."""
    current = current_session()
    if current.sid is not None:
        store.revoke(current.sid)
    current.clear()
    current.sid, current.record = store.create(user)
    current.sid_is_new = True
    current.modified = False


def end_session(store: ConsoleSessions) -> None:
    """Log out: the session's record is deleted, the cookie too."""
    current = current_session()
    if current.sid is not None:
        store.revoke(current.sid)
    current.clear()
    current.sid = current.record = None
    current.modified = True
