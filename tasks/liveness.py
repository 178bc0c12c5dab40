"""The worker's liveness heartbeat: a bootstep of the consumer (``provisioning.core.liveness``).

The heartbeat is a timer entry of the consumer, so it is written by the event loop that takes
messages from the broker and hands them to the pool: a frozen worker, a blocked loop or a
consumer without its broker (between a connection loss and its reconnect, when Celery stops and
starts the consumer's steps) writes none, and its file goes stale. Each beat also looks at the
tasks the pool runs (Celery's ``active_requests``) and says ``stuck`` when one has run past its
time limit, which the threads pool never enforces: a worker whose threads are all stuck in one
call keeps a healthy loop, and is seen this way. ``provisioning worker probe`` reads the file.

A first heartbeat is written when the step is made (the worker starts), so a worker that cannot
connect within ``WORKER_LIVENESS_STALE_S`` fails its probe too; a clean stop removes the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.worker import state

from provisioning.core import liveness
from provisioning.core.logs import get_logger

log = get_logger(__name__)

# Tries at copying the pool's set of running tasks (a pool thread may change it meanwhile).
SNAPSHOT_TRIES = 5


def running_tasks() -> list[liveness.ActiveTask]:
    """The tasks the pool runs now: name, start (epoch s) and the time limit they run under."""
    for _ in range(SNAPSHOT_TRIES):
        try:
            requests = list(state.active_requests)
            break
        except RuntimeError:  # "Set changed size during iteration": a thread took or ended a task
            continue
    else:
        return []
    tasks = []
    for request in requests:
        started = getattr(request, "time_start", None)
        if not started:
            continue
        task = getattr(request, "task", None)
        limit = (request.time_limits or (None, None))[1] or getattr(task, "time_limit", None)
        tasks.append(liveness.ActiveTask(str(request.name), float(started), float(limit) if limit else None))
    return tasks


class Liveness(bootsteps.StartStopStep):
    """Writes ``WORKER_LIVENESS_DIR/<worker>.json`` every ``WORKER_LIVENESS_INTERVAL_S`` from the loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        settings = c.app.settings
        self.worker = str(c.hostname)
        self.interval_s = float(settings.worker_liveness_interval_s)
        self.path: Path = liveness.heartbeat_path(Path(settings.worker_liveness_dir), self.worker)
        self.timer_entry: Any = None
        self.stuck = False
        self.beat()  # starting: fresh for one window, in which the consumer must connect

    def start(self, c: Any) -> None:
        self.beat()
        self.timer_entry = c.timer.call_repeatedly(self.interval_s, self.beat, priority=0)

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        liveness.remove(self.path)

    def beat(self) -> None:
        try:
            heartbeat = liveness.assess(self.worker, os.getpid(), running_tasks(), time.time())
            liveness.write(self.path, heartbeat)
        except Exception as exc:  # a beat that fails is a missing beat: the probe sees it go stale
            log.error("worker_liveness_write_failed", path=str(self.path), error=str(exc))
            return
        if heartbeat.stuck and not self.stuck:
            log.error("worker_task_stuck", reason=heartbeat.stuck)
        self.stuck = heartbeat.stuck is not None
