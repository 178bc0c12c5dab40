"""Sending runs to the workers: the entry task, or the chain from a given step.

Used by the listener, the reconciler, the operators' commands and the entry
task. Tasks are addressed by name, so nothing here imports ``tasks/``.
"""

from __future__ import annotations

from celery import Celery
from celery.canvas import Signature, chain

import celeryconfig
from provisioning.chain import ENTRY_STEP, ENTRY_TASK, STEPS, Step
from provisioning.run_id import RunId
from provisioning.settings import Settings


def make_publisher(settings: Settings) -> Celery:
    """A Celery app that only sends (the listener, the CLI): same broker and delivery settings."""
    app = Celery("provisioning-publisher", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


def publish_run(app: Celery, run_id: RunId | str) -> str:
    """Send ``provisioning.provision_order(run_id)``; returns once the broker accepted it."""
    text = str(run_id)
    result = app.send_task(ENTRY_TASK, args=(text,), argsrepr=repr((text,)), kwargsrepr="{}")
    return str(result.id)


def chain_from(app: Celery, run_id: RunId | str, first_step: Step) -> chain:
    """The chain of steps from ``first_step`` to the end, each taking only the run id."""
    text = str(run_id)
    sigs: list[Signature] = [
        app.signature(step.task_name, args=(text,), immutable=True).set(argsrepr=repr((text,)))
        for step in STEPS[STEPS.index(first_step) :]
    ]
    return chain(*sigs)


def resume(app: Celery, run_id: RunId | str, step: str) -> None:
    """Send the run on from ``step``: the entry task, or the chain from that step."""
    if step == ENTRY_STEP:
        publish_run(app, run_id)
    else:
        chain_from(app, run_id, Step(step)).apply_async()
