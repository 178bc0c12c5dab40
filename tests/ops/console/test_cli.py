"""``provisioning console`` as a command: the password hash it prints, and what it says when it cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from argon2 import PasswordHasher

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
