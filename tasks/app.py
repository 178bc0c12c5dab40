"""The Celery plumbing: the app factory and the base task every provisioning task uses.

Configuration is lazy: importing this module (as ``celery -A tasks`` does) reads
no environment. The first access to the configuration builds :class:`Settings`
once for the process, and with it ``celeryconfig.build``.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, Task, signals

import celeryconfig
from provisioning.core.logs import bind_run, configure_logging, unbind_run
from provisioning.core.settings import Settings, load_settings
from provisioning.runs.chain import CHAIN, Chain
from provisioning.runs.lifecycle import RunFailed
from tasks.liveness import Liveness

# The step tasks (tasks/steps.py registers one per row of the step table) and the failure write-back's.
TASK_MODULES: tuple[str, ...] = ("tasks.steps", "tasks.writeback")


class ProvisioningCelery(Celery):
    """A Celery app that carries the process's Settings and its lazily built services."""

    def __init__(self, settings: Settings | None = None, chain: Chain = CHAIN, **kwargs: Any) -> None:
        kwargs.setdefault("include", list(TASK_MODULES))
        kwargs.setdefault("task_cls", "tasks.app:ProvisioningTask")
        super().__init__("provisioning", **kwargs)
        self._settings = settings
        self.chain = chain
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
        if args and isinstance(args[0], str):
            bind_run(args[0])
        try:
            return super().__call__(*args, **kwargs)
        finally:
            unbind_run()


def create_app(settings: Settings | None = None, chain: Chain = CHAIN) -> ProvisioningCelery:
    """The Celery app; without ``settings`` they are loaded from the environment on first use."""
    app = ProvisioningCelery(settings, chain)

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        configure_logging(app.settings)

    @signals.worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        # Connections must not be shared across a fork.
        app.reset_services()

    # The liveness heartbeat `provisioning worker probe` reads (tasks/liveness.py).
    app.steps["consumer"].add(Liveness)
    register_diagnostics(app)
    return app


def register_diagnostics(app: ProvisioningCelery) -> None:
    @app.task(name="provisioning.ping", bind=True)
    def ping(self: Task) -> dict[str, str]:
        """Answers with the worker's name: proves a worker consumes our queue (``provisioning check``)."""
        return {"worker": str(self.request.hostname)}
