"""Flower, against a real worker, shows our tasks with ids only: no e-mail address or name."""

import os
import subprocess
import sys
from pathlib import Path

import requests

from provisioning.publishing import make_publisher, publish_run
from provisioning.sandbox.processes import free_port
from provisioning.sandbox.scenario import seed_orders, wait_until

CELERY = str(Path(sys.executable).with_name("celery"))


def test_flower_shows_the_tasks_of_a_run_with_ids_only(sandbox, stack_settings, services, workers, tmp_path):
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
        (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
        workers(concurrency=2)
        publish_run(make_publisher(stack_settings), order.run_id)

        def run_tasks():
            tasks = requests.get(base + "/api/tasks", timeout=5).json()
            mine = [t for t in tasks.values() if order.run_id in (t.get("args") or "")]
            names = {t["name"] for t in mine}
            return mine if len(names) == 5 and all(t["state"] == "SUCCESS" for t in mine) else None

        mine = wait_until(run_tasks, timeout_s=90)
        names = {t["name"] for t in mine}
        assert names == {
            "provisioning.validate_payment",
            "provisioning.activate_esim",
            "provisioning.create_whmcs_order",
            "provisioning.update_salesforce",
            "provisioning.send_email",
        }
        personal = ["@example.test", "Customer0", "customer0", "LPA:"]
        for task in mine:
            assert task["args"] == repr((order.run_id,))
            shown = " ".join(str(task.get(k) or "") for k in ("args", "kwargs", "result"))
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
