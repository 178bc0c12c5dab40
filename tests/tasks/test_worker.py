"""A real ``celery -A tasks worker`` process on the real Redis executes our tasks."""

import os
from pathlib import Path

from provisioning.sandbox.processes import WORKER_READY_TIMEOUT_S, start_worker, worker
from tasks.app import create_app


def test_a_real_worker_process_on_redis_executes_a_task(settings, tmp_path: Path):
    settings = settings.model_copy(update={"celery_result_backend": "redis://127.0.0.1:6379/2"})
    worker = start_worker(settings.to_env(), tmp_path, name="w-ping", concurrency=2)
    try:
        app = create_app(settings)
        result = app.send_task("provisioning.ping", queue=settings.celery_queue)
        answer = result.get(timeout=30)
        assert answer["worker"].startswith("w-ping@")
    finally:
        assert worker.stop() == 0


def _thread_cpus(pid: int) -> dict[str, str]:
    """Each thread of ``pid``: the CPUs the kernel lets it run on (Cpus_allowed_list)."""
    lists = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        lists[tid] = next(
            line.split(":", 1)[1].strip()
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list:")
        )
    return lists


def test_a_worker_given_worker_cpus_runs_every_thread_of_its_pool_on_them(settings, tmp_path: Path):
    cpu = max(os.sched_getaffinity(0))
    settings = settings.model_copy(
        update={"celery_result_backend": "redis://127.0.0.1:6379/2", "worker_cpus": str(cpu)}
    )
    proc = start_worker(settings.to_env(), tmp_path, name="w-cpus", concurrency=4)
    try:
        app = create_app(settings)
        # The pool starts its threads as tasks come (a thread pool executor): some have run by now.
        results = [app.send_task("provisioning.ping", queue=settings.celery_queue) for _ in range(8)]
        assert all(r.get(timeout=30)["worker"].startswith("w-cpus@") for r in results)
        lists = _thread_cpus(proc.pid)
        # The main thread and the threads started after the pin (a pool thread among them).
        assert len(lists) >= 2
        assert set(lists.values()) == {str(cpu)}
        assert f"cpus={cpu}" in proc.log_text()  # worker_cpus_pinned, with the CPUs
    finally:
        assert proc.stop() == 0


def test_a_worker_given_a_cpu_it_may_not_run_on_exits_before_taking_tasks_saying_which_it_may(
    settings, tmp_path: Path
):
    absent = max(os.sched_getaffinity(0)) + 1000
    worker_proc = worker(
        settings.model_copy(update={"worker_cpus": str(absent)}).to_env(), tmp_path, name="w-nocpu"
    ).start()
    assert worker_proc.proc is not None
    try:
        assert worker_proc.proc.wait(WORKER_READY_TIMEOUT_S) != 0
    finally:
        worker_proc.stop()  # one that did not exit is not left running
    log = worker_proc.log_text()
    assert f"WORKER_CPUS={absent}: CPU {absent} is not available to this process" in log
    assert "give WORKER_CPUS among those" in log
    assert " ready." not in log
