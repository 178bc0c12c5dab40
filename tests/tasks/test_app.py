"""The Celery plumbing's own rules (tasks/app.py): the pools a worker of ours starts with."""

import pytest

from tasks.app import UnsupportedPool, create_app, refuse_unsupported_pool


@pytest.mark.parametrize("pool", ["gevent", "eventlet", "celery.concurrency.gevent:TaskPool"])
def test_a_worker_asked_for_a_monkey_patching_pool_stops_before_its_pool_is_built(settings, pool):
    app = create_app(settings.model_copy(update={"celery_broker_url": "memory://"}))
    with pytest.raises(UnsupportedPool) as refused:
        app.WorkController(hostname="w-pool@test", pool_cls=pool)
    message = str(refused.value)
    name = "eventlet" if "eventlet" in pool else "gevent"
    assert f"--pool {name} is not supported" in message
    assert "--pool threads" in message
    assert "docs/operations.md" in message
    # It ends the worker's process: a SystemExit, with the message as what the process prints.
    assert isinstance(refused.value, SystemExit)


def test_a_pool_class_is_refused_by_its_module():
    class TaskPool:
        pass

    TaskPool.__module__ = "celery.concurrency.gevent"
    with pytest.raises(UnsupportedPool, match="--pool gevent is not supported"):
        refuse_unsupported_pool(TaskPool)


@pytest.mark.parametrize("pool", ["threads", "prefork", "solo", "celery.concurrency.thread:TaskPool"])
def test_the_pools_we_run_on_are_accepted(pool):
    refuse_unsupported_pool(pool)
