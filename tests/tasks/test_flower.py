"""Flower, against a real worker, shows our tasks with ids only: no e-mail address or name."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.processes import free_port
from provisioning.sandbox.scenario import seed_orders, wait_until

CELERY = str(Path(sys.executable).with_name("celery"))


def test_flower_shows_a_run_as_one_task_and_a_retrying_step_as_its_own_with_ids_only(
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
        smooth, bumpy = seed_orders(sandbox, services.inventory, count=2, esim_share=1.0)
        workers(concurrency=2)
        publisher = make_publisher(stack_settings)

        def run_tasks(run_id: str, count: int) -> list[dict[str, Any]] | None:
            tasks = requests.get(base + "/api/tasks", timeout=5).json()
            mine = [t for t in tasks.values() if run_id in (t.get("args") or "")]
            done = len(mine) == count and all(t["state"] == "SUCCESS" for t in mine)
            return mine if done else None

        # A run that meets no trouble goes through its five steps in the task the listener sent.
        publish_run(publisher, smooth.run_id)
        (task,) = wait_until(lambda: run_tasks(smooth.run_id, 1), timeout_s=90)
        assert task["name"] == "provisioning.validate_payment"
        assert task["result"].startswith(
            "{'steps': ['validate_payment', 'activate_esim', 'create_whmcs_order', "
            "'update_salesforce', 'send_email']"
        )

        # A step that must wait goes on as a task of its own, named by its step.
        sandbox.admin("whmcs").post("/__admin/faults", {"force": {"AddOrder": ["error"]}})
        publish_run(publisher, bumpy.run_id)
        first, retried = sorted(
            wait_until(lambda: run_tasks(bumpy.run_id, 2), timeout_s=90), key=lambda t: t["received"]
        )
        assert first["name"] == "provisioning.validate_payment"
        assert "'retrying': 'create_whmcs_order'" in first["result"]
        assert retried["name"] == "provisioning.create_whmcs_order"
        assert "'steps': ['create_whmcs_order', 'update_salesforce', 'send_email']" in retried["result"]

        personal = ["@example.test", "Customer0", "customer0", "Customer1", "customer1", "LPA:"]
        for order, shown_tasks in ((smooth, [task]), (bumpy, [first, retried])):
            for shown_task in shown_tasks:
                assert shown_task["args"] == repr((order.run_id,))
                shown = " ".join(str(shown_task.get(k) or "") for k in ("args", "kwargs", "result"))
                assert not any(p in shown for p in personal), shown
    finally:
        flower.terminate()
        flower.wait(10)
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
