"""The listener's loop: lead the channel, then handle the event source's batches, no event lost.

For each batch (one Pub/Sub fetch response, one CometD connect reply), in this order:

1. validate every event (Id checksum, key prefix, field types); a malformed one is
   quarantined for the operators (one Redis pipeline for the batch),
2. record every run as queued, in one pipeline: a run the ledger knows as started or
   ended is a duplicate (counted, not republished); a new run, or one still queued,
   is published, so the reconciler republishes it should its message be lost,
3. publish the runs' chains through one producer, and wait until the broker accepted
   every one (RabbitMQ publisher confirms; Redis commands that succeeded); an event with
   ``Action__c = cancel`` records the Order's cancellation and starts its run (both once:
   :mod:`provisioning.runs.cancellation`),
4. only then write ONE checkpoint for the batch, and acknowledge it to the source.
   With replicas, the checkpoint counts once a replica confirmed it (and with it the
   batch's run records); unconfirmed, or Redis lost in between, the batch goes again
   from 2 (a failover must not leave events behind the checkpoint without their runs).

A crash before 4 replays the whole batch after a restart; the run ids absorb the
duplicates. Broker or Redis down: the batch in hand is retried with backoff, nothing
is checkpointed, the source waits (delivery is pull-based). Checkpoints are per
transport: a Pub/Sub replay id never starts a CometD subscription, nor the reverse; the
other transport's checkpoint, when Redis holds one, is named once in the log as ignored.
A source that gives up (a refusal only a person can fix) is tried again slowly
(:mod:`provisioning.listener.refusals`), and /healthz says why meanwhile.
"""

from __future__ import annotations

import functools
import itertools
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import redis
from celery import Celery

from provisioning.core.backoff import backoff_s
from provisioning.core.logs import get_logger
from provisioning.core.replay_id import ReplayId, ReplayStart, Transport, describe_start
from provisioning.core.replication import ReplicaUnconfirmed
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import Ledger, Origin
from provisioning.listener.leadership import Leadership
from provisioning.listener.metrics import ListenerMetrics
from provisioning.listener.reconciling import Reconciler
from provisioning.listener.refusals import SourceRefusals
from provisioning.listener.validation import CancelRequest, Rejected, validate_event
from provisioning.runs.cancellation import request_cancel
from provisioning.runs.publishing import publish_runs
from provisioning.runs.services import Services
from provisioning.salesforce.events import Batch, EventSource

log = get_logger(__name__)

# Waiting for the broker or Redis to come back: capped exponential backoff with jitter.
OUTAGE_BACKOFF_BASE_S = 0.5
OUTAGE_BACKOFF_MAX_S = 10.0
# How often the leader looks whether a source that gave up is subscribed again (the recovery line).
SOURCE_WATCH_INTERVAL_S = 0.5
# How long stopping waits for the leader's helper threads.
THREAD_JOIN_TIMEOUT_S = 5.0


class _Abandoned(Exception):
    """Stopping while the broker or Redis is down: the batch in hand is left unacknowledged (it replays)."""


class Listener:
    """One listener process: leadership, the batch loop, the reconciler, the health signals."""

    def __init__(
        self,
        settings: Settings,
        *,
        services: Services,
        publisher: Celery,
        source: EventSource,
        replay_from: ReplayStart | None = None,
        reconcile_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.services = services
        self.ledger: Ledger = services.ledger
        self.publisher = publisher
        self.source = source
        self.replay_from = replay_from
        self.channel = settings.sf_provision_event_channel
        self.metrics = ListenerMetrics(source.counters)
        self.stopping = threading.Event()
        self.publish_ok = True
        self.is_leader = False
        self.leadership = Leadership(
            self.ledger.listener.leader_lock(self.channel, settings.listener_lock_ttl_s),
            ttl_s=settings.listener_lock_ttl_s,
            channel=self.channel,
        )
        self.reconciler = Reconciler(
            settings,
            services=services,
            publisher=publisher,
            metrics=self.metrics,
            idle_s=reconcile_idle_s if reconcile_idle_s is not None else settings.reconcile_idle_s,
        )
        self.refusals = SourceRefusals(settings)
        self._other_checkpoints_told = False
        self._rng = random.Random()

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking events; the batch in hand is finished first (called from a signal watcher)."""
        self.stopping.set()
        self.source.stop()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.leadership.acquire(self.stopping):
                return
            self.is_leader = True
            self.metrics.leader.set(1)
            log.info("listener_leader", channel=self.channel, transport=self.source.transport)
            # Who leads, for the console (best effort: the lock, not this record, is the lead).
            with suppress(redis.exceptions.RedisError):
                self.ledger.listener.announce_leader(self.channel)
            threads = [
                threading.Thread(
                    target=self.leadership.keep, args=(self.source.stop,), name="lease", daemon=True
                ),
                threading.Thread(
                    target=self.reconciler.loop, args=(self.leadership.lost,), name="reconciler", daemon=True
                ),
                threading.Thread(
                    target=self._watch_source, args=(self.leadership.lost,), name="source-watch", daemon=True
                ),
            ]
            for t in threads:
                t.start()
            try:
                self._consume()
            finally:
                # In this order: no longer the leader for the health check, the helpers stop
                # (release sets the event they wait on), then the lock goes to a standby.
                self.is_leader = False
                self.metrics.leader.set(0)
                self.metrics.subscribed.set(0)
                self.leadership.release()
                for t in threads:
                    t.join(timeout=THREAD_JOIN_TIMEOUT_S)

    def healthy(self) -> bool:
        return self.is_leader and self.source.connected and not self.source.stalled and self.publish_ok

    def unhealthy_reason(self) -> str | None:
        """Why :meth:`healthy` is false, in words for /healthz (None while healthy)."""
        if not self.is_leader:
            return "standby: another listener holds the channel's lock (or this one is stopping)"
        if not self.source.connected:
            return self.refusals.reason or "not subscribed yet: subscribing to the channel"
        if self.source.stalled:
            return "the stream is silent past its keepalive promise: subscribing again from the checkpoint"
        if not self.publish_ok:
            return "cannot publish or checkpoint: the broker or Redis is not answering (retrying)"
        return None

    def _watch_source(self, done: threading.Event) -> None:
        """A source that gave up and is subscribed again: the recovery, logged once, off /healthz."""
        while not done.wait(SOURCE_WATCH_INTERVAL_S):
            if self.refusals.failing and self.source.connected:
                self.refusals.recovered()

    # -- the batches --------------------------------------------------------------------------
    def start_position(self) -> ReplayStart:
        """--replay-from once, else this transport's checkpoint, else SF_EVENTS_REPLAY."""
        transport = Transport(self.source.transport)
        stored: dict[str, bytes] = self._with_redis(lambda: self.ledger.listener.checkpoints(self.channel))
        start = self._stored_start(stored.get(transport.value), transport)
        if not self._other_checkpoints_told:
            self._other_checkpoints_told = True
            for other in Transport:
                if other is not transport and other.value in stored:
                    self._tell_other_checkpoint(other, stored[other.value], start)
        return start

    def _stored_start(self, stored: bytes | None, transport: Transport) -> ReplayStart:
        if self.replay_from is not None:
            return self.replay_from
        if stored is not None:
            try:
                return ReplayId.from_stored(stored, transport)
            except ValueError as exc:
                log.error(
                    "listener_checkpoint_unreadable",
                    transport=transport.value,
                    stored=bytes(stored)[:64].hex(),
                    error=str(exc),
                    starts_from=self.settings.sf_events_replay,
                )
        return self.settings.replay_start()

    def _tell_other_checkpoint(self, other: Transport, raw: bytes, start: ReplayStart) -> None:
        """Once per process: the other transport's checkpoint is in Redis and is not used (and why)."""
        try:
            shown = str(ReplayId.from_stored(raw, other))
        except ValueError:
            shown = raw[:64].hex()
        log.warning(
            "listener_other_checkpoint_ignored",
            channel=self.channel,
            transport=other.value,
            checkpoint=shown,
            using=self.source.transport,
            starts_from=describe_start(start),
            reason=f"replay ids are per transport: a {other.value} replay id cannot start a "
            f"{self.source.transport} subscription, so this listener starts from its own checkpoint, "
            "SF_EVENTS_REPLAY or --replay-from (switching back resumes the other from that checkpoint)",
        )

    def _consume(self) -> None:
        while not self.stopping.is_set() and not self.leadership.lost.is_set():
            start = self.start_position()
            # An explicit start applies once; later restarts resume from the checkpoint.
            self.replay_from = None
            # While the source keeps giving up, its summary lines say it: not one line per try.
            (log.debug if self.refusals.failing else log.info)(
                "listener_subscribing",
                channel=self.channel,
                transport=self.source.transport,
                replay_from=describe_start(start),
            )
            try:
                self.metrics.subscribed.set(1)
                for batch in self.source.batches(start):
                    self.metrics.stalled.set(1 if self.source.stalled else 0)
                    self.handle(batch)
                    if self.stopping.is_set() or self.leadership.lost.is_set():
                        break
            except _Abandoned:
                return
            except Exception as exc:
                self.stopping.wait(self.refusals.failed(exc))
            finally:
                self.metrics.subscribed.set(0)

    def handle(self, batch: Batch) -> None:
        """Validate, record and publish the batch's events, then checkpoint the batch once."""
        now = time.time()
        runs: list[RunId] = []
        cancels: list[CancelRequest] = []
        rejected = []
        if batch.events:
            self.metrics.received.inc(len(batch.events))
            self.metrics.last_event.set(now)
        for event in batch.events:
            checked = validate_event(event)
            if isinstance(checked, Rejected):
                rejected.append(
                    {
                        "replay_id": str(event.replay_id),
                        "transport": self.source.transport,
                        "uuid": event.uuid,
                        "reason": checked.reason,
                        "payload": event.payload,
                        "received_at": now,
                    }
                )
            elif isinstance(checked, CancelRequest):
                cancels.append(checked)
            else:
                runs.append(checked)
        if rejected:
            self._with_redis(lambda: self.ledger.registries.quarantine(rejected))
            self.metrics.quarantined.inc(len(rejected))
            for entry in rejected:
                log.error("event_quarantined", replay_id=entry["replay_id"], reason=entry["reason"])
        published: list[RunId] = []
        duplicates: list[RunId] = []
        position = batch.position
        # High availability: the batch is recorded again when its checkpoint is not confirmed (below).
        for redo in itertools.count():
            if runs:
                # Queued in the ledger before the publish: a chain lost after it (a worker killed between
                # the broker's pop and its unacked record) leaves a stale queued run the reconciler resumes.
                # A run still queued is published again (a listener may have died before publishing it).
                decisions = self._with_redis(lambda: self.ledger.runs.enqueue_many(runs))
                published = [r for r, new in zip(runs, decisions, strict=True) if new]
                duplicates = [r for r, new in zip(runs, decisions, strict=True) if not new]
                if published:
                    self._with_retry("publish", functools.partial(publish_runs, self.publisher, published))
            # After the batch's runs (its order): each cancellation recorded once, its run started once.
            for cancel in cancels:
                self._with_retry(
                    "cancel",
                    functools.partial(
                        request_cancel,
                        self.services,
                        self.publisher,
                        cancel.order_id,
                        cancel.reason,
                        by="salesforce",
                        origin=Origin.EVENT,
                    ),
                )
            # Only now: every run is with the broker (or its event quarantined or known).
            if position is None or self._checkpoint_confirmed(position, redo):
                break
        self.metrics.published.inc(len(published))
        self.metrics.duplicates.inc(len(duplicates))
        if position is not None:
            self.metrics.checkpoint_at.set(time.time())
            self.source.ack(position)
        if batch.events:
            log.info(
                "batch_handled",
                events=len(batch.events),
                published=[str(r) for r in published],
                cancels=[c.order_id for c in cancels],
                duplicates=[str(r) for r in duplicates],
                quarantined=len(rejected),
                checkpoint=str(position) if position is not None else None,
            )
        self.metrics.batches.inc()
        created = [e.created_at for e in batch.events if e.created_at is not None]
        if created:
            self.metrics.lag.set(max(0.0, now - created[-1]))

    # -- high availability: the checkpoint on a replica before it counts -------------------------
    def _checkpoint_confirmed(self, position: ReplayId, redo: int) -> bool:
        """Write the checkpoint; with replicas, confirmed by one (WAIT) in the same round trip.

        WAIT confirms every earlier write with it (replication is one ordered stream), so the batch's
        run records too. False when no replica confirmed in time, or Redis failed in between (a
        failover may have lost the records while a retried checkpoint would land on the new master,
        past events that have no run): then the batch is recorded and published again.
        """
        if self.stopping.is_set() and redo:
            raise _Abandoned()
        try:
            self.services.replicas.write(
                lambda pipe: self.ledger.listener.queue_checkpoint(
                    pipe, self.channel, self.source.transport, position.value
                )
            )
        except (ReplicaUnconfirmed, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.publish_ok = False
            delay = backoff_s(redo, base_s=OUTAGE_BACKOFF_BASE_S, cap_s=OUTAGE_BACKOFF_MAX_S, rng=self._rng)
            log.warning(
                "listener_checkpoint_unconfirmed",
                redo=redo + 1,
                retry_in_s=round(delay, 2),
                error=f"{type(exc).__name__}: {exc}",
            )
            self.stopping.wait(delay)
            return False
        return True

    # -- outages ------------------------------------------------------------------------------
    def _with_redis(self, fn: Callable[[], Any]) -> Any:
        return self._with_retry("redis", fn)

    def _with_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Retry until it works: losing the batch is not an option, and stopping waits for it too."""
        failures = 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                self.publish_ok = False
                if self.stopping.is_set():
                    log.warning(
                        "listener_batch_abandoned_on_stop", what=what, error=f"{type(exc).__name__}: {exc}"
                    )
                    raise _Abandoned() from exc
                self.metrics.publish_failures.inc()
                delay = backoff_s(
                    failures, base_s=OUTAGE_BACKOFF_BASE_S, cap_s=OUTAGE_BACKOFF_MAX_S, rng=self._rng
                )
                failures += 1
                log.warning(
                    "listener_outage",
                    what=what,
                    failures=failures,
                    retry_in_s=round(delay, 2),
                    error=f"{type(exc).__name__}: {exc}",
                )
                self.stopping.wait(delay)
                continue
            if failures:
                log.info("listener_outage_over", what=what, failures=failures)
            self.publish_ok = True
            return result
