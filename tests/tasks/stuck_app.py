"""A worker app whose one task outlives its time limit (tests/tasks/test_liveness.py starts it)."""

from __future__ import annotations

import time

from tasks.app import create_app

app = create_app()

# The threads pool never enforces a time limit: the task just goes on, like a thread stuck in a call.
STUCK_TIME_LIMIT_S = 2


@app.task(name="provisioning.test_outlives_its_limit", time_limit=STUCK_TIME_LIMIT_S)
def outlives_its_limit(seconds: float) -> None:
    time.sleep(seconds)
