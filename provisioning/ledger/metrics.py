"""Run metrics kept in Redis: counters and histogram buckets written inside the ledger's own pipelines.

Workers run on many hosts, each with a threads or prefork pool, so counts kept in
process memory would need one scrape target per process (or prometheus-client's
multiprocess mode and one target per host). Instead each ledger write that ends
a step or a run adds a few ``HINCRBY`` commands to the pipeline it sends anyway:
no extra round trip, one place that holds the totals, and counts that survive a
worker's restart. ``provisioning metrics`` (:mod:`provisioning.ops.exporter`) reads
them at scrape time; it is the one scrape target for runs, whatever the number of
workers.

Keys (with every other key in :mod:`provisioning.ledger.keys`): ``p:metrics:counters``
(``<name>|<label>=<value>,...`` → count), ``p:metrics:h:<name>`` (``<labels>|<bucket
index>`` → observations in that bucket alone, not cumulative; ``<labels>|sum`` → the
sum) and ``p:metrics:activating`` (what the last backfill sweep saw in Salesforce:
Orders waiting in Activating, the oldest's LastModifiedDate, when the sweep ran).

Label values are step names, outcomes, causes and origins: a small, fixed set.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from provisioning.ledger.keys import Keys

# The writer: a redis.Redis (each command one round trip) or a pipeline (sent with the caller's).
Writer = Any


class FailureCause(StrEnum):
    """Why a run failed: a permanent error, or transient errors that outlasted the retries."""

    PERMANENT = "permanent"
    TRANSIENT_EXHAUSTED = "transient_exhausted"


class ReconcilerAction(StrEnum):
    RESUME = "resume"
    WRITEBACK = "writeback"
    BACKFILL = "backfill"
    # A backfill sweep that did not ask Salesforce: the org's API allowance is nearly spent.
    BACKFILL_SKIPPED = "backfill_skipped"


class FailureWriteback(StrEnum):
    """What became of one try of a failed run's write of Failed on the Order (the worker's, not the
    reconciler's)."""

    # The Order shows the failure (first try or a retry).
    WRITTEN = "written"
    # Refused for now (Salesforce down, 503, rate-limited): tried again in a few seconds.
    RETRIED = "retried"
    # The short schedule is over (its tries spent, or a permanent refusal): the reconciler's sweep has it.
    GIVEN_UP = "given_up"


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    help: str
    label: str
    buckets: tuple[float, ...]
    # Whole numbers with one bucket per value from 0: the sum follows from the buckets, so only
    # values past the last bucket add to the stored sum (one command less per observation).
    integer: bool = False

    def bucket_index(self, value: float) -> int:
        """The first bucket whose upper bound holds ``value``; ``len(buckets)`` is +Inf."""
        return bisect.bisect_left(self.buckets, value)


STEP_DURATION = HistogramSpec(
    "provisioning_step_duration_seconds",
    "Time of a step's successful attempt (its external calls), by step",
    "step",
    (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
STEP_RETRIES = HistogramSpec(
    "provisioning_step_retries",
    "Retries a step needed (attempts minus one), observed when it is done or fails the run, by step",
    "step",
    tuple(float(n) for n in range(11)),
    integer=True,
)
ACTIVATION_LATENCY = HistogramSpec(
    "provisioning_activation_latency_seconds",
    "From the run's creation (the event's publication) to the Order written Activated, by who started the run",
    "origin",
    (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0, 86400.0),
)
HISTOGRAMS: tuple[HistogramSpec, ...] = (STEP_DURATION, STEP_RETRIES, ACTIVATION_LATENCY)

RUNS_STARTED = "runs_started"
RUNS_ENDED = "runs_ended"
RUNS_FAILED = "runs_failed"
RUNS_REQUEUED = "runs_requeued"
RECONCILER_ACTIONS = "reconciler_actions"
# Steps a system's protection turned away (labels: system, cause): counted by lua/admit.lua.
STEP_WAITS = "step_waits"
# ES2+ notifications received, by outcome (unknown, duplicate, recorded, changed; malformed and refused
# are counted by the notification server): counted in esim_notify.lua.
ESIM_NOTIFICATIONS = "esim_notifications"
# The Orders' cancellations' compensations, by step and outcome (undone, nothing, manual).
COMPENSATIONS = "compensations"
# A failed run's write of Failed on the Order by the worker (the first try and the short schedule of
# provisioning.runs.writeback), by outcome (FailureWriteback); the reconciler's: RECONCILER_ACTIONS.
FAILURE_WRITEBACKS = "failure_writebacks"


@dataclass(frozen=True)
class StepObservation:
    """What a step's end tells the metrics: how long its last attempt took and how many it needed."""

    step: str
    attempts: int
    duration_s: float
    # Set when the step wrote the Order Activated: seconds since the run was created, and who made it.
    activated_after_s: float | None = None
    origin: str = "event"


def observe_step(
    step: str,
    *,
    attempts: int,
    started_monotonic: float,
    run_created_at: float,
    origin: str,
    activates: bool = False,
) -> StepObservation:
    """The observation of a step that ends now (``started_monotonic``: when its last attempt began);
    ``activates``: the step wrote the Order Activated (the activation latency ends here)."""
    name = step
    activated = time.time() - run_created_at if activates else None
    return StepObservation(
        step=name,
        attempts=attempts,
        duration_s=max(0.0, time.monotonic() - started_monotonic),
        activated_after_s=max(0.0, activated) if activated is not None else None,
        origin=origin,
    )


def counter_field(name: str, **labels: str) -> str:
    """A counter's field in the counters hash: ``<name>|<label>=<value>,...`` (labels sorted)."""
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _parse_labels(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split(",") if pair)


@dataclass
class HistogramData:
    """One histogram's series: per label value, the per-bucket counts and the sum."""

    spec: HistogramSpec
    buckets: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)

    def cumulative(self, label_value: str) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, +Inf last, as Prometheus wants them."""
        counts = self.buckets.get(label_value) or [0] * (len(self.spec.buckets) + 1)
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.spec.buckets, float("inf")), counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


@dataclass
class Snapshot:
    """Everything the workers and the reconciler counted, as read at scrape time."""

    counters: dict[str, dict[tuple[tuple[str, str], ...], float]]
    histograms: dict[str, HistogramData]
    activating: dict[str, float]

    def counter(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return self.counters.get(name, {})


class RunMetrics:
    """Adds metric writes to a Redis pipeline (or sends them on a client); reads them back."""

    def __init__(self, keys: Keys, client: Any = None) -> None:
        self.counters_key = keys.metrics_counters
        self.activating_key = keys.metrics_activating
        self._keys = keys
        # Where the counts that go alone are sent (the reconciler's, the operators'); the ledger's own
        # go in the pipelines it sends anyway.
        self._client = client

    def histogram_key(self, spec: HistogramSpec) -> str:
        return self._keys.histogram(spec.name)

    # -- writing -------------------------------------------------------------------------------
    def count(self, pipe: Writer, name: str, n: int = 1, **labels: str) -> None:
        pipe.hincrby(self.counters_key, counter_field(name, **labels), n)

    def observe(self, pipe: Writer, spec: HistogramSpec, label_value: str, value: float) -> None:
        key = self.histogram_key(spec)
        index = spec.bucket_index(value)
        pipe.hincrby(key, f"{label_value}|{index}", 1)
        if not spec.integer or index == len(spec.buckets):
            pipe.hincrbyfloat(key, f"{label_value}|sum", value)

    def run_started(self, pipe: Writer) -> None:
        self.count(pipe, RUNS_STARTED)

    def run_ended(self, pipe: Writer, outcome: str) -> None:
        """done, skipped, joined or superseded (failures: :meth:`run_failed`)."""
        self.count(pipe, RUNS_ENDED, outcome=outcome)

    def run_failed(
        self, pipe: Writer, step: str, cause: FailureCause, observed: StepObservation | None = None
    ) -> None:
        self.count(pipe, RUNS_ENDED, outcome="failed")
        self.count(pipe, RUNS_FAILED, step=step, cause=cause.value)
        if observed is not None:
            self.observe(pipe, STEP_RETRIES, observed.step, observed.attempts - 1)

    def run_requeued(self, pipe: Writer) -> None:
        self.count(pipe, RUNS_REQUEUED)

    def step_done(self, pipe: Writer, observed: StepObservation) -> None:
        self.observe(pipe, STEP_DURATION, observed.step, observed.duration_s)
        self.observe(pipe, STEP_RETRIES, observed.step, observed.attempts - 1)
        if observed.activated_after_s is not None:
            self.observe(pipe, ACTIVATION_LATENCY, observed.origin, observed.activated_after_s)

    def failure_writeback(self, pipe: Writer | None, outcome: FailureWriteback) -> None:
        """One try of a failure's write on the Order (``pipe`` None: sent alone, one round trip)."""
        self.count(pipe if pipe is not None else self._client, FAILURE_WRITEBACKS, outcome=outcome.value)

    def reconciler_action(self, pipe: Writer, action: ReconcilerAction, n: int) -> None:
        if n:
            self.count(pipe, RECONCILER_ACTIONS, n, action=action.value)

    def activating_seen(self, pipe: Writer, *, waiting: int, oldest_modified_at: float | None) -> None:
        """What a backfill sweep found: Orders in Activating past the grace period, the oldest one."""
        pipe.hset(
            self.activating_key,
            mapping={
                "waiting": waiting,
                "oldest_modified_at": repr(oldest_modified_at) if oldest_modified_at is not None else "",
                "checked_at": repr(time.time()),
            },
        )

    # -- sent alone: the reconciler's sweeps ------------------------------------------------------
    def count_sweep(self, action: ReconcilerAction, n: int) -> None:
        """What one sweep did (resumed, wrote back): one round trip, none when it did nothing."""
        if n:
            self.reconciler_action(self._client, action, n)

    def count_backfill(self, *, waiting: int, oldest_modified_at: float | None, started: int) -> None:
        """What a backfill sweep saw in Salesforce and how many runs it started: one round trip."""
        pipe = self._client.pipeline(transaction=False)
        self.activating_seen(pipe, waiting=waiting, oldest_modified_at=oldest_modified_at)
        self.reconciler_action(pipe, ReconcilerAction.BACKFILL, started)
        pipe.execute()

    # -- reading -------------------------------------------------------------------------------
    def read_commands(self, pipe: Writer) -> int:
        """Queue the reads :meth:`parse` takes the answers of (in this order); returns how many."""
        pipe.hgetall(self.counters_key)
        for spec in HISTOGRAMS:
            pipe.hgetall(self.histogram_key(spec))
        pipe.hgetall(self.activating_key)
        return 2 + len(HISTOGRAMS)

    def parse(self, answers: Iterable[Any]) -> Snapshot:
        it = iter(answers)
        counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for raw_field, raw_value in (next(it) or {}).items():
            name, _, labels = _text(raw_field).partition("|")
            key = tuple(sorted(_parse_labels(labels).items()))
            counters.setdefault(name, {})[key] = float(_text(raw_value))
        histograms: dict[str, HistogramData] = {}
        for spec in HISTOGRAMS:
            data = HistogramData(spec)
            for raw_field, raw_value in (next(it) or {}).items():
                label_value, _, slot = _text(raw_field).rpartition("|")
                if slot == "sum":
                    data.sums[label_value] = float(_text(raw_value))
                    continue
                counts = data.buckets.setdefault(label_value, [0] * (len(spec.buckets) + 1))
                index = int(slot)
                if 0 <= index < len(counts):
                    counts[index] += int(_text(raw_value))
            if spec.integer:
                for label_value, counts in data.buckets.items():
                    within = sum(bound * n for bound, n in zip(spec.buckets, counts, strict=False))
                    data.sums[label_value] = data.sums.get(label_value, 0.0) + within
            histograms[spec.name] = data
        activating = {
            _text(k): float(_text(v)) for k, v in (next(it) or {}).items() if _text(v) not in ("", "None")
        }
        return Snapshot(counters, histograms, activating)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
