"""Shared fixtures: real Redis, a namespace per test, real worker processes.

Nothing here skips: a test that needs Redis or RabbitMQ fails when it is not
there (CI starts Redis in .ci/run; RabbitMQ runs on every machine of this kind).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from provisioning.core.logs import configure_logging
from provisioning.core.settings import Settings

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
        # Each test's workers write their liveness heartbeats here, never in the machine's shared default.
        worker_liveness_dir=tmp_path / "liveness",
    )


# -- the whole stack: sandbox, settings pointing at it, worker processes ------------------------

from collections.abc import Callable  # noqa: E402

from provisioning.runs.services import Services  # noqa: E402
from provisioning.sandbox.processes import ManagedProcess, start_worker  # noqa: E402
from provisioning.sandbox.runner import Sandbox  # noqa: E402

# End-to-end waits: generous, since CI machines are shared; a pass is usually seconds.
E2E_TIMEOUT_S = 120.0


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path / "sandbox", seed=1234, long_poll_s=5.0, pubsub_keepalive_s=5.0).start()
    yield box
    box.stop()


@pytest.fixture
def stack_settings(settings: Settings, sandbox: Sandbox) -> Settings:
    values = {k.lower(): v for k, v in sandbox.env().items()}
    fast = {
        "task_retry_backoff_s": 0.2,
        "task_retry_backoff_max_s": 2.0,
        "run_lease_ttl_s": 10,
        "celery_visibility_timeout_s": 10,
    }
    return Settings(_env_file=None, **{**settings.model_dump(), **values, **fast})  # type: ignore[call-arg]


@pytest.fixture
def rabbit_settings(stack_settings: Settings) -> Iterator[Settings]:
    """The stack's settings with RabbitMQ as the broker; the test's queue and exchange deleted after."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is required at {RABBITMQ_URL} and is not answering: {exc}")
    settings = stack_settings.model_copy(update={"celery_broker_url": RABBITMQ_URL})
    yield settings
    with Connection(RABBITMQ_URL) as conn:
        channel = conn.channel()
        channel.queue_delete(settings.celery_queue)
        channel.exchange_delete(settings.celery_queue)


@pytest.fixture
def services(stack_settings: Settings) -> Iterator[Services]:
    svc = Services(stack_settings)
    yield svc
    svc.redis.close()


@pytest.fixture
def workers(stack_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start real ``celery -A tasks worker`` processes: ``workers(name="w1", concurrency=4)``."""
    started: list[ManagedProcess] = []

    def start(settings: Settings | None = None, **kwargs: object) -> ManagedProcess:
        env = (settings or stack_settings).to_env()
        kwargs.setdefault("name", f"w{len(started) + 1}")
        proc = start_worker(env, tmp_path / "logs", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def listeners(
    stack_settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> Iterator[Callable[..., ManagedProcess]]:
    """Start real ``provisioning listen`` processes, each with its health endpoint on a free port.

    ``wait="healthy"`` (default) returns once /healthz answers 200 (leader, subscribed,
    able to publish) and the simulator holds a subscription, so that an event published next
    reaches a listener that starts at LATEST (its Pub/Sub stream is "connected" once opened, a
    moment before the server registers it); ``wait="standby"`` once it logs that it waits as a
    standby.
    """
    import requests

    from provisioning.sandbox.processes import free_port, listener
    from provisioning.sandbox.scenario import wait_until

    started: list[ManagedProcess] = []

    def healthy(port: int) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def registered(transport: str) -> bool:
        stats = sandbox.admin("salesforce").get("/__admin/stats")
        if transport == "pubsub":
            return bool(stats["pubsub"]["open_streams"])
        return any(client["subscriptions"] for client in stats["clients"])

    def start(
        settings: Settings | None = None,
        *,
        name: str | None = None,
        extra: list[str] | None = None,
        wait: str | None = "healthy",
    ) -> ManagedProcess:
        port = free_port()
        env = (settings or stack_settings).to_env()
        argv = ["--health-port", str(port), *(extra or [])]
        proc = listener(
            env, tmp_path / "logs", name=name or f"listener{len(started) + 1}", extra=argv
        ).start()
        proc.health_port = port  # type: ignore[attr-defined]
        started.append(proc)
        if wait == "healthy":
            wait_until(lambda: healthy(port) or not proc.alive(), timeout_s=60)
            assert proc.alive(), proc.log_text()[-3000:]
            wait_until(lambda: registered((settings or stack_settings).sf_events_transport), timeout_s=60)
        elif wait == "standby":
            proc.wait_for_log("listener_standby", 60)
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- replication: a private primary with one replica (never the shared Redis) -------------------


REPLICA_PROBE_TIMEOUT_MS = 10_000


@pytest.fixture
def replicated_redis(tmp_path: Path) -> Iterator[tuple[object, object]]:
    """(primary, replica): two private ``redis-server`` processes, the replica in sync."""
    from provisioning.core.replication import online_replicas
    from provisioning.sandbox.redis_server import REPLICATION_OPTIONS, RedisServer
    from provisioning.sandbox.scenario import wait_until

    primary = RedisServer(tmp_path / "primary", appendonly=True, options=REPLICATION_OPTIONS).start()
    replica = RedisServer(tmp_path / "replica", appendonly=True, replica_of=primary.address).start()
    try:
        client = primary.client()
        wait_until(lambda: online_replicas(client.info("replication")) == 1, timeout_s=15)
        # Past the replica's first AOF rewrite (it stalls acknowledgements on a busy machine), and
        # acknowledging: one write confirmed with a generous timeout.
        on_replica = replica.client()
        wait_until(lambda: on_replica.info("persistence")["aof_rewrite_in_progress"] == 0, timeout_s=30)
        on_replica.close()
        client.set("replication-probe", "1")
        assert client.wait(1, REPLICA_PROBE_TIMEOUT_MS) == 1
        client.close()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


class LogLines:
    """JSON log lines written while the fixture is active."""

    def __init__(self, buffer: io.StringIO) -> None:
        self.buffer = buffer

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.buffer.getvalue().splitlines() if line.strip()]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.all() if line.get("event") == event]

    def at(self, level: str, logger_prefix: str = "provisioning.") -> list[dict[str, Any]]:
        """Our lines at ``level`` (other libraries' lines, e.g. asyncio's, are left out)."""
        return [
            line
            for line in self.all()
            if line.get("level") == level and str(line.get("logger", "")).startswith(logger_prefix)
        ]


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging(Settings(_env_file=None, log_format="json"), stream=buffer)  # type: ignore[call-arg]
    yield LogLines(buffer)
    root.handlers[:] = handlers
    root.setLevel(level)
