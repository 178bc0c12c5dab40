"""``provisioning metrics``: the runs' metrics for Prometheus, read from Redis at scrape time.

One scrape target for every worker, whatever their hosts and pools: the workers
count into Redis (:mod:`provisioning.ledger.metrics`), and this process reads those
counts, the ledger's registries, the eSIM stock and the listener's lock when
Prometheus asks (three Redis round trips per scrape). Any number of exporters
may run; they all report the same values, so scrape one. The listeners' own
``/metrics`` (one per replica) and Flower's ``/metrics`` (Celery's tasks) are the
other two targets; see docs/operations.md.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import click
import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from provisioning.core.cli_context import Context, pass_ctx
from provisioning.core.logs import get_logger
from provisioning.ledger import BEGIN, Origin, RunState
from provisioning.ledger.esim_status import EsimState
from provisioning.ledger.inventory import InventoryUnavailable
from provisioning.ledger.limits import BreakerState
from provisioning.ledger.metrics import (
    ACTIVATION_LATENCY,
    COMPENSATIONS,
    ESIM_NOTIFICATIONS,
    FAILURE_WRITEBACKS,
    HISTOGRAMS,
    RECONCILER_ACTIONS,
    RUNS_ENDED,
    RUNS_FAILED,
    RUNS_REQUEUED,
    RUNS_STARTED,
    STEP_WAITS,
    FailureCause,
    FailureWriteback,
    ReconcilerAction,
    Snapshot,
)
from provisioning.runs.cancellation import CANCELLATION
from provisioning.runs.chain import CHAIN
from provisioning.runs.services import Services
from provisioning.step.spec import System

log = get_logger(__name__)

# How often the exporter's main thread looks whether it was asked to stop.
STOP_POLL_S = 1.0

_FAILED_STEPS = (BEGIN, *CHAIN.names)
_ENDED = tuple(s.value for s in RunState if not s.unfinished)
_BREAKER_VALUES = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}


class LedgerCollector(Collector):
    """Reads the run metrics, the registries, the eSIM stock and the listener lock at scrape time."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.ledger = services.ledger
        self.channel = services.settings.sf_provision_event_channel

    def describe(self) -> list[Metric]:
        """Every family this collector exports (without samples): their names, for the tests and docs."""
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        try:
            data = self._read()
        except (redis.RedisError, InventoryUnavailable) as exc:
            log.warning("metrics_redis_unavailable", error=f"{type(exc).__name__}: {exc}")
            up = GaugeMetricFamily("provisioning_ledger_up", "1 when the ledger's Redis answered the scrape")
            up.add_metric([], 0)
            yield up
            return
        yield from self._families(data)

    def _read(self) -> dict[str, Any]:
        scrape = self.ledger.scrape(self.channel)
        sizes = scrape.sizes
        return {
            "snapshot": scrape.metrics,
            "unfinished": sizes.unfinished,
            "failed": sizes.failed,
            "writebacks": sizes.writebacks,
            "undelivered": sizes.undelivered,
            "quarantined": sizes.quarantined,
            "oldest_created": sizes.oldest_unfinished_created,
            "leader": scrape.leader,
            "stock": self.services.inventory.stock(),
            "breakers": self.ledger.limits.breakers([s.value for s in System]),
            "api_usage": self.ledger.limits.api_usage(),
            "esim_states": self.ledger.esim_status.counts(),
            "esim_not_installed": self.ledger.esim_status.count_pending(
                released_before=time.time() - self.services.settings.esim_not_installed_after_s
            ),
        }

    def _families(self, data: dict[str, Any] | None) -> Iterator[Metric]:
        """The families, with samples from ``data`` (None: names and help only)."""
        snap: Snapshot | None = data["snapshot"] if data else None
        now = time.time()

        def counter(
            name: str, doc: str, key: str, labels: list[str], values: list[tuple[str, ...]]
        ) -> Metric:
            family = CounterMetricFamily(name, doc, labels=labels)
            if snap is None:
                return family
            found = snap.counter(key)
            for combo in values:
                family.add_metric(list(combo), found.get(tuple(sorted(zip(labels, combo, strict=True))), 0.0))
            for label_key, value in found.items():
                combo = tuple(dict(label_key).get(label, "") for label in labels)
                if combo not in values:
                    family.add_metric(list(combo), value)
            return family

        def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            if data is not None and value is not None:
                family.add_metric(list((labels or {}).values()), value)
            return family

        yield gauge("provisioning_ledger_up", "1 when the ledger's Redis answered the scrape", 1.0)
        yield counter(
            "provisioning_runs_started",
            "Runs that began acting on their Order (the Order read, found Activating)",
            RUNS_STARTED,
            [],
            [()],
        )
        yield counter(
            "provisioning_runs_ended",
            "Runs that ended, by outcome: done, failed, skipped, joined, superseded, cancelled",
            RUNS_ENDED,
            ["outcome"],
            [(o,) for o in _ENDED],
        )
        yield counter(
            "provisioning_runs_failed",
            "Failed runs by the step they failed at and the cause: permanent or transient_exhausted",
            RUNS_FAILED,
            ["cause", "step"],
            [(c.value, s) for s in _FAILED_STEPS for c in FailureCause],
        )
        yield counter(
            "provisioning_runs_requeued",
            "Failed runs an operator requeued (CLI or console)",
            RUNS_REQUEUED,
            [],
            [()],
        )
        yield counter(
            "provisioning_reconciler_actions",
            "The reconciler's actions: resume (stale runs), writeback (failures), backfill (runs started)",
            RECONCILER_ACTIONS,
            ["action"],
            [(a.value,) for a in ReconcilerAction],
        )
        for spec in HISTOGRAMS:
            family = HistogramMetricFamily(spec.name, spec.help, labels=[spec.label])
            if snap is not None:
                hist = snap.histograms[spec.name]
                known = [o.value for o in Origin] if spec is ACTIVATION_LATENCY else list(CHAIN.names)
                for value in dict.fromkeys([*known, *hist.buckets]):
                    family.add_metric([value], hist.cumulative(value), sum_value=hist.sums.get(value, 0.0))
            yield family
        yield gauge(
            "provisioning_unfinished_runs",
            "Runs queued or running",
            data["unfinished"] if data else None,
        )
        oldest = data.get("oldest_created") if data else None
        yield gauge(
            "provisioning_oldest_unfinished_run_age_seconds",
            "Age (since creation) of the oldest run still queued or running; 0 when there is none",
            (now - oldest if oldest else 0.0) if data else None,
        )
        yield gauge(
            "provisioning_failed_runs",
            "Runs in the failed registry (provisioning failed)",
            data["failed"] if data else None,
        )
        yield gauge(
            "provisioning_failure_writebacks_pending",
            "Failed runs whose Order may not show Failed yet (the write-back's short schedule, then the "
            "reconciler, write it)",
            data["writebacks"] if data else None,
        )
        yield counter(
            "provisioning_failure_writebacks",
            "Tries of a failed run's write of Failed on the Order by the workers, by outcome: written, retried "
            "(refused for now, tried again in seconds), given_up (left to the reconciler)",
            FAILURE_WRITEBACKS,
            ["outcome"],
            [(o.value,) for o in FailureWriteback],
        )
        yield gauge(
            "provisioning_quarantined_events",
            "Events the listener rejected, kept for operators (provisioning quarantine)",
            data["quarantined"] if data else None,
        )
        yield gauge(
            "provisioning_undelivered_emails",
            "Orders whose welcome e-mail was refused (provisioning emails)",
            data["undelivered"] if data else None,
        )
        stock = GaugeMetricFamily(
            "provisioning_esim_stock", "ICCIDs in the eSIM inventory by state", labels=["state"]
        )
        if data is not None:
            for state in ("free", "claimed", "used"):
                stock.add_metric([state], getattr(data["stock"], state))
        yield stock
        yield gauge(
            "provisioning_esim_stock_warn_threshold",
            "ESIM_STOCK_WARN_THRESHOLD: fewer free ICCIDs than this is low",
            float(self.services.settings.esim_stock_warn_threshold),
        )
        states = GaugeMetricFamily(
            "provisioning_esim_profiles",
            "Released eSIM profiles by state, from the SM-DP+'s notifications: released, downloaded, installed, "
            "error (the download failed), cancelled",
            labels=["state"],
        )
        if data is not None:
            for state in EsimState:
                states.add_metric([state.value], float(data["esim_states"].get(state.value, 0)))
        yield states
        yield gauge(
            "provisioning_esim_not_installed",
            "Profiles released more than ESIM_NOT_INSTALLED_AFTER_S ago and not installed (nor cancelled)",
            data["esim_not_installed"] if data else None,
        )
        yield gauge(
            "provisioning_esim_not_installed_after_seconds",
            "ESIM_NOT_INSTALLED_AFTER_S: how long a released profile may wait for its installation",
            float(self.services.settings.esim_not_installed_after_s),
        )
        yield counter(
            "provisioning_esim_notifications",
            "ES2+ handleDownloadProgressInfo notifications received, by outcome: changed (the state moved), "
            "recorded, duplicate, unknown (no Order of ours released the ICCID), malformed, refused",
            ESIM_NOTIFICATIONS,
            ["outcome"],
            [(o,) for o in ("changed", "recorded", "duplicate", "unknown", "malformed", "refused")],
        )
        yield counter(
            "provisioning_compensations",
            "The cancellations' compensations by step and outcome: undone, nothing (nothing to undo), "
            "manual (left to a person)",
            COMPENSATIONS,
            ["outcome", "step"],
            [(o, s) for s in CANCELLATION.names for o in ("undone", "nothing", "manual")],
        )
        activating = snap.activating if snap else {}
        checked = activating.get("checked_at")
        modified = activating.get("oldest_modified_at")
        yield gauge(
            "provisioning_activating_orders",
            "Orders in Activating for longer than RECONCILE_ORDERS_GRACE_S at the last backfill sweep",
            activating.get("waiting") if checked else None,
        )
        yield gauge(
            "provisioning_activating_oldest_order_age_seconds",
            "How long the oldest Order seen in Activating by the last backfill sweep has waited (now); 0: none",
            (now - modified if modified else 0.0) if checked else None,
        )
        yield gauge(
            "provisioning_activating_checked_timestamp_seconds",
            "When the backfill last asked Salesforce for Orders left in Activating",
            checked,
        )
        yield gauge(
            "provisioning_listener_leader",
            "1 while a listener holds the channel's leader lock in Redis",
            (1.0 if data["leader"] else 0.0) if data else None,
            {"channel": self.channel},
        )
        yield from self._protection(data, counter)

    def _protection(self, data: dict[str, Any] | None, counter: Any) -> Iterator[Metric]:
        """Each external system's circuit breaker and rate limit, and the Salesforce API budget."""
        systems = [s.value for s in System]
        yield counter(
            "provisioning_step_waits",
            "Steps a system's protection made wait (no budget spent), by system and cause: breaker_open, rate_limited",
            STEP_WAITS,
            ["cause", "system"],
            [(cause, system) for system in systems for cause in ("breaker_open", "rate_limited")],
        )
        state = GaugeMetricFamily(
            "provisioning_breaker_state",
            "A system's circuit breaker: 0 closed, 1 half-open (one probe), 2 open (nobody calls it)",
            labels=["system"],
        )
        failures = GaugeMetricFamily(
            "provisioning_breaker_failures",
            "Transient failures in a row a system's breaker counts",
            labels=["system"],
        )
        limit = GaugeMetricFamily(
            "provisioning_rate_limit_calls_per_second",
            "A system's global rate limit (RATE_LIMIT_<SYSTEM>), in calls per second; absent: no limit",
            labels=["system"],
        )
        if data is not None:
            for view in data["breakers"]:
                state.add_metric([view.system], _BREAKER_VALUES[view.state])
                failures.add_metric([view.system], view.failures)
            for system in System:
                rate = self.services.protection.rate(system)
                if rate is not None:
                    limit.add_metric([system.value], rate.per_s)
        yield from (state, failures, limit)
        usage = data["api_usage"] if data else None
        used = GaugeMetricFamily(
            "provisioning_salesforce_api_requests_used",
            "Salesforce API requests used in the org's 24 h allowance, as its last REST answer said (Sforce-Limit-Info)",
        )
        allowed = GaugeMetricFamily(
            "provisioning_salesforce_api_requests_limit",
            "The org's 24 h allowance of API requests (Sforce-Limit-Info)",
        )
        if usage is not None:
            used.add_metric([], usage.used)
            allowed.add_metric([], usage.limit)
        yield from (used, allowed)


def exported_names(collector: LedgerCollector) -> set[str]:
    """The sample names Prometheus stores from this collector (``_total``, ``_bucket``, ... included)."""
    names: set[str] = set()
    for family in collector.describe():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


@click.command("metrics")
@click.option("--host", default=None, help="Address to listen on (default: METRICS_HOST).")
@click.option("--port", type=int, default=None, help="Port of /metrics (default: METRICS_PORT).")
@pass_ctx
def metrics(ctx: Context, host: str | None, port: int | None) -> None:
    """Serve the runs' metrics for Prometheus on /metrics, read from Redis at each scrape.

    One target for every worker: runs started and ended, failures by step and cause,
    step durations and retries, publication-to-Activated latency, the registries,
    the eSIM stock and the listener's lock. Runs until SIGTERM or Ctrl-C.
    """
    settings = ctx.settings
    registry = CollectorRegistry()
    registry.register(LedgerCollector(Services(settings)))
    bind_host = host or settings.metrics_host
    bind_port = settings.metrics_port if port is None else port
    server, thread = start_http_server(bind_port, addr=bind_host, registry=registry)
    log.info("metrics_serving", host=bind_host, port=bind_port)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(STOP_POLL_S):
        pass
    server.shutdown()
    thread.join()
    log.info("metrics_stopped")
