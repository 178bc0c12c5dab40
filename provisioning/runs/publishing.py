"""Sending runs to the workers: the task of a run's first step, or of the step it goes on from.

The listener (and the reconciler, the operators' commands) sends a run's first
step; each step's task, once its step is done, sends the next one
(``tasks/steps.py``). Every message is one small task carrying the run id and
nothing else. Tasks are addressed by name, so nothing here imports ``tasks/``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

import celeryconfig
from provisioning.core import tracing
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import BEGIN
from provisioning.runs.chain import CHAIN
from provisioning.runs.writeback import WRITE_FAILURE_TASK
from provisioning.step.spec import StepSpec

# Messages buffered (Redis) or awaiting their confirms (RabbitMQ) before a batch is flushed early.
PUBLISH_BATCH_MAX = 1000
# The root span of a run's trace: the listener's event, published.
EVENT_SPAN = "provisioning.event"


def make_publisher(settings: Settings) -> Celery:
    """A Celery app that only sends (the listener, the CLI): same broker and delivery settings."""
    app = Celery("provisioning-publisher", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


def publish_step(
    app: Celery, run_id: RunId | str, step: StepSpec, *, producer: Any = None, countdown: float | None = None
) -> str:
    """Send one step task of the run (to run ``countdown`` seconds from now); returns once the broker
    accepted it. Flower shows the run id only. Sent from a task, it is that task's child in Flower
    (Celery sets the parent and root ids) and in the run's trace (its headers carry the context)."""
    text = str(run_id)
    result = app.send_task(
        step.task_name,
        args=(text,),
        argsrepr=repr((text,)),
        kwargsrepr="{}",
        producer=producer,
        countdown=countdown,
        headers=tracing.headers(),
    )
    return str(result.id)


def publish_run(app: Celery, run_id: RunId | str, *, producer: Any = None) -> str:
    """Start the run: its first step, which begins it."""
    return publish_step(app, run_id, CHAIN.first, producer=producer)


def publish_runs(app: Celery, run_ids: list[RunId]) -> None:
    """Start a batch of runs through one producer; returns once the broker accepted every one.

    In one kombu batch: one pipeline on Redis, the publisher confirms awaited once on RabbitMQ
    (``provisioning.core.broker``). A failure raises, and the whole batch is sent again by the caller.
    With tracing on, each run's trace begins here, at its event (``provisioning.event``).
    """
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH_MAX):
        for run_id in run_ids:
            with tracing.run_span(EVENT_SPAN, str(run_id), kind="producer"):
                publish_run(app, run_id, producer=producer)


def resume(app: Celery, run_id: RunId | str, step: str) -> None:
    """Send the run on from ``step``: from the start (BEGIN: a run not begun), or that step."""
    publish_step(app, run_id, CHAIN.first if step == BEGIN else CHAIN[step])


def publish_failure_writeback(app: Celery, run_id: RunId | str, countdown: float) -> str:
    """Send the next try of writing a failed run's failure on its Order, ``countdown`` seconds from now
    (``provisioning.runs.writeback``). Sent from the step's task, it is that task's child in Flower."""
    text = str(run_id)
    result = app.send_task(
        WRITE_FAILURE_TASK, args=(text,), argsrepr=repr((text,)), kwargsrepr="{}", countdown=countdown
    )
    return str(result.id)
