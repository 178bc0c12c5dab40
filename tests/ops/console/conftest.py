"""Console users for the tests: an operator and a viewer, with real argon2 hashes; logging in."""

from __future__ import annotations

import re

import pytest

from provisioning.core.settings import Settings
from provisioning.ops.console.auth import hash_password
from tests.clock import Clock

PASSWORDS = {"olivia": "olivia's long passphrase", "victor": "victor's long passphrase"}
ROLES = {"olivia": "operator", "victor": "viewer"}
SECRET_KEY = "a test key that signs the console's CSRF tokens"
# The console's cookie: a server-side session's id once logged in.
COOKIE = "provisioning_console"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="session")
def console_users() -> dict[str, dict[str, str]]:
    return {name: {"role": ROLES[name], "password_hash": hash_password(pw)} for name, pw in PASSWORDS.items()}


def console_settings(base: Settings, users: dict[str, dict[str, str]], **extra: object) -> Settings:
    values = {**base.model_dump(), "console_users": users, "console_secret_key": SECRET_KEY, **extra}
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def csrf_token(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def try_login(client, name: str, password: str, **request: object):
    """One login form, filled and sent: the answer."""
    token = csrf_token(client.get("/login", follow_redirects=True).get_data(as_text=True))
    return client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token}, **request
    )


def login(client, name: str) -> None:
    answer = try_login(client, name, PASSWORDS[name])
    assert answer.status_code == 302, answer.get_data(as_text=True)
