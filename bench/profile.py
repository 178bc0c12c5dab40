"""Sampling profiles of a running process with py-spy (when it is installed), summarised as tables.

py-spy attaches to a live process (a worker, the listener) without changing it.
It is not a dependency of the project: ``pip install py-spy`` to use
``--profile``; without it the benchmarks run and say that they skipped the profile.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.common import Table, log

# Samples per second: enough for a few-second window, light enough not to slow the process much.
SAMPLE_RATE_HZ = 100
# How long py-spy may take to write its output after SIGINT.
STOP_TIMEOUT_S = 30.0
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
_STDLIB = f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"

REDIS_AREA = "Redis client (redis-py)"
LIFECYCLE = "in our tasks, outside the actions (the ledger's claims and ends, the run's beginning)"
OUTSIDE = "outside our tasks (Celery, broker, events)"
# Leaf-first: a sample's time goes to the innermost frame that belongs to one of these.
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog, logging)", ("/structlog/", f"{_STDLIB}logging/")),
    (REDIS_AREA, ("/redis/",)),
    ("broker client (kombu)", ("/kombu/", "/amqp/")),
    ("TLS (ssl)", (f"{_STDLIB}ssl.py",)),
    ("HTTP client (requests, urllib3, http.client)", ("/requests/", "/urllib3/", f"{_STDLIB}http/")),
    ("SMTP (smtplib, email)", (f"{_STDLIB}smtplib.py", f"{_STDLIB}email/")),
    ("QR code (qrcode, Pillow)", ("/qrcode/", "/PIL/")),
    ("simple-salesforce", ("/simple_salesforce/",)),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("JSON", (f"{_STDLIB}json/",)),
    ("Celery (celery, billiard, vine)", ("/celery/", "/billiard/", "/vine/")),
    ("our code (provisioning, tasks)", ("/provisioning/", "/tasks/")),
    (
        "threads, sockets, selectors (stdlib)",
        (f"{_STDLIB}threading.py", f"{_STDLIB}socket.py", f"{_STDLIB}selectors.py"),
    ),
]


def pyspy_path() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` of one process (and its children) until stop()."""

    def __init__(self, pid: int, output: Path, *, extra: list[str] | None = None) -> None:
        self.pid = pid
        self.output = output
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        exe = pyspy_path()
        if exe is None:
            log("py-spy is not installed (pip install py-spy): no profile")
            return False
        argv = [
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--subprocesses",
            "--full-filenames",
            "--nolineno",
            "--rate",
            str(SAMPLE_RATE_HZ),
            "--format",
            "raw",
            "--output",
            str(self.output),
            *self.extra,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output if self.output.exists() else None


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw)
        frames.append((match["func"], match["file"]) if match else (raw, ""))
    return frames


def _area(frames: list[tuple[str, str]]) -> str:
    for _, path in reversed(frames):
        for name, needles in AREAS:
            if any(n in path for n in needles):
                if name == REDIS_AREA:
                    return f"{name}, {_redis_caller(frames)}"
                return name
    return "other"


def _redis_caller(frames: list[tuple[str, str]]) -> str:
    """Who called into redis-py: the broker transport, or our ledger, leases and inventory."""
    outermost = next(i for i, (_, path) in enumerate(frames) if "/redis/" in path)
    caller = frames[outermost - 1][1] if outermost else ""
    if "/kombu/" in caller or "/celery/" in caller:
        return "for the broker (kombu)"
    if "/provisioning/" in caller or "/tasks/" in caller:
        return "for the ledger, leases, inventory"
    return "other callers"


def _short(func: str, path: str) -> str:
    for marker in ("site-packages/", _STDLIB, "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def summarise(raw_file: Path, title: str, *, top: int = 12, steps: tuple[str, ...] = ()) -> list[Table]:
    """Tables from py-spy's raw (collapsed) stacks: time by area, by task, and the hottest functions."""
    by_area: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    by_step: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        # py-spy puts the process and thread first; those are not frames.
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        total += count
        by_area[_area(frames)] += count
        by_leaf[_short(*frames[-1])] += count
        if steps:
            # A run's steps share its task: a sample goes to the step whose action is on the stack.
            actions = {
                func for func, path in frames if "/provisioning/" in path and path.endswith("/steps.py")
            }
            step = next((s for s in steps if s in actions), None)
            if step is None:
                in_task = any("/tasks/" in path for _, path in frames)
                step = LIFECYCLE if in_task else OUTSIDE
            by_step[step] += count
    if not total:
        return []
    tables = []
    areas = Table(f"{title}: where the CPU goes, by library (innermost frame)", ["area", "share of samples"])
    for name, count in by_area.most_common():
        areas.add(name, f"{100 * count / total:.1f}%")
    areas.notes.append(
        f"{total:,} samples at {SAMPLE_RATE_HZ} Hz (py-spy; with --gil, only threads holding the GIL)."
    )
    tables.append(areas)
    if steps:
        per_step = Table(f"{title}: CPU by step", ["step", "share of samples"])
        for name, count in by_step.most_common():
            per_step.add(name, f"{100 * count / total:.1f}%")
        tables.append(per_step)
    leaves = Table(f"{title}: hottest functions (self time)", ["function", "share of samples"])
    for name, count in by_leaf.most_common(top):
        leaves.add(name, f"{100 * count / total:.1f}%")
    tables.append(leaves)
    return tables
