"""``provisioning worker probe``: is this host's (or this container's) worker alive?

It reads the heartbeat file the worker's consumer writes (:mod:`provisioning.core.liveness`,
``tasks/liveness.py``) and exits 0 while the worker can take and finish tasks, 1 when it cannot,
with the reason on one line: no heartbeat, a heartbeat older than ``WORKER_LIVENESS_STALE_S``
(frozen, blocked, without its broker), or a task running past its time limit (a stuck thread).
No Redis, no broker, no Celery: a supervisor can run it every few seconds (the systemd timer
and the Kubernetes livenessProbe in docs/deployment.md).
"""

from __future__ import annotations

import sys
import time

import click

from provisioning.core import liveness
from provisioning.core.cli_context import Context, pass_ctx

EXIT_DEAD = 1


@click.group()
def worker() -> None:
    """The Celery workers' liveness (docs/operations.md, "A worker that stops")."""


@worker.command()
@click.option(
    "--name",
    "worker_name",
    default=None,
    help="The worker's name, its --hostname as Celery expands it (worker1@host); "
    "default: the only heartbeat in WORKER_LIVENESS_DIR.",
)
@pass_ctx
def probe(ctx: Context, worker_name: str | None) -> None:
    """Exit 0 while the worker takes and finishes tasks, 1 (with why) when its heartbeat is stale or stuck."""
    settings = ctx.settings
    found = liveness.find(settings.worker_liveness_dir, worker_name)
    if isinstance(found, liveness.Verdict):
        verdict = found
    else:
        verdict = liveness.probe(found, time.time(), settings.worker_liveness_stale_s)
    if verdict.alive:
        click.echo(f"alive: {verdict.reason}")
        return
    click.echo(f"NOT ALIVE: {verdict.reason}", err=True)
    sys.exit(EXIT_DEAD)
