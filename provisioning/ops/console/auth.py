"""Who is asking: console users and roles from settings, argon2 password hashes, or an auth proxy's header.

Two ways in, both documented in docs/operations.md:

- a password: ``CONSOLE_USERS`` holds each user's role and the argon2id hash of
  the password (``provisioning console hash-password`` makes it); the login form
  checks it (throttled per user and per client address:
  :mod:`provisioning.ledger.login_throttle`) and starts a session kept on the server
  (:mod:`provisioning.ops.console.sessions`), whose opaque id the cookie (HttpOnly,
  SameSite=Strict) carries until logout, revocation or ``CONSOLE_SESSION_TTL_S``;
- an auth proxy: with ``CONSOLE_AUTH_PROXY_HEADER`` set, a request coming from an
  address in ``CONSOLE_TRUSTED_PROXIES`` is the user that header names, who must be
  in ``CONSOLE_USERS`` (for the role). The header from anywhere else is ignored.

Two roles: a viewer reads; an operator also requeues runs and resends e-mails.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from provisioning.core.settings import ConsoleUser, Settings

OPERATOR = "operator"
VIEWER = "viewer"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    # How the user got in: "password" or "proxy".
    via: str

    @property
    def can_act(self) -> bool:
        """Operators requeue and resend; viewers only read."""
        return self.role == OPERATOR


@cache
def _hasher() -> PasswordHasher:
    # argon2id with the library's defaults (RFC 9106's low-memory profile).
    return PasswordHasher()


@cache
def _decoy_hash() -> str:
    """Checked against when the user is unknown, so that a wrong name costs as long as a wrong password."""
    return _hasher().hash("decoy password, never a user's")


def hash_password(password: str) -> str:
    """The argon2id hash to put in CONSOLE_USERS (``provisioning console hash-password``)."""
    if not password:
        raise ValueError("the password is empty")
    return _hasher().hash(password)


def check_password(users: dict[str, ConsoleUser], name: str, password: str) -> Principal | None:
    """The user when the password is theirs; None otherwise (whatever was wrong)."""
    user = users.get(name)
    stored = user.password_hash.get_secret_value() if user and user.password_hash else None
    try:
        _hasher().verify(stored or _decoy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user is None or stored is None:
        return None
    return Principal(name, user.role, "password")


def trusted_proxies(settings: Settings) -> frozenset[str]:
    return frozenset(a.strip() for a in settings.console_trusted_proxies.split(",") if a.strip())


def client_address(settings: Settings, remote_addr: str | None, forwarded_for: str | None) -> str:
    """The address a login attempt is counted against (login throttling).

    Behind a proxy every request comes from the proxy: when the peer is in
    ``CONSOLE_TRUSTED_PROXIES``, the client is the last address ``X-Forwarded-For``
    names that is not a trusted proxy (each proxy appends the address it saw; what
    comes before that, the client could have written itself).
    """
    peer = remote_addr or "unknown"
    trusted = trusted_proxies(settings)
    if peer not in trusted or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return next((hop for hop in reversed(hops) if hop not in trusted), peer)


def principal_from_proxy(
    settings: Settings, remote_addr: str | None, header_value: str | None
) -> Principal | None:
    """The user an auth proxy names, if the header is set and comes from a trusted address."""
    if not settings.console_auth_proxy_header or not header_value:
        return None
    if remote_addr not in trusted_proxies(settings):
        return None
    user = settings.console_users.get(header_value.strip())
    if user is None:
        return None
    return Principal(header_value.strip(), user.role, "proxy")
