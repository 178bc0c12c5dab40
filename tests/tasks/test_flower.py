"""Flower, against a real worker, shows a run as its chain of step tasks, with ids only."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.processes import free_port
from provisioning.sandbox.scenario import seed_orders, wait_until

CELERY = str(Path(sys.executable).with_name("celery"))
PERSONAL = ["@example.test", "Customer0", "customer0", "Customer1", "customer1", "Customer2", "LPA:"]


def test_flower_shows_each_step_as_its_own_task_with_its_retries_and_its_failure_and_ids_only(
    sandbox, stack_settings, services, workers, tmp_path
):
    port = free_port()
    env = {**os.environ, **stack_settings.to_env(), "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [CELERY, "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base + "/healthcheck"), timeout_s=60)
        smooth, bumpy, doomed = seed_orders(sandbox, services.inventory, count=3, esim_share=1.0)
        workers(concurrency=2)
        publisher = make_publisher(stack_settings)

        def run_tasks(run_id: str, count: int, last_state: str = "SUCCESS") -> list[dict[str, Any]] | None:
            tasks = requests.get(base + "/api/tasks", timeout=5).json()
            mine = sorted(
                (t for t in tasks.values() if run_id in (t.get("args") or "")), key=lambda t: t["received"]
            )
            settled = len(mine) == count and all(t["state"] == "SUCCESS" for t in mine[:-1])
            return mine if settled and mine[-1]["state"] == last_state else None

        # A run is its five steps, each a task named after it, each the child of the one before.
        publish_run(publisher, smooth.run_id)
        tasks = wait_until(lambda: run_tasks(smooth.run_id, len(CHAIN)), timeout_s=90)
        assert [t["name"] for t in tasks] == [spec.task_name for spec in CHAIN]
        assert {t["root_id"] for t in tasks} == {tasks[0]["uuid"]}
        assert [t["parent_id"] for t in tasks[1:]] == [t["uuid"] for t in tasks[:-1]]
        assert "'whmcs_order_id'" in tasks[2]["result"]
        assert "'next': 'create_whmcs_order'" in tasks[1]["result"]

        # A step that must wait retries as itself: the same task, its retries counted by Flower.
        sandbox.admin("whmcs").post("/__admin/faults", {"force": {"AddOrder": ["error"]}})
        publish_run(publisher, bumpy.run_id)
        retried = wait_until(lambda: run_tasks(bumpy.run_id, len(CHAIN)), timeout_s=90)
        by_name = {t["name"]: t for t in retried}
        assert by_name["provisioning.create_whmcs_order"]["retries"] >= 1
        assert all(
            t["retries"] == 0 for name, t in by_name.items() if name != "provisioning.create_whmcs_order"
        )

        # A step that fails fails as itself, and nothing after it is sent.
        sandbox.admin("whmcs").post("/__admin/reset")
        sandbox.admin("whmcs").post(
            "/__admin/clients",
            [
                {
                    "id": doomed.whmcs_client_id,
                    "firstname": "A",
                    "lastname": "B",
                    "email": "a@example.test",
                    "paymethods": [{"type": "CreditCard", "expiry_date": "12/30"}],
                }
            ],
        )
        publish_run(publisher, doomed.run_id)
        failed = wait_until(lambda: run_tasks(doomed.run_id, 3, last_state="FAILURE"), timeout_s=90)
        assert [t["name"] for t in failed] == [spec.task_name for spec in CHAIN.specs[:3]]
        assert failed[-1]["exception"].startswith("RunFailed('create_whmcs_order: ")

        for order, shown_tasks in ((smooth, tasks), (bumpy, retried), (doomed, failed)):
            for shown_task in shown_tasks:
                assert shown_task["args"] == repr((order.run_id,))
                shown = " ".join(
                    str(shown_task.get(k) or "") for k in ("args", "kwargs", "result", "exception")
                )
                assert not any(p in shown for p in PERSONAL), shown
    finally:
        flower.terminate()
        flower.wait(10)
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
