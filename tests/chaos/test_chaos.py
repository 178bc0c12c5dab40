"""The chaos acceptance at CI size: 100 Orders through faults, kills and a broker restart.

Runs ``python -m bench.chaos`` as the operators would (a subprocess: it starts its own
Redis, the simulators, three workers and the listener) and reads its JSON summary; once
with Redis as the broker, once with a RabbitMQ node of its own (quorum queues).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CI_ORDERS = 100
# A pass takes 1-2 minutes; the caps only stop a stuck run from holding CI (the runner reports
# what is stuck once SETTLE_TIMEOUT_S has passed after the faults stopped).
RUN_TIMEOUT_S = 540
SETTLE_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


def _chaos(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """Run ``python -m bench.chaos`` at CI size; its JSON summary and the end of its output."""
    summary_path = tmp_path / "summary.json"
    argv = [
        sys.executable,
        "-m",
        "bench.chaos",
        "--orders",
        str(CI_ORDERS),
        "--workdir",
        str(tmp_path / "run"),
        "--json-out",
        str(summary_path),
        "--settle-timeout-s",
        str(SETTLE_TIMEOUT_S),
        *extra,
    ]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM: the runner stops its workers, listener and Redis before it exits.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
    output = stdout[-12000:] + stderr[-4000:]
    assert proc.returncode == 0, output
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    assert summary["violations"] == [], output
    assert all(c["ok"] for c in summary["checks"] + summary["requeue_checks"]), output
    return summary, output


@pytest.mark.slow
def test_a_hundred_orders_through_faults_kills_and_a_redis_restart_end_with_each_effect_once(
    tmp_path: Path,
) -> None:
    summary, _ = _chaos(tmp_path)
    # The chaos really happened: faults of both kinds, kills, the Redis restart, duplicate events,
    # Orders approved twice (a second event with a new key).
    injected = [kind.rsplit(":", 1)[-1] for faults in summary["injected"].values() for kind in faults]
    assert {"error", "ambiguous"} <= set(injected)
    assert summary["disruptions"]["worker_kills"] >= 1
    assert summary["disruptions"]["listener_kills"] == 2
    assert summary["disruptions"]["redis_restarts"] == 1
    assert summary["events"]["published"] > CI_ORDERS
    assert summary["events"]["orders_approved_twice"] >= 5
    assert summary["seeded"]["without_pay_method"] >= 1
    assert summary["recovery"]["requeue_outcomes"] == {
        "requeued at validate_payment": summary["seeded"]["without_pay_method"]
    }


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_a_hundred_orders_on_rabbitmq_quorum_queues_through_faults_kills_and_a_broker_restart_end_once(
    tmp_path: Path,
) -> None:
    summary, output = _chaos(tmp_path, "--broker", "rabbitmq")
    assert summary["config"]["broker"] == "rabbitmq"
    assert summary["config"]["queue_type"] == "quorum"
    injected = [kind.rsplit(":", 1)[-1] for faults in summary["injected"].values() for kind in faults]
    assert {"error", "ambiguous"} <= set(injected)
    disruptions = summary["disruptions"]
    assert disruptions["worker_kills"] >= 1
    assert disruptions["listener_kills"] == 2
    # The run's own RabbitMQ node was stopped and started again, and the ledger's Redis too.
    assert disruptions["rabbitmq_restarts"] == 1, output
    assert disruptions["redis_restarts"] == 1
    assert summary["events"]["published"] > CI_ORDERS
    assert summary["recovery"]["requeue_outcomes"] == {
        "requeued at validate_payment": summary["seeded"]["without_pay_method"]
    }
