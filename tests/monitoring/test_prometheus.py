"""A real Prometheus scrapes the real stack during a sandbox run; the counts it reads match the ledger.

Debian's ``prometheus`` on a free port with a generated configuration and its own
data directory, scraping ``provisioning metrics``, a real listener's ``/metrics``
and Flower's ``/metrics`` every second, with ``monitoring/prometheus/alerts.yml``
loaded. The sandbox's events go through the listener to real workers; the test
then asks Prometheus's HTTP API, as Grafana would.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from provisioning.ledger import RunState
from provisioning.sandbox.processes import ManagedProcess, free_port
from provisioning.sandbox.scenario import (
    event_payload,
    publish_events_admin,
    seed_orders,
    settled,
    wait_until,
)
from tests.monitoring.promql import ALERTS, dashboard_queries, grafana_to_promql, load_rules

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
BIN = Path(sys.executable).parent
SCRAPE_INTERVAL = "1s"
READY_TIMEOUT_S = 60.0
# Long enough for a few scrapes after the last run ended, on a shared machine.
AGREE_TIMEOUT_S = 60.0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def start_process(tmp_path) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str], ready_url: str) -> ManagedProcess:
        proc = ManagedProcess(name, argv, env, tmp_path / "logs" / f"{name}.log").start()
        started.append(proc)

        def ready() -> bool:
            assert proc.alive(), proc.log_text()[-3000:]
            return _answers(ready_url)

        wait_until(ready, timeout_s=READY_TIMEOUT_S)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }


class PrometheusApi:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        answer = requests.get(self.base + path, params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return data

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        found = self.query(expr)
        return float(found[0]["value"][1]) if found else None


def test_prometheus_reads_run_counts_that_match_the_ledger_during_a_sandbox_run(
    sandbox, stack_settings, services, workers, listeners, start_process, tmp_path
):
    orders = seed_orders(sandbox, services.inventory, count=5, esim_share=1.0, without_pay_method=1, seed=101)
    env = {**os.environ, **stack_settings.to_env()}
    metrics_port, flower_port, prometheus_port = free_port(), free_port(), free_port()
    start_process(
        "metrics",
        [str(BIN / "provisioning"), "metrics", "--port", str(metrics_port)],
        env,
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    start_process(
        "flower",
        [str(BIN / "celery"), "-A", "tasks", "flower", f"--port={flower_port}", "--address=127.0.0.1"],
        env,
        f"http://127.0.0.1:{flower_port}/healthcheck",
    )
    # Two worker processes, one of them prefork: their counts meet in Redis, behind one target.
    workers(concurrency=2)
    workers(pool="prefork", concurrency=2)
    listener = listeners()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            prometheus_config(
                {
                    "provisioning": f"127.0.0.1:{metrics_port}",
                    "listener": f"127.0.0.1:{listener.health_port}",
                    "flower": f"127.0.0.1:{flower_port}",
                }
            )
        )
    )
    start_process(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        env,
        f"http://127.0.0.1:{prometheus_port}/-/ready",
    )
    api = PrometheusApi(f"http://127.0.0.1:{prometheus_port}")

    # Five Orders (the last without a pay method) and a second approval of the first, with another key.
    second = {"OrderId__c": orders[0].order_id, "IdemKey__c": "approval-2"}
    publish_events_admin(sandbox, [*(event_payload(o) for o in orders), second])
    order_ids = [o.order_id for o in orders]
    wait_until(settled(sandbox, services.ledger, order_ids), timeout_s=120)

    ledger = services.ledger
    runs = [r for oid in order_ids for r in ledger.runs.get_many([str(i) for i in ledger.orders.runs(oid)])]
    assert len(runs) == 6
    by_state = Counter(r.state.value for r in runs)
    assert by_state[RunState.FAILED.value] == 1
    assert by_state[RunState.DONE.value] == 4
    began = sum(1 for r in runs if r.state in (RunState.DONE, RunState.FAILED, RunState.SUPERSEDED))

    def agrees() -> bool:
        ended = api.values("sum by (outcome) (provisioning_runs_ended_total)", "outcome")
        return (
            all(ended.get(state, 0) == n for state, n in by_state.items())
            and sum(ended.values()) == len(runs)
            and api.scalar("sum(provisioning_runs_started_total)") == began
            and api.scalar("sum(listener_events_received_total)") == len(orders) + 1
        )

    wait_until(agrees, timeout_s=AGREE_TIMEOUT_S)
    failed = api.values("sum by (step) (provisioning_runs_failed_total{cause='permanent'}) > 0", "step")
    assert failed == {"validate_payment": 1}
    done = by_state[RunState.DONE.value]
    steps_done = api.values("sum by (step) (provisioning_step_duration_seconds_count)", "step")
    assert steps_done["send_email"] == done
    assert steps_done["validate_payment"] == done
    latency_count = api.scalar('sum(provisioning_activation_latency_seconds_count{origin="event"})')
    assert latency_count == done
    p95 = api.scalar("histogram_quantile(0.95, sum by (le) (provisioning_activation_latency_seconds_bucket))")
    assert p95 is not None
    assert 0 < p95 < 120
    assert api.scalar("max(provisioning_failed_runs)") == 1
    stock = services.inventory.stock()
    assert api.values("max by (state) (provisioning_esim_stock)", "state") == {
        "free": stock.free,
        "claimed": stock.claimed,
        "used": stock.used,
    }
    assert api.scalar("max(provisioning_listener_leader)") == 1
    assert api.scalar("sum(listener_is_leader)") == 1
    targets = {"provisioning": 1, "listener": 1, "flower": 1}
    wait_until(lambda: api.values("up", "job") == targets, timeout_s=30)
    succeeded = api.values(
        'sum by (worker) (flower_events_total{type="task-succeeded",task="provisioning.validate_payment"})',
        "worker",
    )
    # Flower counts task executions: a message redelivered after a slow ack runs (and succeeds) again.
    assert sum(succeeded.values()) >= done

    # Every dashboard query and every rule is valid PromQL for this Prometheus.
    for title, expr in dashboard_queries():
        requests_ok = requests.get(
            api.base + "/api/v1/query", params={"query": grafana_to_promql(expr)}, timeout=10
        ).json()
        assert requests_ok["status"] == "success", (title, expr, requests_ok)

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = api.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = wait_until(rules_evaluated, timeout_s=90)
    assert len(rules) == len(load_rules())
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]

    # The sandbox loads few spare ICCIDs: fewer free than ESIM_STOCK_WARN_THRESHOLD, so the alert is pending.
    def alerts() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in api.get("/api/v1/alerts")["alerts"]}

    def expected_alerts() -> bool:
        active = alerts()
        return active.get("EsimStockLow") in ("pending", "firing") and "NoLeaderListener" not in active

    # The first evaluations may predate the first scrapes: wait for the rules to see the data.
    wait_until(expected_alerts, timeout_s=30)
