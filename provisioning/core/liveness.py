"""A worker's liveness: a heartbeat file the worker writes while it can take and finish tasks.

What "can take and finish tasks" means here, and how each half is seen:

- **It can take tasks**: the heartbeat is written by a timer of the worker's consumer, the event
  loop that reads the broker and hands messages to the pool (``tasks/liveness.py``). A worker that
  is frozen (SIGSTOP, a debugger), whose loop is blocked (a lock, a call that never returns on
  the loop's thread) or that has lost its broker and is reconnecting writes nothing: its
  heartbeat grows older than ``WORKER_LIVENESS_STALE_S`` and the probe fails ("stale").
- **It can finish them**: every heartbeat looks at the tasks the pool is running. A task running
  longer than its own time limit (a step's ``time_limit_s``, 120 s by default) is stuck in a
  call: the threads pool cannot enforce a time limit, so that thread never comes back, and a
  worker whose every thread is stuck this way still has a perfectly healthy loop. The heartbeat
  then says ``stuck`` with the task's name and age, and the probe fails at once. One stuck task
  fails the worker, not only all of them: its message is unacknowledged and its slot lost until a
  restart, and a restart is cheap (acks are late, every step is idempotent: the messages come
  back and the ledger says what was done).

The file (``WORKER_LIVENESS_DIR/<worker name>.json``) is written atomically (a temporary file
renamed over it), so a probe never reads half of one; a worker that stops cleanly removes it.
The probe (``provisioning worker probe``, :func:`probe`) reads it and answers with a verdict
naming why it failed. Nothing here needs Redis or the broker: a worker is not restarted because
the ledger is away (restarting would not bring it back), and a probe is a file read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A task that declares no time limit (the diagnostics' ping) is stuck after this long.
NO_LIMIT_STUCK_S = 600.0
SUFFIX = ".json"


@dataclass(frozen=True)
class ActiveTask:
    """A task the pool is running: its name, when it started (epoch seconds) and its time limit."""

    name: str
    started_at: float
    limit_s: float | None

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.started_at)

    def stuck_after_s(self) -> float:
        return self.limit_s if self.limit_s else NO_LIMIT_STUCK_S


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat, as the worker writes it and the probe reads it."""

    worker: str
    pid: int
    written_at: float
    active: int
    oldest_task: str | None = None
    oldest_age_s: float | None = None
    # Why the worker cannot finish tasks (a task past its time limit); None while it can.
    stuck: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Heartbeat:
        data: dict[str, Any] = json.loads(text)
        return cls(
            worker=str(data["worker"]),
            pid=int(data["pid"]),
            written_at=float(data["written_at"]),
            active=int(data["active"]),
            oldest_task=data.get("oldest_task"),
            oldest_age_s=None if data.get("oldest_age_s") is None else float(data["oldest_age_s"]),
            stuck=data.get("stuck"),
        )


def assess(worker: str, pid: int, tasks: Iterable[ActiveTask], now: float) -> Heartbeat:
    """The heartbeat of a worker running ``tasks`` at ``now``: stuck when one ran past its limit."""
    running = sorted(tasks, key=lambda t: t.started_at)
    if not running:
        return Heartbeat(worker=worker, pid=pid, written_at=now, active=0)
    oldest = running[0]
    stuck = None
    late = [t for t in running if t.age_s(now) > t.stuck_after_s()]
    if late:
        worst = max(late, key=lambda t: t.age_s(now) - t.stuck_after_s())
        stuck = (
            f"{len(late)} of {len(running)} running tasks past their time limit: {worst.name} has run "
            f"{worst.age_s(now):.0f} s (limit {worst.stuck_after_s():.0f} s), its thread is stuck in a call"
        )
    return Heartbeat(
        worker=worker,
        pid=pid,
        written_at=now,
        active=len(running),
        oldest_task=oldest.name,
        oldest_age_s=round(oldest.age_s(now), 1),
        stuck=stuck,
    )


def heartbeat_path(directory: Path, worker: str) -> Path:
    """The heartbeat file of the worker named ``worker`` (its Celery hostname, ``name@host``)."""
    return directory / (re.sub(r"[^A-Za-z0-9@._-]", "_", worker) + SUFFIX)


def write(path: Path, heartbeat: Heartbeat) -> None:
    """Replace ``path`` with ``heartbeat`` atomically (the directory is made, private, when missing).

    The directory may be in a shared ``/tmp``: one another user made first, or that others may write
    to, is refused (PermissionError), since they could plant or remove a worker's heartbeat there.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(
            f"{path.parent} is not this user's own directory (owner uid {info.st_uid}, mode "
            f"{info.st_mode & 0o777:o}): set WORKER_LIVENESS_DIR to one it is"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(heartbeat.to_json())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Verdict:
    """The probe's answer: alive or not, and in one line why."""

    alive: bool
    reason: str
    heartbeat: Heartbeat | None = None


def find(directory: Path, worker: str | None) -> Path | Verdict:
    """The heartbeat file to probe: the named worker's, or the only one in ``directory``."""
    if worker is not None:
        return heartbeat_path(directory, worker)
    found = sorted(directory.glob("*" + SUFFIX)) if directory.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        return Verdict(False, f"no heartbeat in {directory}: no worker runs here (or it has not started)")
    names = ", ".join(p.name.removesuffix(SUFFIX) for p in found)
    return Verdict(False, f"{len(found)} heartbeats in {directory} ({names}): name the worker with --name")


def probe(path: Path, now: float, stale_after_s: float) -> Verdict:
    """Is the worker whose heartbeat is ``path`` alive at ``now``? A failing verdict says why."""
    try:
        heartbeat = Heartbeat.from_json(path.read_text())
    except FileNotFoundError:
        return Verdict(
            False,
            f"no heartbeat at {path}: the worker is not running (a clean stop removes it) or has not started",
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"heartbeat at {path} unreadable: {exc}")
    age = now - heartbeat.written_at
    if age > stale_after_s:
        return Verdict(
            False,
            f"worker {heartbeat.worker} (pid {heartbeat.pid}): heartbeat {age:.1f} s old, window {stale_after_s:g} s: "
            "its consumer's event loop has not run (frozen, blocked, or without its broker)",
            heartbeat,
        )
    if heartbeat.stuck:
        return Verdict(
            False, f"worker {heartbeat.worker} (pid {heartbeat.pid}): {heartbeat.stuck}", heartbeat
        )
    oldest = (
        f", oldest {heartbeat.oldest_task} {heartbeat.oldest_age_s:.0f} s"
        if heartbeat.oldest_task and heartbeat.oldest_age_s is not None
        else ""
    )
    return Verdict(
        True,
        f"worker {heartbeat.worker} (pid {heartbeat.pid}): heartbeat {max(age, 0.0):.1f} s old, "
        f"{heartbeat.active} tasks running{oldest}",
        heartbeat,
    )
