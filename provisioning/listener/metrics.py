"""The listener's Prometheus metrics, on a registry of its own (several listeners per test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class ListenerMetrics:
    def __init__(self, source_counters: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("listener_events_received", "Events received from the channel", registry=r)
        self.published = Counter("listener_events_published", "Events published as runs", registry=r)
        self.quarantined = Counter("listener_events_quarantined", "Malformed events quarantined", registry=r)
        self.duplicates = Counter(
            "listener_events_duplicate", "Events whose run was already known", registry=r
        )
        self.batches = Counter("listener_batches", "Batches handled (one checkpoint each)", registry=r)
        self.publish_failures = Counter(
            "listener_publish_failures", "Failed publish, record or checkpoint attempts", registry=r
        )
        self.resumed = Counter("listener_reconciler_resumes", "Runs resumed by the reconciler", registry=r)
        self.writebacks = Counter(
            "listener_reconciler_writebacks", "Failures written on the Order by the reconciler", registry=r
        )
        self.backfilled = Counter(
            "listener_backfill_runs_started", "Runs started for Orders left in Activating", registry=r
        )
        self.backfill_queries = Counter(
            "listener_backfill_queries", "Backfill sweeps (each one paged SOQL query)", registry=r
        )
        self.backfill_failures = Counter(
            "listener_backfill_failures", "Backfill sweeps that failed", registry=r
        )
        self.last_event = Gauge(
            "listener_last_event_timestamp_seconds", "When the last event arrived", registry=r
        )
        self.checkpoint_at = Gauge(
            "listener_checkpoint_timestamp_seconds", "When the checkpoint was last written", registry=r
        )
        self.leader = Gauge(
            "listener_is_leader", "1 while this listener holds the channel's lock", registry=r
        )
        self.subscribed = Gauge("listener_subscribed", "1 while subscribed to the channel", registry=r)
        self.stalled = Gauge(
            "listener_stalled", "1 while the stream is silent past its keepalive promise", registry=r
        )
        self.lag = Gauge("listener_lag_seconds", "Now minus the CreatedDate of the last event", registry=r)
        r.register(_SourceCollector(source_counters))


class _SourceCollector(Collector):
    """The event source's own counters (reconnects, replay fallbacks, stalls...), read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        for name, value in self.read().items():
            yield CounterMetricFamily(f"listener_stream_{name}", f"Event source: {name}", value=value)
