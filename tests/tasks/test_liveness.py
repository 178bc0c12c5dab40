"""A worker that stops making progress is seen by `provisioning worker probe` and replaced.

Real ``celery -A tasks worker`` processes against the sandbox: one is frozen with SIGSTOP while
its runs are in the middle of their calls; the probe fails within its window; a replacement
(started here, as a supervisor would) finishes the runs; the frozen worker is then stopped the
way systemd stops a unit (SIGTERM with SIGCONT: it wakes up and shuts down warm), and the
simulators' own records show every effect once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.processes import start_worker
from provisioning.sandbox.scenario import count_effects, effects_by_order, seed_orders
from provisioning.sandbox.scenario import wait_until as wait_for
from tasks.app import create_app
from tests.tasks.stuck_app import STUCK_TIME_LIMIT_S

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("provisioning"))
INTERVAL_S = 1.0
WINDOW_S = 5.0
# The probe is a process of its own: its start (imports, settings: 1-3 s on a loaded 2-core machine)
# comes on top of the window, once or twice (a probe that began just before the window ran out).
PROBE_SLACK_S = 10.0
SLOW_CALL_MS = 2500


def _liveness(settings):
    return settings.model_copy(
        update={"worker_liveness_interval_s": INTERVAL_S, "worker_liveness_stale_s": WINDOW_S}
    )


def _probe(settings, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "PROVISIONING_ENV_FILE": os.devnull}
    return subprocess.run(
        [CLI, "worker", "probe", "--name", name], env=env, capture_output=True, text=True, timeout=60
    )


def _node(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


def _state(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run.state if run is not None else None


def _calls(sandbox, sim, operation):
    return sandbox.admin(sim).get("/__admin/calls")["calls"].get(operation, 0)


def _start_slow_runs(sandbox, settings, services, workers):
    """Six runs whose eSIM and WHMCS calls are slow, with some inside those calls; and their worker."""
    orders = seed_orders(sandbox, services.inventory, count=6, esim_share=0.5, seed=28)
    for sim, operation in (("smdp", "downloadOrder"), ("whmcs", "AddOrder")):
        sandbox.admin(sim).post("/__admin/faults", {"latency_ms": SLOW_CALL_MS, "operations": [operation]})
    victim = workers(settings, name="victim", concurrency=4)
    app = make_publisher(settings)
    for order in orders:
        publish_run(app, order.run_id)
    wait_for(lambda: _calls(sandbox, "smdp", "downloadOrder") + _calls(sandbox, "whmcs", "AddOrder") >= 2, 60)
    alive = _probe(settings, _node("victim"))
    assert alive.returncode == 0, alive.stderr
    assert "tasks running" in alive.stdout
    return orders, victim


def _freeze_until_the_probe_fails(settings, services, victim, orders) -> tuple[float, float, int]:
    """SIGSTOP the worker: the seconds until its probe failed, the heartbeat's age the failing probe
    read, and how many runs were unfinished."""
    os.kill(victim.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    unfinished = sum(1 for o in orders if _state(services, o.run_id) is not RunState.DONE)
    assert unfinished, "every run ended before the freeze"
    while (answer := _probe(settings, _node("victim"))).returncode == 0:
        assert time.monotonic() - frozen_at < WINDOW_S + PROBE_SLACK_S, answer.stdout
        time.sleep(0.2)
    detected_s = time.monotonic() - frozen_at
    assert answer.returncode == 1
    assert f"window {WINDOW_S:g} s" in answer.stderr
    assert "frozen, blocked, or without its broker" in answer.stderr
    assert detected_s <= WINDOW_S + PROBE_SLACK_S
    # Not before its window: the heartbeat it read was older than the window (and was written
    # before the freeze, so the failure came no sooner than a window after the worker's last beat).
    seen = re.search(r"heartbeat (\d+\.\d) s old", answer.stderr)
    assert seen, answer.stderr
    assert float(seen.group(1)) >= WINDOW_S
    return detected_s, float(seen.group(1)), unfinished


def _assert_each_effect_once(sandbox, services, orders) -> None:
    effects = effects_by_order(sandbox)
    problems = {o.order_id: effects[o.order_id].problems() for o in orders}
    assert all(not p for p in problems.values()), problems
    for order in orders:
        assert effects[order.order_id].esim_profiles == (1 if order.esim else 0)
        resends = int(services.ledger.orders.marker(order.order_id, "email_resends") or 0)
        assert effects[order.order_id].emails <= 1 + resends
    totals = count_effects(sandbox)
    assert totals.whmcs_orders == totals.whmcs_accepted == len(orders)
    assert totals.duplicate_whmcs_orders == 0
    assert totals.esim_reserved_unconfirmed == 0
    assert services.inventory.stock().claimed == 0


def _report(broker: str, detected_s: float, age_s: float, recovered_s: float, unfinished: int) -> None:
    print(
        f"\nliveness ({broker}): probe failed {detected_s:.1f} s after SIGSTOP, reading a heartbeat "
        f"{age_s:.1f} s old (window {WINDOW_S:g} s, "
        f"interval {INTERVAL_S:g} s); every run done {recovered_s:.1f} s after the replacement started; "
        f"{unfinished} of 6 runs unfinished at the freeze; load {os.getloadavg()[0]:.2f}"
    )


def _clear_faults(sandbox) -> None:
    for sim in ("smdp", "whmcs"):
        sandbox.admin(sim).post("/__admin/faults", {})


def test_a_frozen_worker_fails_its_probe_within_the_window_and_a_replacement_finishes_its_runs_once(
    sandbox, stack_settings, services, workers
):
    settings = _liveness(stack_settings)
    orders, victim = _start_slow_runs(sandbox, settings, services, workers)
    try:
        detected_s, age_s, unfinished = _freeze_until_the_probe_fails(settings, services, victim, orders)
        # The supervisor's answer: a replacement, while the frozen one still holds its messages (on
        # Redis they come back after CELERY_VISIBILITY_TIMEOUT_S, its leases after RUN_LEASE_TTL_S).
        _clear_faults(sandbox)
        replaced_at = time.monotonic()
        workers(settings, name="replacement", concurrency=4)
        wait_for(lambda: all(_state(services, o.run_id) is RunState.DONE for o in orders), timeout_s=180)
        recovered_s = time.monotonic() - replaced_at
        assert victim.alive(), "the frozen worker went away on its own"
    finally:
        # systemd's stop of a unit: SIGTERM, then SIGCONT so that a stopped process receives it. The
        # frozen worker wakes up with its calls answered long ago and shuts down warm.
        os.kill(victim.pid, signal.SIGTERM)
        os.kill(victim.pid, signal.SIGCONT)
        victim.stop()
    # What the woken worker's threads did after their calls came back is part of "once".
    time.sleep(2)
    _assert_each_effect_once(sandbox, services, orders)
    _report("redis", detected_s, age_s, recovered_s, unfinished)


@pytest.mark.rabbitmq
def test_on_rabbitmq_a_frozen_worker_fails_its_probe_and_once_killed_a_replacement_finishes_its_runs_once(
    sandbox, rabbit_settings, services, workers
):
    settings = _liveness(rabbit_settings)
    orders, victim = _start_slow_runs(sandbox, settings, services, workers)
    try:
        detected_s, age_s, unfinished = _freeze_until_the_probe_fails(settings, services, victim, orders)
        # A frozen consumer keeps its connection, and RabbitMQ its unacknowledged messages, until the
        # connection closes: the supervisor's kill (Kubernetes: SIGTERM stays pending in a stopped
        # process, SIGKILL after the grace period) is what hands them back, at once.
        _clear_faults(sandbox)
        victim.kill()
        replaced_at = time.monotonic()
        workers(settings, name="replacement", concurrency=4)
        wait_for(lambda: all(_state(services, o.run_id) is RunState.DONE for o in orders), timeout_s=180)
        recovered_s = time.monotonic() - replaced_at
    finally:
        victim.kill()
        if victim.proc is not None and victim.proc.returncode is None:
            os.kill(victim.pid, signal.SIGCONT)
    _assert_each_effect_once(sandbox, services, orders)
    _report("rabbitmq", detected_s, age_s, recovered_s, unfinished)


def test_a_worker_whose_task_outlives_its_time_limit_fails_its_probe_naming_the_task(settings, tmp_path):
    settings = _liveness(settings)
    env = {**settings.to_env(), "PYTHONPATH": str(ROOT)}
    worker = start_worker(env, tmp_path / "logs", name="stuck", concurrency=2, app="tests.tasks.stuck_app")
    try:
        sleep_s = STUCK_TIME_LIMIT_S + 3 * WINDOW_S
        create_app(settings).send_task(
            "provisioning.test_outlives_its_limit", args=[sleep_s], queue=settings.celery_queue
        )
        wait_for(lambda: "1 tasks running" in _probe(settings, _node("stuck")).stdout, timeout_s=30)
        sent_at = time.monotonic()
        answer = wait_for(
            lambda: (a := _probe(settings, _node("stuck"))).returncode == 1 and a, timeout_s=3 * WINDOW_S
        )
        assert time.monotonic() - sent_at < STUCK_TIME_LIMIT_S + WINDOW_S
        assert "1 of 1 running tasks past their time limit" in answer.stderr
        assert "provisioning.test_outlives_its_limit has run" in answer.stderr
        assert f"(limit {STUCK_TIME_LIMIT_S} s)" in answer.stderr
        assert "worker_task_stuck" in worker.log_text()
        # Its heartbeat is fresh all along: the loop is fine, a thread is not.
        assert "old, window" not in answer.stderr
    finally:
        worker.stop(grace_s=3 * WINDOW_S + STUCK_TIME_LIMIT_S)
    assert not (settings.worker_liveness_dir / f"{_node('stuck')}.json").exists()
