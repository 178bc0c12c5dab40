"""The leader's reconciler: the sweeps of :mod:`provisioning.runs.reconciler`, each on its interval."""

from __future__ import annotations

import threading
import time

from celery import Celery

from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.listener.metrics import ListenerMetrics
from provisioning.runs.reconciler import backfill_orders, repair_failure_writebacks, resume_stale
from provisioning.runs.services import Services

log = get_logger(__name__)


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        *,
        services: Services,
        publisher: Celery,
        metrics: ListenerMetrics,
        idle_s: float,
    ) -> None:
        self.settings = settings
        self.services = services
        self.publisher = publisher
        self.metrics = metrics
        self.idle_s = idle_s

    def loop(self, done: threading.Event) -> None:
        """Sweep every RECONCILE_INTERVAL_S until ``done``; the backfill every RECONCILE_ORDERS_INTERVAL_S."""
        backfill_every_s = self.settings.reconcile_orders_interval_s
        # The first backfill comes one interval after taking the lead: the events in hand go first.
        next_backfill = time.monotonic() + backfill_every_s
        while not done.wait(self.settings.reconcile_interval_s):
            try:
                self.metrics.resumed.inc(len(resume_stale(self.services, self.publisher, self.idle_s)))
                self.metrics.writebacks.inc(len(repair_failure_writebacks(self.services, self.idle_s)))
            except Exception as exc:
                log.warning("reconciler_sweep_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if backfill_every_s and time.monotonic() >= next_backfill:
                next_backfill = time.monotonic() + backfill_every_s
                try:
                    started = backfill_orders(
                        self.services, self.publisher, self.settings.reconcile_orders_grace_s
                    )
                except Exception as exc:
                    self.metrics.backfill_failures.inc()
                    log.warning("backfill_sweep_failed", error=f"{type(exc).__name__}: {exc}")
                    continue
                self.metrics.backfill_queries.inc()
                self.metrics.backfilled.inc(len(started))
