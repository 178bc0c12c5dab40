"""The listener: Platform Events in, ``provisioning.provision_order`` tasks out, no event lost.

One listener per channel is active (a Redis lock with expiry, renewed); other
replicas wait as hot standbys and take over when it lapses. For each event, in
this order:

1. validate it (Id checksum, field types); a malformed one is quarantined for
   the operators and skipped,
2. derive the run id; a run the ledger knows as started or ended is a duplicate (counted, not
   republished); a new one is recorded as queued first, so the reconciler republishes it should
   the task be lost (a run still queued is published again),
3. publish the task and wait until the broker accepted it (RabbitMQ publisher
   confirms; a Redis command that succeeded),
4. only then store the replay id as the checkpoint, and acknowledge it to the stream.

A crash between 3 and 4 re-delivers the event after a restart; the run id
absorbs the duplicate. Broker or Redis down: the event in hand is retried with
backoff, nothing is checkpointed, the stream waits. The leader also runs the
reconciler, which resumes runs whose worker died without a redelivery.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import click
import redis
from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from provisioning.clictx import Context, pass_ctx
from provisioning.ledger import Ledger
from provisioning.listener_state import announce_leader
from provisioning.logs import get_logger
from provisioning.publishing import make_publisher, publish_run
from provisioning.reconciler import backfill_orders, repair_failure_writebacks, resume_stale
from provisioning.run_id import RunId
from provisioning.salesforce.ids import normalize_id
from provisioning.salesforce.streaming import Event, StreamingClient
from provisioning.services import Services
from provisioning.settings import REPLAY_PRESETS, Settings

log = get_logger(__name__)

IDEM_KEY_MAX_CHARS = 80
# The key prefix of Order Ids: another object's valid Id (an Account's 001...) is not an Order.
ORDER_KEY_PREFIX = "801"
# Waiting for the broker or Redis to come back: capped exponential backoff with jitter.
OUTAGE_BACKOFF_BASE_S = 0.5
OUTAGE_BACKOFF_MAX_S = 10.0
# A standby looks at the leader lock this often (a fraction of its expiry).
STANDBY_POLL_FRACTION = 1 / 3
# After a stream error, wait this long before subscribing again.
STREAM_RESTART_DELAY_S = 1.0


class Metrics:
    """The listener's counters and gauges, on their own registry (several listeners per process in tests)."""

    def __init__(self, stream_counters: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("listener_events_received", "Events received from the channel", registry=r)
        self.published = Counter("listener_events_published", "Events published as tasks", registry=r)
        self.quarantined = Counter("listener_events_quarantined", "Malformed events quarantined", registry=r)
        self.duplicates = Counter(
            "listener_events_duplicate", "Events whose run was already known", registry=r
        )
        self.publish_failures = Counter(
            "listener_publish_failures", "Failed publish or checkpoint attempts", registry=r
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
        self.checkpoint = Gauge(
            "listener_checkpoint_replay_id", "The stored checkpoint (opaque replay id)", registry=r
        )
        self.leader = Gauge(
            "listener_is_leader", "1 while this listener holds the channel's lock", registry=r
        )
        self.subscribed = Gauge("listener_subscribed", "1 while subscribed to the channel", registry=r)
        self.lag = Gauge("listener_lag_seconds", "Now minus the CreatedDate of the last event", registry=r)
        self.checkpoint_at = Gauge(
            "listener_checkpoint_timestamp_seconds", "When the checkpoint last moved", registry=r
        )
        r.register(_StreamCollector(stream_counters))


class _StreamCollector(Collector):
    """The streaming client's own counters (reconnects, replay fallbacks, ...), read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Any:
        for name, value in self.read().items():
            yield CounterMetricFamily(f"listener_stream_{name}", f"Streaming client: {name}", value=value)


class _Abandoned(Exception):
    """Stopping while the broker or Redis is down: the event in hand is left unacknowledged (it replays)."""


@dataclass
class Rejected:
    reason: str


def validate_event(event: Event) -> RunId | Rejected:
    """The run a well-formed event asks for, or why it is malformed."""
    payload = event.payload
    if not isinstance(payload, dict):
        return Rejected("payload is not an object")
    order_id = payload.get("OrderId__c")
    if order_id is None or order_id == "":
        return Rejected("OrderId__c is missing")
    if not isinstance(order_id, str):
        return Rejected(f"OrderId__c is a {type(order_id).__name__}, not text")
    try:
        order_id = normalize_id(order_id)
    except ValueError as exc:
        return Rejected(f"OrderId__c is not a valid Salesforce Id: {exc}")
    if not order_id.startswith(ORDER_KEY_PREFIX):
        return Rejected(
            f"OrderId__c {order_id} is the Id of another kind of record (key prefix {order_id[:3]}), "
            f"not of an Order ({ORDER_KEY_PREFIX}): fix the Flow that publishes the event"
        )
    idem_key = payload.get("IdemKey__c")
    if idem_key is not None and not isinstance(idem_key, str):
        return Rejected(f"IdemKey__c is a {type(idem_key).__name__}, not text")
    if idem_key is not None and len(idem_key) > IDEM_KEY_MAX_CHARS:
        return Rejected(f"IdemKey__c is longer than {IDEM_KEY_MAX_CHARS} characters")
    return RunId.for_event(order_id, idem_key)


class Listener:
    """One listener process: leader election, the event loop, the reconciler, health."""

    def __init__(
        self,
        settings: Settings,
        *,
        services: Services,
        publisher: Celery,
        stream: StreamingClient,
        replay_from: int | None = None,
        reconcile_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.services = services
        self.ledger: Ledger = services.ledger
        self.publisher = publisher
        self.stream = stream
        self.replay_from = replay_from
        self.reconcile_idle_s = (
            reconcile_idle_s if reconcile_idle_s is not None else settings.reconcile_idle_s
        )
        self.channel = settings.sf_provision_event_channel
        self.metrics = Metrics(stream.counters.as_dict)
        self.stopping = threading.Event()
        self.lost_leadership = threading.Event()
        self.publish_ok = True
        self.is_leader = False
        self._lock = services.redis.lock(
            self.ledger.listener_key(self.channel, "lock"),
            timeout=settings.listener_lock_ttl_s,
            blocking=False,
            thread_local=False,
        )
        self._rng = random.Random()

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking events; the event in hand is finished first (called from a signal watcher)."""
        self.stopping.set()
        self.stream.stop()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self._become_leader():
                return
            self.lost_leadership.clear()
            self.is_leader = True
            self.metrics.leader.set(1)
            log.info("listener_leader", channel=self.channel)
            with suppress(redis.exceptions.RedisError):  # who leads, for the console: not worth waiting for
                announce_leader(self.ledger, self.channel)
            threads = [
                threading.Thread(target=self._renew_lock, name="lock-renewer", daemon=True),
                threading.Thread(target=self._reconcile_loop, name="reconciler", daemon=True),
            ]
            for t in threads:
                t.start()
            try:
                self._consume()
            finally:
                self.is_leader = False
                self.metrics.leader.set(0)
                self.metrics.subscribed.set(0)
                self.lost_leadership.set()
                for t in threads:
                    t.join(timeout=5)
                self._release_lock()

    def _become_leader(self) -> bool:
        announced = False
        poll_s = self.settings.listener_lock_ttl_s * STANDBY_POLL_FRACTION
        while not self.stopping.is_set():
            try:
                if self._lock.acquire(blocking=False):
                    return True
            except redis.exceptions.ConnectionError as exc:
                log.warning("listener_lock_unreachable", error=str(exc))
            if not announced:
                log.info("listener_standby", channel=self.channel)
                announced = True
            self.stopping.wait(poll_s)
        return False

    def _renew_lock(self) -> None:
        interval = self.settings.listener_lock_ttl_s * STANDBY_POLL_FRACTION
        while not self.lost_leadership.wait(interval):
            try:
                self._lock.reacquire()
            except redis.exceptions.LockError:
                log.error("listener_leadership_lost", channel=self.channel)
                self.lost_leadership.set()
                self.stream.stop()
                return
            except redis.exceptions.ConnectionError as exc:
                # Keep going: the lock may still be ours when Redis is back; if not, reacquire says so.
                log.warning("listener_lock_renew_failed", error=str(exc))

    def _release_lock(self) -> None:
        with suppress(redis.exceptions.LockError, redis.exceptions.ConnectionError):
            self._lock.release()

    # -- events -----------------------------------------------------------------------------
    def start_position(self) -> int:
        if self.replay_from is not None:
            return self.replay_from
        stored = self._with_redis(lambda: self.services.redis.get(self._checkpoint_key))
        if stored is not None:
            return int(stored)
        return self.settings.replay_start

    @property
    def _checkpoint_key(self) -> str:
        return self.ledger.listener_key(self.channel, "checkpoint")

    def _consume(self) -> None:
        while not self.stopping.is_set() and not self.lost_leadership.is_set():
            start = self.start_position()
            # An explicit start applies once; later restarts resume from the checkpoint.
            self.replay_from = None
            log.info("listener_subscribing", channel=self.channel, replay_from=start)
            try:
                self.metrics.subscribed.set(1)
                for event in self.stream.events(start):
                    self.handle(event)
                    if self.stopping.is_set() or self.lost_leadership.is_set():
                        break
            except _Abandoned:
                return
            except Exception as exc:
                # The stream gave up (a refused login, a refused subscription): log, wait, start over.
                log.error("listener_stream_failed", error=f"{type(exc).__name__}: {exc}")
                self.stopping.wait(STREAM_RESTART_DELAY_S)
            finally:
                self.metrics.subscribed.set(0)

    def handle(self, event: Event) -> None:
        self.metrics.received.inc()
        self.metrics.last_event.set(time.time())
        checked = validate_event(event)
        if isinstance(checked, Rejected):
            entry = {
                "replay_id": event.replay_id,
                "uuid": event.uuid,
                "reason": checked.reason,
                "payload": event.payload,
                "received_at": time.time(),
            }
            self._with_redis(lambda: self.ledger.quarantine(entry))
            self.metrics.quarantined.inc()
            log.error("event_quarantined", replay_id=event.replay_id, reason=checked.reason)
        else:
            run_id, order_id = checked, checked.order_id
            # Queued in the ledger before the publish: a task lost after it (a worker killed between
            # the broker's pop and its unacked record) leaves a stale queued run the reconciler resumes.
            # A run still queued is published again (a listener may have died before publishing it).
            publish = self._with_redis(lambda: self.ledger.enqueue(run_id))
            if not publish:
                self.metrics.duplicates.inc()
                log.info("event_duplicate", replay_id=event.replay_id, run_id=str(run_id), order_id=order_id)
            else:
                self._with_retry("publish", lambda: publish_run(self.publisher, run_id))
                self.metrics.published.inc()
                log.info("event_published", replay_id=event.replay_id, run_id=str(run_id), order_id=order_id)
        # Only now: the task is with the broker (or the event is quarantined or known).
        self._with_redis(lambda: self.services.redis.set(self._checkpoint_key, event.replay_id))
        self.metrics.checkpoint.set(event.replay_id)
        self.metrics.checkpoint_at.set(time.time())
        self._observe_lag(event)
        self.stream.ack(event.replay_id)

    def _observe_lag(self, event: Event) -> None:
        created = event.payload.get("CreatedDate") if isinstance(event.payload, dict) else None
        if isinstance(created, str):
            try:
                ts = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return
            self.metrics.lag.set(max(0.0, time.time() - ts))

    def _with_redis(self, fn: Callable[[], Any]) -> Any:
        return self._with_retry("redis", fn)

    def _with_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Retry until it works: losing the event is not an option, and stopping waits for it too."""
        failures = 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                failures += 1
                self.publish_ok = False
                if self.stopping.is_set():
                    log.warning(
                        "listener_event_abandoned_on_stop", what=what, error=f"{type(exc).__name__}: {exc}"
                    )
                    raise _Abandoned() from exc
                self.metrics.publish_failures.inc()
                delay = self._rng.uniform(0, min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * 2**failures))
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

    # -- reconciler -------------------------------------------------------------------------
    def _reconcile_loop(self) -> None:
        backfill_every_s = self.settings.reconcile_orders_interval_s
        # The first backfill runs one sweep after taking the lead: events in hand go first.
        next_backfill = time.monotonic() + backfill_every_s
        while not self.lost_leadership.wait(self.settings.reconcile_interval_s):
            try:
                resumed = resume_stale(self.services, self.publisher, self.reconcile_idle_s)
                repaired = repair_failure_writebacks(self.services, self.reconcile_idle_s)
            except Exception as exc:
                log.warning("reconciler_sweep_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            self.metrics.resumed.inc(len(resumed))
            self.metrics.writebacks.inc(len(repaired))
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

    # -- health -----------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.is_leader and self.stream.connected and self.publish_ok

    def serve_health(self, host: str, port: int) -> ThreadingHTTPServer:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = (
                        generate_latest(listener.metrics.registry),
                        "text/plain; version=0.0.4",
                        200,
                    )
                elif self.path == "/healthz":
                    ok = listener.healthy()
                    body = json.dumps(
                        {
                            "ok": ok,
                            "leader": listener.is_leader,
                            "subscribed": listener.stream.connected,
                            "can_publish": listener.publish_ok,
                        }
                    ).encode()
                    ctype, code = "application/json", 200 if ok else 503
                elif self.path == "/livez":
                    body, ctype, code = b'{"ok": true}', "application/json", 200
                else:
                    body, ctype, code = b"not found", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server


def _parse_replay(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().upper()
    if text in REPLAY_PRESETS:
        return REPLAY_PRESETS[text]
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter("expected LATEST, EARLIEST or a replay id") from None


@click.command()
@click.option(
    "--replay-from",
    metavar="LATEST|EARLIEST|REPLAY_ID",
    help="Ignore the stored checkpoint once and subscribe from here (e.g. to replay after an incident).",
)
@click.option(
    "--health-port",
    type=int,
    default=None,
    help="Port of /healthz, /livez and /metrics (default: LISTENER_HEALTH_PORT; 0 turns it off).",
)
@pass_ctx
def listen(ctx: Context, replay_from: str | None, health_port: int | None) -> None:
    """Subscribe to the provisioning Platform Event and publish a Celery task per event.

    Runs until SIGTERM or Ctrl-C: the event in hand is finished, the checkpoint
    written and the leader lock released, then it exits 0. Start position: the
    stored checkpoint, else SF_EVENTS_REPLAY; a checkpoint too old for the event
    bus falls back to SF_EVENTS_REPLAY_FALLBACK. Other replicas wait as hot
    standbys. The leader also runs the reconciler (every RECONCILE_INTERVAL_S).
    """
    settings = ctx.settings
    if not settings.sf_events_enabled:
        click.echo("SF_EVENTS_ENABLED is false: the listener has nothing to do.", err=True)
        return
    settings.require("sf_login_url", "sf_client_id", "sf_username", "sf_private_key_file")
    start = _parse_replay(replay_from)
    services = Services(settings)
    listener = Listener(
        settings,
        services=services,
        publisher=make_publisher(settings),
        stream=StreamingClient.from_settings(settings),
        replay_from=start,
    )
    port = settings.listener_health_port if health_port is None else health_port
    server = listener.serve_health(settings.listener_health_host, port) if port else None

    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # The handler only sets a flag: stopping the stream takes locks the main thread may hold.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    def _stopper() -> None:
        stop_requested.wait()
        listener.stop()

    threading.Thread(target=_stopper, name="stopper", daemon=True).start()
    listener.run()
    if server is not None:
        server.shutdown()
    log.info("listener_stopped", channel=settings.sf_provision_event_channel)
