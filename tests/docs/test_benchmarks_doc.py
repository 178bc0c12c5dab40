"""Every benchmark command the docs name exists as a module of the ``bench`` package, with its options."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/benchmarks.md", "docs/reliability.md", "docs/deployment.md", "README.md")
# `python -m bench.<module> <options...>` up to the end of the code span or line.
COMMAND = re.compile(r"python -m (bench\.[a-z_]+)([^`\n|#]*)")
HELP_TIMEOUT_S = 120


def documented_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    found = []
    for doc in DOCS:
        text = (REPO_ROOT / doc).read_text()
        for module, rest in COMMAND.findall(text.replace("\n  ", " ")):
            options = tuple(sorted(set(re.findall(r"(--[a-z][a-z0-9-]*)", rest))))
            found.append((doc, module, options))
    return found


@cache
def help_text(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"python -m {module} --help failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_docs_name_every_benchmark_and_the_chaos_run() -> None:
    modules = {module for _, module, _ in documented_commands()}
    assert {
        "bench.run_all",
        "bench.floor",
        "bench.floor_io",
        "bench.contention",
        "bench.pipeline",
        "bench.io_bound",
        "bench.listener_catchup",
        "bench.cost",
        "bench.sandbox_throughput",
        "bench.chaos",
        "bench.queues",
        "bench.soak",
    } <= modules


@pytest.mark.parametrize(("doc", "module", "options"), documented_commands())
def test_a_documented_benchmark_command_runs_as_a_module_and_takes_its_options(
    doc: str, module: str, options: tuple[str, ...]
) -> None:
    text = help_text(module)
    missing = [o for o in options if o not in text]
    assert not missing, f"{doc}: python -m {module} has no option {missing}"


def test_make_bench_runs_the_package() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "-m bench.run_all" in makefile
    assert "sys.path" not in "".join(p.read_text() for p in (REPO_ROOT / "bench").glob("*.py"))
