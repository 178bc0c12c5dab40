"""The Celery plumbing: the app factory and the base task every provisioning task uses.

Configuration is lazy: importing this module (as ``celery -A tasks`` does) reads
no environment. The first access to the configuration builds :class:`Settings`
once for the process, and with it ``celeryconfig.build``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, signals
from celery.exceptions import Retry

import celeryconfig
from provisioning.core import tracing
from provisioning.core.cpus import parse_cpu_list, pin_process
from provisioning.core.logs import bind_run, configure_logging, get_logger, unbind_run
from provisioning.core.settings import Settings, load_settings
from provisioning.runs.chain import CHAIN, Chain
from provisioning.runs.lifecycle import RunFailed
from tasks.liveness import Liveness

log = get_logger(__name__)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

# The step tasks (tasks/steps.py registers one per row of the step table) and the failure write-back's.
TASK_MODULES: tuple[str, ...] = ("tasks.steps", "tasks.writeback")

# Pools a worker of ours refuses to start with, and why (docs/operations.md, "Scaling workers").
UNSUPPORTED_POOLS: dict[str, str] = {
    "gevent": (
        "Celery patches the standard library too late for our clients (every HTTPS call fails with "
        "RecursionError), and patched earlier a gevent worker of 20 ran at 9% of a threads worker's "
        "rate on Redis and on RabbitMQ (docs/benchmarks.md, 'Wave 3, sixth run')"
    ),
    "eventlet": "it patches the standard library as gevent does, and is not tested with our clients",
}


class UnsupportedPool(SystemExit):
    """A worker started with a pool from UNSUPPORTED_POOLS: it exits before taking any task."""


def refuse_unsupported_pool(pool: Any) -> None:
    """Raise UnsupportedPool when ``pool`` (``--pool``'s value, its alias or class) is unsupported."""
    name = (
        pool
        if isinstance(pool, str)
        else f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}"
    )
    for unsupported, why in UNSUPPORTED_POOLS.items():
        if unsupported in name.lower():
            raise UnsupportedPool(
                f"--pool {unsupported} is not supported: {why}. "
                "Start the worker with --pool threads (the Procfile's: --pool threads --concurrency 20), "
                "or prefork; see docs/operations.md, 'Scaling workers'."
            )


class ProvisioningCelery(Celery):
    """A Celery app that carries the process's Settings and its lazily built services."""

    def __init__(
        self,
        settings: Settings | None = None,
        chain: Chain = CHAIN,
        *,
        span_exporter: SpanExporter | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("include", list(TASK_MODULES))
        kwargs.setdefault("task_cls", "tasks.app:ProvisioningTask")
        super().__init__("provisioning", **kwargs)
        self._settings = settings
        self.chain = chain
        # Where a worker's spans go instead of TRACING_EXPORTER's (a test's in-memory exporter).
        self.span_exporter = span_exporter
        self._services: Any = None
        self._lock = threading.Lock()
        self.add_defaults(lambda: celeryconfig.build(self.settings))

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = load_settings()
        return self._settings

    @property
    def services(self) -> Any:
        """This process's clients, ledger and Redis connection (built on first use, after any fork)."""
        if self._services is None:
            from provisioning.runs.services import Services

            with self._lock:
                if self._services is None:
                    self._services = Services(self.settings, self.chain)
        return self._services

    def reset_services(self) -> None:
        with self._lock:
            self._services = None


class ProvisioningTask(Task):
    """Base task: every provisioning task takes a run id first and logs under it."""

    app: ProvisioningCelery
    # A run that ends failed is an expected outcome (reason on the Order and in the ledger):
    # Celery logs it in one line, without a traceback; the task still shows failed in Flower.
    throws = (RunFailed,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (args and isinstance(args[0], str)):
            return super().__call__(*args, **kwargs)
        bind_run(args[0])
        try:
            if not tracing.enabled():
                return super().__call__(*args, **kwargs)
            # The run's trace goes on here: a child of the span that sent this message (its headers).
            with tracing.run_span(
                f"run/{self.name}",
                args[0],
                parent=tracing.carrier(lambda name: getattr(self.request, name, None)),
                kind="consumer",
                attributes={
                    "celery.task_name": str(self.name),
                    "celery.retries": int(self.request.retries or 0),
                },
                expected=(Retry,),
            ):
                return super().__call__(*args, **kwargs)
        finally:
            unbind_run()

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's retry, its message carrying the run's trace on (a child of this attempt)."""
        carried = tracing.headers()
        if carried is not None:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **carried}
        return super().retry(*args, **kwargs)


def create_app(
    settings: Settings | None = None, chain: Chain = CHAIN, *, span_exporter: SpanExporter | None = None
) -> ProvisioningCelery:
    """The Celery app; without ``settings`` they are loaded from the environment on first use.

    A worker of it traces its runs when TRACING_EXPORTER asks (or ``span_exporter`` is given).
    """
    app = ProvisioningCelery(settings, chain, span_exporter=span_exporter)

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        configure_logging(app.settings)

    @signals.worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        # Connections must not be shared across a fork.
        app.reset_services()

    # The liveness heartbeat `provisioning worker probe` reads (tasks/liveness.py).
    app.steps["consumer"].add(Liveness)

    @signals.worker_init.connect(weak=False)
    def _pool(sender: Any = None, **_: Any) -> None:
        # Before the pool is built: an unsupported one ends the worker here, with why and what to use.
        if sender is not None and getattr(sender, "app", None) is app:
            refuse_unsupported_pool(getattr(sender, "pool_cls", None) or "")

    @signals.worker_init.connect(weak=False)
    def _cpus(sender: Any = None, **_: Any) -> None:
        # Before the pool starts its threads (or forks its children): they inherit the CPUs.
        if sender is not None and getattr(sender, "app", None) is app:
            pin_worker(app.settings)

    @signals.worker_init.connect(weak=False)
    def _tracing(sender: Any = None, **_: Any) -> None:
        # In the main process, before any pool forks (the span exporter's thread restarts in a child).
        if sender is not None and getattr(sender, "app", None) is not app:
            return
        tracing.start(app.settings, "provisioning-worker", exporter=app.span_exporter)

    @signals.worker_process_shutdown.connect(weak=False)
    def _flush_spans(**_: Any) -> None:
        # A pool's child exits without atexit handlers: its last spans go now.
        tracing.flush()

    @signals.worker_shutdown.connect(weak=False)
    def _stop_tracing(sender: Any = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is not app:
            return
        tracing.stop()

    register_diagnostics(app)
    return app


def pin_worker(settings: Settings) -> None:
    """Keep the worker on WORKER_CPUS, if set (provisioning/core/cpus.py says why)."""
    if settings.worker_cpus is None:
        return
    threads = pin_process(parse_cpu_list(settings.worker_cpus))
    log.info("worker_cpus_pinned", cpus=settings.worker_cpus, threads=threads)


def register_diagnostics(app: ProvisioningCelery) -> None:
    # shared=False: registered on this app only (a shared task would be added to every app made after
    # it, and a second app of the process would find the name taken by another callable).
    @app.task(name="provisioning.ping", bind=True, shared=False)
    def ping(self: Task) -> dict[str, str]:
        """Answers with the worker's name: proves a worker consumes our queue (``provisioning check``)."""
        return {"worker": str(self.request.hostname)}
