"""``provisioning console`` as a command: the password hash it prints, what it says when it cannot start,
and an operator's handling of a user's logins (``revoke-sessions``, ``unlock``) against a console in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from provisioning.ops.console.app import create_app
from provisioning.runs.services import Services
from tests.ops.console.conftest import PASSWORDS, console_settings, login, try_login

CLI = str(Path(sys.executable).with_name("provisioning"))


def _run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "console", *args],
        input=stdin,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hash_password_prints_an_argon2id_hash_that_verifies_the_password():
    out = _run("hash-password", "--stdin", stdin="correct horse battery staple\n")
    assert out.returncode == 0, out.stderr
    digest = out.stdout.strip()
    assert digest.startswith("$argon2id$")
    assert PasswordHasher().verify(digest, "correct horse battery staple")
    assert "correct horse" not in out.stdout


def test_an_empty_password_is_refused():
    out = _run("hash-password", "--stdin", stdin="\n")
    assert out.returncode != 0
    assert "the password is empty" in out.stderr


def test_the_console_will_not_start_without_users_and_says_how_to_add_one(settings):
    env = {**settings.to_env(), "CONSOLE_PORT": "1"}
    env.pop("CONSOLE_USERS", None)
    out = _run(env={**env, "CONSOLE_USERS": "{}"})
    assert out.returncode != 0
    assert "CONSOLE_USERS has no user" in out.stderr
    assert "provisioning console hash-password" in out.stderr


def test_a_password_in_place_of_its_hash_is_refused_at_start(settings):
    env = {
        **settings.to_env(),
        "CONSOLE_USERS": '{"alice": {"role": "operator", "password_hash": "hunter2"}}',
    }
    out = _run(env=env)
    assert out.returncode == 2
    assert "CONSOLE_USERS" in out.stderr
    assert "never the password itself" in out.stderr
    assert "hunter2" not in out.stderr


@pytest.fixture
def console_app(settings, console_users):
    """A console on the test's Redis namespace (no simulators: the runs page reads only the ledger)."""
    built = []

    def build(**extra: object):
        env = console_settings(settings, console_users, **extra)
        services = Services(env)
        built.append(services)
        return create_app(env, services=services), env.to_env()

    yield build
    for services in built:
        services.redis.close()


def test_revoke_sessions_ends_every_session_of_the_user_and_only_theirs(console_app):
    app, env = console_app()
    laptop, phone, colleague = (app.test_client() for _ in range(3))
    login(laptop, "olivia")
    login(phone, "olivia")
    login(colleague, "victor")
    out = _run("revoke-sessions", "olivia", env=env)
    assert out.returncode == 0, out.stderr
    assert "Ended 2 sessions of olivia." in out.stdout
    assert laptop.get("/runs").status_code == 401
    assert phone.get("/runs").status_code == 401
    assert colleague.get("/runs").status_code == 200
    login(laptop, "olivia")  # a revocation is no ban: logging in again works
    assert laptop.get("/runs").status_code == 200


def test_unlock_lets_a_locked_user_log_in_again_at_once(console_app):
    app, env = console_app(console_login_max_failures=2)
    client = app.test_client()
    for _ in range(2):
        try_login(client, "olivia", "guess")
    assert try_login(client, "olivia", PASSWORDS["olivia"]).status_code == 429
    out = _run("unlock", "olivia", env=env)
    assert out.returncode == 0, out.stderr
    assert "Unlocked olivia" in out.stdout
    login(client, "olivia")


def test_unlock_without_a_user_or_an_address_says_what_it_needs(settings):
    out = _run("unlock", env=settings.to_env())
    assert out.returncode == 2
    assert "name a USER, an --address, or both" in out.stderr
