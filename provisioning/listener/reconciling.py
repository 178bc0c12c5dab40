"""The leader's reconciler: the sweeps of :mod:`provisioning.runs.reconciler`, each on its interval.

A backfill query that fails (Salesforce down, or refusing: a login with a key the app does not
know, the API allocation used up) is tried again after its interval, or later when it keeps
failing: the wait grows as :mod:`provisioning.salesforce.reconnect`'s ``REFUSED`` kind says, up to
``SF_REFUSED_RETRY_MAX_S``, never shorter than the interval. Its log is the first failure (ERROR
for a refusal with its remedy, WARNING for a transient error), then one summary line per
interval, then one line when a query works again.
"""

from __future__ import annotations

import threading
import time

from celery import Celery

from provisioning.core.errors import TransientError
from provisioning.core.logs import get_logger
from provisioning.core.repeating import RepeatingFailure
from provisioning.core.settings import Settings
from provisioning.listener.metrics import ListenerMetrics
from provisioning.runs.reconciler import backfill_orders, repair_failure_writebacks, resume_stale
from provisioning.runs.services import Services
from provisioning.salesforce.reconnect import Failure, ReconnectPolicy, Reconnects

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
        cap_s = settings.sf_refused_retry_max_s
        self._backfill_waits = Reconnects(ReconnectPolicy(refused_cap_s=cap_s))
        self._backfill_lines = RepeatingFailure(log, "backfill_sweep_failed", interval_s=cap_s)

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
                next_backfill = time.monotonic() + self.backfill(backfill_every_s)

    def backfill(self, every_s: float) -> float:
        """One backfill sweep; the seconds until the next (its interval, or longer after failures)."""
        try:
            started = backfill_orders(self.services, self.publisher, self.settings.reconcile_orders_grace_s)
        except Exception as exc:
            self.metrics.backfill_failures.inc()
            wait_s = max(float(every_s), self._backfill_waits.wait_s(Failure.REFUSED))
            self._backfill_lines.failed(
                f"{type(exc).__name__}:{getattr(exc, 'error_code', None)}",
                level="warning" if isinstance(exc, TransientError) else "error",
                error=f"{type(exc).__name__}: {exc}",
                remedy=getattr(exc, "remedy", None),
                retry_in_s=round(wait_s, 1),
            )
            return wait_s
        self._backfill_waits.reset()
        self._backfill_lines.recovered()
        self.metrics.backfill_queries.inc()
        self.metrics.backfilled.inc(len(started))
        return float(every_s)
