"""Shared fixtures: real Redis, a namespace per test, real worker processes.

Nothing here skips: a test that needs Redis or RabbitMQ fails when it is not
there (CI starts Redis in .ci/run; RabbitMQ runs on every machine of this kind).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from provisioning.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
BROKER_URL = "redis://127.0.0.1:6379/1"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} and is not answering: {exc}")
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A unique ledger prefix and queue name; its keys are deleted afterwards."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    for db_url in (REDIS_URL, BROKER_URL):
        client = redis.Redis.from_url(db_url)
        keys = list(client.scan_iter(f"*{ns}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def settings(namespace: str, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=REDIS_URL,
        celery_broker_url=BROKER_URL,
        ledger_prefix=namespace,
        celery_queue=f"q-{namespace}",
        log_format="json",
    )
