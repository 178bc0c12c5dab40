"""Traces from a real ``celery -A tasks worker`` (prefork): TRACING_EXPORTER alone turns them on."""

from __future__ import annotations

import re

from provisioning.core.run_id import RunId
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import make_publisher, publish_runs
from provisioning.sandbox.scenario import seed_orders, wait_until
from tests.conftest import E2E_TIMEOUT_S


def test_a_prefork_worker_with_the_console_exporter_writes_one_trace_of_the_runs_step_tasks(
    sandbox, stack_settings, services, workers
):
    settings = stack_settings.model_copy(update={"tracing_exporter": "console"})
    worker = workers(settings, pool="prefork", concurrency=2)
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=81)
    publish_runs(make_publisher(settings), [RunId.parse(order.run_id)])

    def done() -> bool:
        run = services.ledger.runs.get(order.run_id)
        return run is not None and run.state is RunState.DONE

    wait_until(done, timeout_s=E2E_TIMEOUT_S)
    # The pool's children export what is left as they exit (worker_process_shutdown).
    worker.stop()
    log = worker.log_text()
    names = set(re.findall(r'"name": "(run/provisioning\.\w+)"', log))
    assert names == {f"run/{spec.task_name}" for spec in CHAIN}, log[-3000:]
    assert log.count(f'"provisioning.run_id": "{order.run_id}"') == len(CHAIN)
    # This test's process sends the run untraced: the first task's span is the root, and every span
    # the worker wrote (tasks, HTTP, SMTP) is in that one trace.
    assert len(set(re.findall(r'"trace_id": "(0x[0-9a-f]+)"', log))) == 1
    assert '"name": "smtp send"' in log
