"""Sending runs to the workers: the chain of steps, from the first or from a given step.

A run is its chain: the first step begins the run (reads the Order, joins a run
in flight, or skips), so a run costs as many task messages as it has steps. Used
by the listener, the reconciler and the operators' commands. Tasks are addressed
by name, so nothing here imports ``tasks/``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.canvas import Signature, chain

import celeryconfig
from provisioning.chain import ENTRY_STEP, STEPS, Step
from provisioning.run_id import RunId
from provisioning.settings import Settings


def make_publisher(settings: Settings) -> Celery:
    """A Celery app that only sends (the listener, the CLI): same broker and delivery settings."""
    app = Celery("provisioning-publisher", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


def chain_from(app: Celery, run_id: RunId | str, first_step: Step) -> chain:
    """The chain of steps from ``first_step`` to the end, each taking only the run id."""
    text = str(run_id)
    sigs: list[Signature] = [
        app.signature(step.task_name, args=(text,), immutable=True).set(argsrepr=repr((text,)))
        for step in STEPS[STEPS.index(first_step) :]
    ]
    return chain(*sigs)


def publish_run(app: Celery, run_id: RunId | str, *, producer: Any = None) -> str:
    """Send the run's whole chain (one message); returns once the broker accepted it."""
    text = str(run_id)
    first, *rest = STEPS
    # The message a chain's apply_async sends: the first step, the rest embedded last-first.
    rest_sigs = [
        app.signature(step.task_name, args=(text,), immutable=True).set(argsrepr=repr((text,)))
        for step in rest
    ]
    result = app.send_task(
        first.task_name,
        args=(text,),
        argsrepr=repr((text,)),
        kwargsrepr="{}",
        chain=rest_sigs[::-1],
        producer=producer,
    )
    return str(result.id)


def publish_runs(app: Celery, run_ids: list[RunId]) -> None:
    """Send a batch of runs through one producer (one connection, one channel); every one accepted."""
    with app.producer_or_acquire() as producer:
        for run_id in run_ids:
            publish_run(app, run_id, producer=producer)


def resume(app: Celery, run_id: RunId | str, step: str) -> None:
    """Send the run on from ``step``: from the start (a run not begun), or the chain from that step."""
    if step == ENTRY_STEP:
        publish_run(app, run_id)
    else:
        chain_from(app, run_id, Step(step)).apply_async()
