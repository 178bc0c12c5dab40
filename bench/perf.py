"""Counting what a process does with Linux ``perf stat``: CPU, context switches, system calls by kind.

A benchmark's CPU figure says how much; these counters say on what. A thread that
waits for the interpreter lock, or hands it over to one that waits, makes futex
calls; a socket read or write with a timeout is preceded by a poll; every system
call that blocks gives the lock up. ``perf stat`` counts them in the kernel, per
process (every thread), without slowing the process down as ``strace`` does.

Two ways to count: :class:`Attached` counts a running process (a worker) between
``start()`` and ``stop()``, through perf's control FIFO, so the window is exact;
:func:`wrapped` is the command prefix that counts a child from its start to its end.

Needs Debian's ``linux-perf`` and the right to trace (root, or
``kernel.perf_event_paranoid`` ≤ 1 and access to the syscall tracepoints).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

# (perf's event, what it counts) in the order the tables show them.
EVENTS: tuple[tuple[str, str], ...] = (
    ("task-clock", "CPU, ms"),
    ("context-switches", "context switches"),
    ("raw_syscalls:sys_enter", "system calls"),
    ("syscalls:sys_enter_futex", "futex calls (a wait for a lock: the interpreter's, or any)"),
    ("syscalls:sys_enter_poll", "polls (before a socket read or write with a timeout; liveness checks)"),
    ("syscalls:sys_enter_epoll_wait", "epoll waits (an event loop waking)"),
)
EVENT_NAMES = tuple(name for name, _ in EVENTS)
# perf's own readings of a command it runs (not of an attached process): its user and system CPU.
TIMES: tuple[tuple[str, str], ...] = (("user_time", "user CPU, ms"), ("system_time", "system CPU, ms"))
TIME_NAMES = tuple(name for name, _ in TIMES)

# How long perf may take to answer a control command (enable, disable) or to exit after SIGINT.
CONTROL_TIMEOUT_S = 10.0


class PerfError(RuntimeError):
    """perf cannot count here, or said something we cannot read; the message says what to do."""


def unavailable() -> str | None:
    """Why perf cannot count these events on this machine, or None when it can."""
    if shutil.which("perf") is None:
        return "perf is not installed: apt-get install linux-perf (Debian), then run again"
    with tempfile.TemporaryDirectory(prefix="perf-probe-") as tmp:
        out = Path(tmp) / "stat.csv"
        done = subprocess.run(
            [*wrapped(out), "true"], capture_output=True, text=True, check=False, timeout=CONTROL_TIMEOUT_S
        )
        if done.returncode != 0:
            return (
                f"perf stat failed ({done.stderr.strip()[-300:]}): run as root, or lower "
                "kernel.perf_event_paranoid and give access to /sys/kernel/tracing"
            )
        try:
            # The times are left out: a command as short as this one can show none.
            parse(out.read_text(), EVENT_NAMES)
        except PerfError as exc:
            return str(exc)
    return None


def wrapped(out: Path) -> list[str]:
    """The prefix that runs a command under ``perf stat``, its counts (and times) written to ``out``."""
    return ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(EVENT_NAMES + TIME_NAMES), "--"]


def parse(text: str, expected: tuple[str, ...] = EVENT_NAMES) -> dict[str, float]:
    """perf stat's CSV output (``-x,``): event -> count, for each of ``expected`` (times in ms).

    Raises PerfError naming an event perf did not count (a tracepoint it may not read).
    """
    counts: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0], fields[2]
        if event not in expected:
            continue
        if value == "<not counted>" and event in TIME_NAMES:
            # perf prints a time of zero so (a short command, or one that never entered the kernel).
            counts[event] = 0.0
            continue
        if value.startswith("<"):  # <not counted>, <not supported>
            raise PerfError(
                f"perf did not count {event} ({value}): run as root, or lower kernel.perf_event_paranoid "
                "and give access to /sys/kernel/tracing"
            )
        # user_time and system_time are in ns; task-clock is in ms already.
        counts[event] = float(value) / 1e6 if event in TIME_NAMES else float(value)
    missing = [name for name in expected if name not in counts]
    if missing:
        raise PerfError(f"perf stat's output has no count for {', '.join(missing)}: {text[-300:]!r}")
    return counts


class Attached:
    """``perf stat`` on a running process (all its threads), counting only between start() and stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._dir = Path(tempfile.mkdtemp(prefix="perf-attached-"))
        self._out = self._dir / "stat.csv"
        control, ack = self._dir / "control", self._dir / "ack"
        os.mkfifo(control)
        os.mkfifo(ack)
        # Counting starts disabled (-D -1) and is switched on and off through the control FIFO,
        # each command acknowledged: no guess at how long perf takes to attach.
        command = ["perf", "stat", "-x,", "-o", str(self._out), "-e", ",".join(EVENT_NAMES)]
        command += ["--control", f"fifo:{control},{ack}", "-D", "-1", "-p", str(pid)]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Read-write opens do not block waiting for the other end (Linux).
        self._control = os.open(control, os.O_RDWR)
        self._ack = os.open(ack, os.O_RDWR)

    def _command(self, word: str) -> None:
        if self._proc.poll() is not None:
            stderr = self._proc.stderr.read().decode() if self._proc.stderr else ""
            self.close()
            raise PerfError(f"perf stat -p {self.pid} exited {self._proc.returncode}: {stderr[-300:]}")
        os.write(self._control, f"{word}\n".encode())
        ready, _, _ = select.select([self._ack], [], [], CONTROL_TIMEOUT_S)
        if not ready:
            self.close()
            raise PerfError(f"perf did not acknowledge {word!r} in {CONTROL_TIMEOUT_S:.0f}s")
        os.read(self._ack, 64)

    def start(self) -> None:
        self._command("enable")

    def stop(self) -> dict[str, float]:
        """Stop counting and perf itself: the counts of the window."""
        self._command("disable")
        self._proc.send_signal(signal.SIGINT)
        try:
            _, stderr = self._proc.communicate(timeout=CONTROL_TIMEOUT_S)
            text = self._out.read_text() if self._out.exists() else None
        finally:
            self.close()
        if text is None:
            raise PerfError(f"perf stat -p {self.pid} wrote nothing: {stderr.decode()[-300:]}")
        return parse(text)

    def close(self) -> None:
        """Stop perf (if it still runs), let go of the FIFOs, remove its files; safe more than once."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._control, self._ack):
            if fd >= 0:
                os.close(fd)
        self._control = self._ack = -1
        shutil.rmtree(self._dir, ignore_errors=True)
