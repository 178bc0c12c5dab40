"""The lock (requirements/*.txt) against setup.cfg's ranges: what `make install` and a deployment get."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")

pytestmark = pytest.mark.fast


def pins(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    for line in lines:
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def declared(*extras: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options"]["install_requires"]
    for extra in extras:
        text += "\n" + cfg["options.extras_require"][extra]
    return [Requirement(line) for line in text.splitlines() if line.strip()]


def every_extra() -> tuple[str, ...]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return tuple(cfg["options.extras_require"])


@pytest.mark.parametrize(
    ("lock", "extras"), [("dev.txt", every_extra()), ("runtime.txt", ("console", "flower", "otel"))]
)
def test_the_lock_pins_every_declared_dependency_inside_its_range(lock, extras):
    locked = pins(lock)
    for requirement in declared(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is in setup.cfg but not in requirements/{lock}: make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={locked[name]}, outside setup.cfg's {requirement}: make lock"
        )


def test_every_pin_carries_a_hash_so_pip_checks_what_it_downloads():
    for lock in ("dev.txt", "runtime.txt"):
        text = (ROOT / "requirements" / lock).read_text()
        for block in re.split(r"\n(?=[A-Za-z0-9])", text):
            if PIN.match(block):
                assert "--hash=sha256:" in block, f"{block.splitlines()[0]} in {lock} has no hash"


def test_the_runtime_lock_agrees_with_the_development_lock_on_every_version():
    dev, runtime = pins("dev.txt"), pins("runtime.txt")
    assert set(runtime) <= set(dev)
    differ = {name: (runtime[name], dev[name]) for name in runtime if runtime[name] != dev[name]}
    assert not differ, f"runtime.txt and dev.txt disagree (make lock): {differ}"


def test_the_build_backend_is_locked_for_the_install_without_build_isolation():
    pyproject = (ROOT / "pyproject.toml").read_text()
    backend = Requirement(re.search(r'requires = \["([^"]+)"', pyproject).group(1))
    for lock in ("dev.txt", "runtime.txt"):
        assert backend.specifier.contains(pins(lock)["setuptools"]), lock
