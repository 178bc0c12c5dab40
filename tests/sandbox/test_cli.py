"""Without the sandbox extra, the workers' code imports cleanly and `provisioning sandbox|demo` say what to install.

Each case runs in a fresh interpreter in which the extra's packages cannot be
imported (a ``None`` in ``sys.modules``, which makes ``import`` fail exactly as
for a package that is not installed).
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.sandbox import SANDBOX_EXTRA_PACKAGES, SANDBOX_INSTALL_HINT, missing_sandbox_packages

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120
WITHOUT_EXTRA = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in SANDBOX_EXTRA_PACKAGES)


def run_without_extra(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def cli_without_extra(*args: str) -> subprocess.CompletedProcess[str]:
    return run_without_extra(
        f"from provisioning.cli import main\nmain({list(args)!r}, prog_name='provisioning')\n"
    )


def test_with_the_extra_installed_nothing_is_missing() -> None:
    assert missing_sandbox_packages() == []


def test_without_the_extra_the_workers_and_the_listener_import_cleanly() -> None:
    done = run_without_extra(
        "import importlib\n"
        "for name in ('tasks', 'celeryconfig', 'provisioning.listener', 'provisioning.ops.commands',\n"
        "             'provisioning.runs.services', 'provisioning.ops.checks', 'provisioning.cli',\n"
        "             'provisioning.sandbox.redis_server', 'provisioning.sandbox.processes'):\n"
        "    importlib.import_module(name)\n"
        "from provisioning.sandbox import missing_sandbox_packages\n"
        "print(','.join(missing_sandbox_packages()))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(SANDBOX_EXTRA_PACKAGES)


@pytest.mark.parametrize(
    "command", [["demo"], ["demo", "--orders", "5"], ["sandbox"], ["sandbox", "--seed", "1"]]
)
def test_without_the_extra_sandbox_and_demo_say_what_to_install(command: list[str]) -> None:
    done = cli_without_extra(*command)
    assert done.returncode == 1
    assert f"`provisioning {command[0]}` needs the sandbox extra" in done.stderr
    assert "missing: aiohttp, aiosmtpd, trustme" in done.stderr
    assert SANDBOX_INSTALL_HINT in done.stderr
    assert "Traceback" not in done.stderr


def test_without_the_extra_the_other_commands_still_work() -> None:
    done = cli_without_extra("--help")
    assert done.returncode == 0, done.stderr
    for command in ("listen", "status", "requeue", "esim", "sandbox", "demo"):
        assert command in done.stdout
    assert cli_without_extra("demo", "--help").returncode == 1


def test_the_sandbox_libraries_are_an_extra_and_not_a_dependency_of_every_worker() -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    required = config["options"]["install_requires"].lower()
    extra = config["options.extras_require"]["sandbox"].lower()
    for name in SANDBOX_EXTRA_PACKAGES:
        assert name not in required
        assert name in extra
    # The QR code is part of the real activation e-mail: it stays a dependency.
    assert "qrcode" in required
