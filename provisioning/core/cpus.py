"""Keeping a worker process on the CPUs it is given (``WORKER_CPUS``), so its threads hand the interpreter lock over on one core.

A threads-pool worker runs Python on one core at a time, however many the host
has: the interpreter lock. Left to the scheduler, its threads are spread over every
core, and each time one gives the lock up for a system call (a socket's send, poll
and receive, TLS, SMTP: about 170 per eSIM Order) the thread it wakes runs on
another core; the lock and the data it guards move between the cores' caches, and
the first thread, back from its call, sleeps until it gets the lock back. Kept on
one core, a worker of 8 threads spent a tenth to a third less CPU per Order and ran
more Orders per second on a 2-core host (docs/benchmarks.md, "Wave 3, eighth run").

So: give each threads worker of a host a CPU of its own (``WORKER_CPUS=0`` for
one, ``WORKER_CPUS=1`` for the next). A prefork worker's children inherit their
parent's CPUs: give it as many as it has children, or none.

The CPUs are written as the kernel writes them (``taskset -c``, cpusets):
``0``, ``0,2``, ``0-3``. Linux only (``sched_setaffinity``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

# Where Linux lists a process's threads (one directory per thread id).
THREADS_DIR = Path("/proc/self/task")
EXAMPLE = "e.g. 0, or 0,2, or 0-3"


class CpusUnavailable(SystemExit):
    """The CPUs asked for cannot be had here: the worker exits before taking any task, saying why."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0,2-3`` -> {0, 2, 3}; ValueError naming the entry that is not a CPU or a range of them."""
    cpus: set[int] = set()
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        first, dash, last = entry.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{entry!r} is not a CPU number or a range of them ({EXAMPLE})")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{entry!r} is a range of CPUs that ends before it starts ({EXAMPLE})")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"no CPU given ({EXAMPLE})")
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 2, 3} -> ``0,2-3``: the kernel's own way of writing a set of CPUs."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in [*ordered, None]:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None and prev is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def pin_process(cpus: frozenset[int]) -> int:
    """Keep every thread of this process (and those it starts later) on ``cpus``; the threads pinned.

    Raises :class:`CpusUnavailable` when the platform cannot pin or a CPU is not one this
    process may run on (a container's cpuset, a host with fewer cores).
    """
    if not hasattr(os, "sched_setaffinity"):
        raise CpusUnavailable("WORKER_CPUS needs Linux (sched_setaffinity); leave it empty on this platform.")
    allowed = frozenset(os.sched_getaffinity(0))
    missing = cpus - allowed
    if missing:
        raise CpusUnavailable(
            f"WORKER_CPUS={format_cpu_list(cpus)}: CPU {format_cpu_list(missing)} is not available to this "
            f"process, which may run on {format_cpu_list(allowed)} only; give WORKER_CPUS among those, "
            "or leave it empty."
        )
    # A thread inherits its creator's CPUs; one started while the list is read is caught on the next pass.
    pinned: set[int] = set()
    while True:
        threads = {int(name) for name in os.listdir(THREADS_DIR)} - pinned
        if not threads:
            return len(pinned)
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setaffinity(tid, cpus)
            pinned.add(tid)
