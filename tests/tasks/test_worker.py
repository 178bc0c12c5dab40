"""A real ``celery -A tasks worker`` process on the real Redis executes our tasks."""

from pathlib import Path

from provisioning.sandbox.processes import start_worker
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
