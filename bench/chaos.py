"""Chaos acceptance: Orders provisioned through faults, kills and a Redis restart, each effect once.

Seeds N Orders in the sandbox (eSIM and physical SIM; ~2% whose WHMCS client has
no pay method), runs the real listener and three real workers on a Redis of its
own (``appendonly yes``, a free port, a temp ``--dir``), publishes the events and
meanwhile injects, on every external call, transient errors and ambiguous
failures (applied, answer lost), publishes some events two or three times,
approves some Orders twice (a second event with a new ``IdemKey__c``),
SIGKILLs a random worker every few seconds, SIGKILLs the listener twice and
restarts Redis once; dead processes are restarted as a supervisor would.
With ``--broker rabbitmq`` the broker is a RabbitMQ node of the run's own (free
ports, its own data directory and node name; quorum queues unless
``--queue-type classic``), which is also restarted once; Redis then holds only
the ledger.

Then the faults stop, the system settles, and the simulators' own records are
checked: every Order Activated except the permanent cases (Failed, "no valid
payment method", in the failed registry); one WHMCS order per activated Order;
one confirmed eSIM profile per activated eSIM Order and no ICCID left reserved;
one e-mail per activated Order (extra copies only with the same Message-ID, after
an unknown outcome); a run in the ledger for every published Order, and per Order
exactly one run that acted (the others joined, skipped or superseded). Finally the
permanent cases get a pay method and ``provisioning requeue --all`` (the real
CLI) must bring them to Activated with no duplicate effect.

Prints the counts, the faults injected, the kills and restarts, what the system
did about them (from the logs and the ledger) and the time to settle; exits 1 on
any violation::

    .venv/bin/python -m bench.chaos                 # 1,000 Orders
    .venv/bin/python -m bench.chaos --orders 100    # the CI size
    .venv/bin/python -m bench.chaos --orders 100 --broker rabbitmq   # on quorum queues
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from provisioning.core.logs import configure_logging
from provisioning.core.settings import Settings
from provisioning.email.message import message_id_for
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN
from provisioning.runs.services import Services
from provisioning.sandbox.processes import ManagedProcess, free_port, listener, start_worker, worker
from provisioning.sandbox.rabbitmq_server import RabbitServer
from provisioning.sandbox.redis_server import RedisServer
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import (
    Effects,
    SeededOrder,
    count_effects,
    event_payload,
    publish_events_admin,
    seed_orders,
)
from provisioning.whmcs.steps import NOTE_PREFIX

SIMULATORS = ("salesforce", "whmcs", "smdp", "smtp")
# HTTP status of injected errors per simulator (see each simulator's docstring): WHMCS 200 is its
# "SQLSTATE[...]" envelope, Salesforce 200 is 400 UNABLE_TO_LOCK_ROW; SMTP always answers 451.
ERROR_STATUS = {"salesforce": 200, "whmcs": 200, "smdp": 503, "smtp": 503}
# Salesforce: fault the REST calls of the workers; the token endpoint and CometD stay sane.
SALESFORCE_FAULTED_OPERATIONS = ["query", "order_get", "order_patch"]
NO_PAY_METHOD_REASON = "no valid payment method"
PAY_METHOD_FIX = {"type": "CreditCard", "card_last_four": "4242", "expiry_date": "12/30"}
TERMINAL_STATUSES = ("Activated", "Failed")

# Events are spread over at least this long (so a small run still sees several worker kills).
MIN_PUBLISH_S = 30.0
# The chaos loop's tick, and how often it reads the Orders' progress from the simulator.
TICK_S = 0.2
PROGRESS_POLL_S = 2.0
# Listener SIGKILLs and the Redis restart happen once this share of the events is published.
LISTENER_KILLS_AT = (0.3, 0.7)
REDIS_RESTART_AT = 0.5
# With --broker rabbitmq, the RabbitMQ node restarts at this share.
RABBITMQ_RESTART_AT = 0.65
# Seconds to wait for a listener to be healthy, for the CLI.
LISTENER_READY_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 2.0
# Polls of the settle wait.
SETTLE_POLL_S = 1.0
SETTLE_REPORT_S = 15.0

# Settings for a run with many faults: short backoffs, quick lease expiry and redelivery, and
# enough retries that a 20% error rate never exhausts them (see docs/reliability.md).
CHAOS_SETTINGS: dict[str, Any] = {
    "task_retry_backoff_s": 0.2,
    "task_retry_backoff_max_s": 2.0,
    "task_max_retries": 25,
    "task_max_age_s": 7200,
    "run_lease_ttl_s": 10,
    "celery_visibility_timeout_s": 12,
    "reconcile_interval_s": 2,
    "reconcile_idle_s": 20,
    "listener_lock_ttl_s": 3,
    "sf_events_replay": "EARLIEST",
    "log_format": "json",
    "listener_health_port": 0,
}

# Log events counted per process kind, to explain what the system did about each fault.
WORKER_EVENTS = (
    "step_retry",
    "whmcs_order_adopted",
    "esim_download_repeat",
    "esim_confirm_repeat",
    "email_resent_after_unknown_outcome",
    "run_joined",
    "order_not_activating",
    "failed_run_superseded",
    "step_lease_busy",
    "step_stopped_run_ended",
    "run_failed",
    "failure_writeback_retry",
    "failure_writeback_written",
    "order_writeback_failed",
    "salesforce_session_expired",
)
LISTENER_EVENTS = (
    "batch_handled",
    "event_quarantined",
    "listener_leader",
    "listener_standby",
    "listener_outage",
    "listener_outage_over",
    "listener_lock_renew_failed",
    "listener_source_failed",
    "run_resumed_by_reconciler",
    "failure_writeback_repaired",
    "failure_writeback_retry_later",
    "reconciler_sweep_failed",
    "streaming_reconnect",
    "streaming_rehandshake",
    "order_backfilled",
    "pubsub_reconnect",
    "pubsub_auth_invalid",
    "pubsub_stall_recovered",
)
# Lines of Celery's own that tell about broker trouble and redeliveries.
CELERY_MARKERS = {
    "unrecoverable_error": "Unrecoverable error",
    "broker_connection_lost": "Connection to broker lost",
    "broker_reconnect_attempts": "Cannot connect to redis",
    "broker_reconnect_attempts_amqp": "Cannot connect to amqp",
    "restored_unacked": "Restoring",
}


# -- configuration ------------------------------------------------------------------------------


@dataclass
class Config:
    orders: int = 1000
    esim_share: float = 0.6
    permanent_share: float = 0.02
    workers: int = 3
    concurrency: int = 8
    error_rate: float = 0.2
    ambiguous_rate: float = 0.02
    duplicate_share: float = 0.10
    triplicate_share: float = 0.3
    second_approval_share: float = 0.10
    publish_s: float = 0.0
    kill_every_min_s: float = 2.0
    kill_every_max_s: float = 5.0
    listener_kills: int = 2
    redis_restarts: int = 1
    redis_down_s: float = 3.0
    broker: str = "redis"
    queue_type: str = "quorum"
    rabbitmq_restarts: int = 1
    rabbitmq_down_s: float = 3.0
    redis_stop_signal: str = "TERM"
    faults_until: float = 0.95
    chaos_max_s: float = 0.0
    settle_timeout_s: float = 600.0
    quiet_s: float = 0.0
    seed: int = 2024
    workdir: Path | None = None
    keep: bool = False
    json_out: Path | None = None

    def publish_duration_s(self) -> float:
        """Events are spread over this long, so that the faults meet runs at every stage."""
        return self.publish_s or max(MIN_PUBLISH_S, self.orders / 10)

    def chaos_cap_s(self) -> float:
        return self.chaos_max_s or self.publish_duration_s() * 3 + 60


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    d = Config()
    p.add_argument("--orders", type=int, default=d.orders, help="Orders to seed (default %(default)s)")
    p.add_argument("--esim-share", type=float, default=d.esim_share, help="share of eSIM Orders")
    p.add_argument(
        "--permanent-share",
        type=float,
        default=d.permanent_share,
        help="share of Orders whose client has no pay method (at least 1)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="threads per worker")
    p.add_argument("--error-rate", type=float, default=d.error_rate, help="transient errors per call")
    p.add_argument(
        "--ambiguous-rate", type=float, default=d.ambiguous_rate, help="applied-then-lost calls per call"
    )
    p.add_argument(
        "--duplicate-share", type=float, default=d.duplicate_share, help="share of events published twice+"
    )
    p.add_argument(
        "--triplicate-share",
        type=float,
        default=d.triplicate_share,
        help="share of the duplicated events published three times",
    )
    p.add_argument(
        "--second-approval-share",
        type=float,
        default=d.second_approval_share,
        help="share of Orders approved twice: a second event with a new IdemKey__c",
    )
    p.add_argument(
        "--publish-s", type=float, default=d.publish_s, help="spread the events over this long (0: N/10 s)"
    )
    p.add_argument("--kill-every-min-s", type=float, default=d.kill_every_min_s)
    p.add_argument("--kill-every-max-s", type=float, default=d.kill_every_max_s)
    p.add_argument(
        "--listener-kills", type=int, default=d.listener_kills, choices=range(len(LISTENER_KILLS_AT) + 1)
    )
    p.add_argument("--redis-restarts", type=int, default=d.redis_restarts, choices=(0, 1))
    p.add_argument("--redis-down-s", type=float, default=d.redis_down_s, help="Redis stays down this long")
    p.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default=d.broker,
        help="Redis (with the ledger) or a RabbitMQ node of the run's own",
    )
    p.add_argument(
        "--queue-type", choices=("quorum", "classic"), default=d.queue_type, help="RabbitMQ queue type"
    )
    p.add_argument(
        "--rabbitmq-restarts",
        type=int,
        default=d.rabbitmq_restarts,
        choices=(0, 1),
        help="with --broker rabbitmq",
    )
    p.add_argument(
        "--rabbitmq-down-s", type=float, default=d.rabbitmq_down_s, help="RabbitMQ stays stopped this long"
    )
    p.add_argument(
        "--redis-stop-signal",
        choices=("TERM", "KILL"),
        default=d.redis_stop_signal,
        help="how Redis is stopped (KILL adds --appendfsync always so no acknowledged write is lost)",
    )
    p.add_argument(
        "--faults-until",
        type=float,
        default=d.faults_until,
        help="faults go on until this share of the Orders is Activated/Failed (or --chaos-max-s)",
    )
    p.add_argument(
        "--chaos-max-s", type=float, default=d.chaos_max_s, help="cap of the chaos phase (0: auto)"
    )
    p.add_argument("--settle-timeout-s", type=float, default=d.settle_timeout_s)
    p.add_argument(
        "--quiet-s", type=float, default=d.quiet_s, help="wait after settling, then count again (0: auto)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", type=Path, help="logs and Redis data here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (kept anyway on a violation)")
    p.add_argument("--json-out", type=Path, help="write the summary as JSON here")
    args = p.parse_args(argv)
    return Config(**{k: v for k, v in vars(args).items()})


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Disruptions:
    worker_kills: int = 0
    listener_kills: int = 0
    redis_restarts: int = 0
    redis_down_s: float = 0.0
    rabbitmq_restarts: int = 0
    rabbitmq_down_s: float = 0.0
    worker_crash_restarts: int = 0
    listener_crash_restarts: int = 0
    crash_exit_codes: list[int] = field(default_factory=list)


class Fleet:
    """The workers and the listener, restarted when they die (as a supervisor would)."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, cfg: Config, rng: random.Random, *, suffix: str = ""
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.cfg = cfg
        self.rng = rng
        # ``suffix`` makes the workers' node names unique on a broker other runs share (Celery's mailbox).
        self.workers = [
            worker(env, log_dir, name=f"w{i + 1}{suffix}", pool="threads", concurrency=cfg.concurrency)
            for i in range(cfg.workers)
        ]
        self.listener: ManagedProcess | None = None
        self.health_port = 0
        self.stats = Disruptions()
        self.supervising = True

    def start(self) -> None:
        for i, w in enumerate(self.workers):
            self.workers[i] = start_worker(
                self.env, self.log_dir, name=w.name, pool="threads", concurrency=self.cfg.concurrency
            )
        self._start_listener()
        deadline = time.monotonic() + LISTENER_READY_TIMEOUT_S
        while not self.listener_healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not become healthy")
            time.sleep(0.2)

    def _start_listener(self) -> None:
        self.health_port = free_port()
        self.listener = listener(
            self.env, self.log_dir, name="listener", extra=["--health-port", str(self.health_port)]
        ).start()

    def listener_healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            return requests.get(url, timeout=HEALTH_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            return False

    def kill_random_worker(self) -> str:
        return self.kill_worker(self.rng.choice(self.workers))

    def kill_worker(self, victim: ManagedProcess) -> str:
        """SIGKILL one worker and start it again at once (a supervisor's restart)."""
        victim.kill()
        self.stats.worker_kills += 1
        victim.start()
        return victim.name

    def kill_listener(self) -> None:
        assert self.listener is not None
        self.listener.kill()
        self.stats.listener_kills += 1
        self._start_listener()

    def supervise(self) -> None:
        """Restart any process that died on its own (e.g. Celery's "Unrecoverable error")."""
        if not self.supervising:
            return
        for w in self.workers:
            if not w.alive():
                assert w.proc is not None
                self.stats.crash_exit_codes.append(int(w.proc.returncode))
                self.stats.worker_crash_restarts += 1
                w.start()
        if self.listener is not None and not self.listener.alive():
            assert self.listener.proc is not None
            self.stats.crash_exit_codes.append(int(self.listener.proc.returncode))
            self.stats.listener_crash_restarts += 1
            self._start_listener()

    def stop(self) -> None:
        self.supervising = False
        procs = [*self.workers, *([self.listener] if self.listener else [])]
        for p in procs:
            if p.alive():
                assert p.proc is not None
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.stop(grace_s=10)


# -- events ---------------------------------------------------------------------------------------


SECOND_APPROVAL_KEY = "approval-2"


@dataclass
class EventPlan:
    payloads: list[dict[str, Any]]
    twice: int
    thrice: int
    approved_twice: int


def plan_events(orders: list[SeededOrder], cfg: Config, rng: random.Random) -> EventPlan:
    """One event per Order in random order; some published twice or three times, some approved twice.

    Half of the extra copies follow their original at once (both reach the broker before
    the run starts), the others come at a random later point (often after the run is done).
    An Order approved twice gets a second event with a new ``IdemKey__c`` (a Flow firing
    twice): still one provisioning. Orders without a pay method are not approved twice, so
    that the failed registry holds exactly their first runs for the requeue.
    """
    shuffled = orders[:]
    rng.shuffle(shuffled)
    payloads = [event_payload(o) for o in shuffled]
    n_dup = round(len(orders) * cfg.duplicate_share)
    duplicated = rng.sample(range(len(shuffled)), n_dup)
    n_thrice = round(n_dup * cfg.triplicate_share)
    thrice = set(duplicated[:n_thrice])
    inserts: list[tuple[int, dict[str, Any]]] = []
    for k, index in enumerate(duplicated):
        for _ in range(2 if index in thrice else 1):
            at = index + 1 if k % 2 == 0 else rng.randint(index + 1, len(shuffled))
            inserts.append((at, event_payload(shuffled[index])))
    paying = [i for i, o in enumerate(shuffled) if o.has_pay_method]
    approved = rng.sample(paying, min(len(paying), round(len(orders) * cfg.second_approval_share)))
    for k, index in enumerate(approved):
        at = index + 1 if k % 2 == 0 else rng.randint(index + 1, len(shuffled))
        inserts.append((at, {"OrderId__c": shuffled[index].order_id, "IdemKey__c": SECOND_APPROVAL_KEY}))
    for at, payload in sorted(inserts, key=lambda item: -item[0]):
        payloads.insert(at, payload)
    return EventPlan(payloads=payloads, twice=n_dup - n_thrice, thrice=n_thrice, approved_twice=len(approved))


# -- reading the system ---------------------------------------------------------------------------


def sf_orders(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    return {o["Id"]: o for o in sandbox.admin("salesforce").get("/__admin/orders")["orders"]}


def terminal_share(sandbox: Sandbox, n: int) -> float:
    statuses = Counter(o.get("Activation_Status__c") for o in sf_orders(sandbox).values())
    return sum(statuses[s] for s in TERMINAL_STATUSES) / max(1, n)


def injected_faults(sandbox: Sandbox) -> dict[str, dict[str, int]]:
    return {sim: dict(sandbox.admin(sim).get("/__admin/calls")["injected"]) for sim in SIMULATORS}


def api_calls(sandbox: Sandbox) -> dict[str, dict[str, int]]:
    """Calls per simulator and operation (faulted or not)."""
    return {sim: dict(sandbox.admin(sim).get("/__admin/calls")["calls"]) for sim in SIMULATORS}


def set_faults(sandbox: Sandbox, cfg: Config, *, on: bool) -> None:
    for sim in SIMULATORS:
        body: dict[str, Any] = {}
        if on:
            body = {
                "error_rate": cfg.error_rate,
                "ambiguous_rate": cfg.ambiguous_rate,
                "error_status": ERROR_STATUS[sim],
            }
            if sim == "salesforce":
                body["operations"] = SALESFORCE_FAULTED_OPERATIONS
        sandbox.admin(sim).post("/__admin/faults", body)


def count_log_events(log_dir: Path) -> dict[str, Counter[str]]:
    """Per process kind ("worker", "listener"): how many lines of each log event."""
    out: dict[str, Counter[str]] = {"worker": Counter(), "listener": Counter()}
    for path in sorted(log_dir.glob("*.log")):
        kind = "listener" if path.name.startswith("listener") else "worker"
        counter = out[kind]
        for line in path.read_text(errors="replace").splitlines():
            for name, marker in CELERY_MARKERS.items():
                if marker in line:
                    counter[name] += 1
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = record.get("event")
            if isinstance(event, str) and " " not in event:
                counter[event] += 1
    return out


# -- checks ---------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Snapshot:
    """The effects of the run, counted from the simulators' and the ledger's records."""

    effects: Effects
    checks: list[Check]
    emails_extra: int
    email_duplicates: dict[str, int]


def check_effects(
    sandbox: Sandbox,
    services: Services,
    orders: list[SeededOrder],
    *,
    expect_failed: set[str],
    message_id_domain: str,
) -> Snapshot:
    """Compare what the simulators and the ledger hold with what each Order should have caused."""
    checks: list[Check] = []

    def check(name: str, expected: object, observed: object, ok: bool | None = None) -> None:
        checks.append(Check(name, str(expected), str(observed), expected == observed if ok is None else ok))

    records = sf_orders(sandbox)
    effects = count_effects(sandbox, note_prefix=NOTE_PREFIX)
    expect_activated = [o for o in orders if o.run_id not in expect_failed]
    activated_ids = {o.order_id for o in orders if records[o.order_id]["Activation_Status__c"] == "Activated"}

    # Salesforce: the final state of every Order.
    not_activated = [o.order_id for o in expect_activated if o.order_id not in activated_ids]
    check("Orders Activated", len(expect_activated), len(expect_activated) - len(not_activated))
    if not_activated:
        states = Counter(str(records[i]["Activation_Status__c"]) for i in not_activated)
        check("  of which not Activated (by status)", "{}", dict(states))
    failed_right = [
        o
        for o in orders
        if o.run_id in expect_failed
        and records[o.order_id]["Activation_Status__c"] == "Failed"
        and NO_PAY_METHOD_REASON in (records[o.order_id].get("Activation_Error__c") or "")
    ]
    check(f'Orders Failed with "{NO_PAY_METHOD_REASON}"', len(expect_failed), len(failed_right))
    registry = {str(r.run_id): r for r in services.ledger.registries.failed()}
    at_payment = {r for r, rec in registry.items() if rec.failed_step == "validate_payment"}
    check(
        "failed registry: the permanent cases, at validate_payment",
        f"{len(expect_failed)} runs",
        f"{len(at_payment & expect_failed)} of them, {len(set(registry) - (at_payment & expect_failed))} others",
        ok=set(registry) == expect_failed == at_payment,
    )

    # WHMCS: one order per activated Order, carrying its Order id, accepted; the Order points at it.
    expected_orders = {o.order_id for o in expect_activated}
    check("WHMCS orders", len(expect_activated), effects.whmcs_orders)
    check("WHMCS orders accepted (Active)", effects.whmcs_orders, effects.whmcs_accepted)
    check(
        "WHMCS orders with an Order id in notes",
        effects.whmcs_orders,
        sum(effects.whmcs_orders_per_order.values()),
    )
    check(
        "Orders with a WHMCS order",
        len(expected_orders),
        len(set(effects.whmcs_orders_per_order) & expected_orders),
    )
    check("WHMCS duplicate orders (same Order twice)", 0, effects.duplicate_whmcs_orders)
    whmcs_by_note = {
        (o.get("notes") or "").split(NOTE_PREFIX, 1)[-1].strip(): str(o["id"])
        for o in sandbox.admin("whmcs").get("/__admin/orders")["orders"]
    }
    mismatched = [
        o.order_id
        for o in expect_activated
        if o.order_id in activated_ids
        and str(records[o.order_id].get("WHMCS_Order_ID__c")) != whmcs_by_note.get(o.order_id)
    ]
    check("Orders whose WHMCS_Order_ID__c is not their own WHMCS order", 0, len(mismatched))

    # eSIM: one confirmed profile per activated eSIM Order; nothing reserved and left unused.
    esim_activated = [o for o in expect_activated if o.esim and o.order_id in activated_ids]
    profiles = sandbox.admin("smdp").get("/__admin/profiles/summary")
    check("eSIM profiles confirmed", len(esim_activated), effects.esim_confirmed)
    check("eSIM profiles allocated/linked (reserved, unused)", 0, effects.esim_reserved_unconfirmed)
    stock = services.inventory.stock()
    check("inventory ICCIDs claimed and not used", 0, stock.claimed)
    check("inventory ICCIDs used", len(esim_activated), stock.used)
    iccids = [records[o.order_id].get("ESIM_ICCID__c") for o in esim_activated]
    check("eSIM Orders with a distinct ICCID", len(esim_activated), len({i for i in iccids if i}))
    check("profile pool states", "", json.dumps(profiles, sort_keys=True), ok=True)

    # E-mail: one Message-ID per activated Order; extra copies only with that same Message-ID,
    # and only for runs whose send ended with an unknown outcome (counted in the ledger).
    summary = sandbox.admin("smtp").get("/__admin/messages/summary")
    messages = sandbox.admin("smtp").get("/__admin/messages")["messages"]
    expected_ids = {message_id_for(o.order_id, message_id_domain): o.order_id for o in expect_activated}
    seen_ids = Counter(str(m["message_id"]) for m in messages)
    check("e-mails: distinct Message-IDs", len(expect_activated), effects.distinct_message_ids)
    check("e-mails with a Message-ID of no activated run", 0, len(set(seen_ids) - set(expected_ids)))
    duplicates = {str(k): int(v) for k, v in (summary.get("duplicates") or {}).items()}
    extra = effects.emails - effects.distinct_message_ids
    unexplained = []
    for mid, copies in duplicates.items():
        order_id = expected_ids.get(mid)
        resends = int(services.ledger.orders.marker(order_id, "email_resends") or 0) if order_id else 0
        if copies - 1 > resends:
            unexplained.append(mid)
    check(
        "e-mail extra copies (same Message-ID, at-least-once)",
        "only after an unknown outcome",
        f"{extra} extra in {len(duplicates)} Message-IDs, {len(unexplained)} unexplained",
        ok=not unexplained,
    )

    # Ledger: a run for every published Order, none left unfinished; per Order exactly one run
    # that acted (done, or failed for the permanent cases), the others joined, skipped or superseded.
    runs = {o.run_id: services.ledger.runs.get(o.run_id) for o in orders}
    check(
        "Orders with a run in the ledger (no event lost)",
        len(orders),
        sum(r is not None for r in runs.values()),
    )
    acted: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for o in orders:
        order_runs = [services.ledger.runs.get(r) for r in services.ledger.orders.runs(o.order_id)]
        finals = [r for r in order_runs if r is not None and r.state in (RunState.DONE, RunState.FAILED)]
        acted[" + ".join(sorted(r.state.value for r in finals)) or "none"] += 1
        others.update(r.state.value for r in order_runs if r is not None and r not in finals)
    expected_acted = {"done": len(expect_activated)} | (
        {"failed": len(expect_failed)} if expect_failed else {}
    )
    check("Orders by the run that acted on them", expected_acted, dict(acted))
    check(
        "other runs: joined, skipped or superseded only",
        "no other state",
        dict(others),
        ok=set(others) <= {"joined", "skipped", "superseded"},
    )
    check("ledger unfinished runs (active set)", 0, services.ledger.registries.unfinished())
    check("quarantined events", 0, len(services.ledger.registries.quarantined()))
    return Snapshot(effects=effects, checks=checks, emails_extra=extra, email_duplicates=duplicates)


def ledger_attempts(services: Services, orders: Iterable[SeededOrder]) -> dict[str, dict[str, int]]:
    """Per step: how many runs did it, and how many attempts it took in all (retries included)."""
    out: dict[str, dict[str, int]] = {s: {"runs": 0, "attempts": 0, "max": 0} for s in CHAIN.names}
    resends = 0
    for o in orders:
        provisioning = services.ledger.orders.provisioning(o.order_id)
        resends += int(provisioning.markers.get("email_resends", 0))
        runs = services.ledger.runs.get_many(services.ledger.orders.runs(o.order_id))
        for spec in CHAIN:
            # Attempts are counted per run; the Order's step may have taken several runs.
            tries = sum(CHAIN.record(r, provisioning, spec).attempts for r in runs)
            if tries:
                out[spec.name]["runs"] += 1
                out[spec.name]["attempts"] += tries
                out[spec.name]["max"] = max(out[spec.name]["max"], tries)
    out["email_resends"] = {"runs": 0, "attempts": resends, "max": 0}
    return out


# -- the run --------------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, poll_s: float, tick: Callable[[], None]
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tick()
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def build_settings(
    sandbox: Sandbox,
    redis_server: RedisServer,
    rabbitmq: RabbitServer | None = None,
    queue_type: str = "quorum",
) -> Settings:
    values: dict[str, Any] = {k.lower(): v for k, v in sandbox.env().items()}
    values.update(
        CHAOS_SETTINGS,
        redis_url=redis_server.url(0),
        celery_broker_url=rabbitmq.url if rabbitmq else redis_server.url(1),
        celery_queue_type=queue_type,
        ledger_prefix="chaos",
        celery_queue="chaos",
    )
    return Settings(_env_file=None, **values)


def run_requeue_cli(env: dict[str, str]) -> list[dict[str, Any]]:
    exe = Path(sys.executable).with_name("provisioning")
    argv = [str(exe) if exe.exists() else "provisioning", "requeue", "--all", "--json"]
    done = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"provisioning requeue --all exited {done.returncode}: {done.stderr[-2000:]}")
    outcomes: list[dict[str, Any]] = json.loads(done.stdout)
    return outcomes


@dataclass
class Summary:
    config: dict[str, Any]
    seeded: dict[str, int]
    events: dict[str, int]
    disruptions: dict[str, Any]
    injected: dict[str, dict[str, int]]
    api_calls: dict[str, dict[str, int]]
    timings_s: dict[str, float]
    checks: list[dict[str, Any]]
    requeue_checks: list[dict[str, Any]]
    recovery: dict[str, Any]
    violations: list[str]
    workdir: str


def run(cfg: Config) -> Summary:
    rng = random.Random(cfg.seed)
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    stop_signal = signal.SIGKILL if cfg.redis_stop_signal == "KILL" else signal.SIGTERM
    # A SIGKILL must not lose an acknowledged write: fsync every write then.
    redis_server = RedisServer(
        workdir / "redis",
        appendonly=True,
        appendfsync="always" if stop_signal is signal.SIGKILL else None,
    )
    redis_server.start()
    rabbitmq = RabbitServer(workdir / "rabbitmq") if cfg.broker == "rabbitmq" else None
    if rabbitmq is not None:
        rabbitmq.start()
    sandbox = Sandbox(workdir / "sandbox", seed=cfg.seed, long_poll_s=10.0).start()
    fleet: Fleet | None = None
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        settings = build_settings(sandbox, redis_server, rabbitmq, cfg.queue_type)
        # This process's own lines (the simulators' included) go to a file, not the table.
        runner_log = (workdir / "runner.log").open("a")
        configure_logging(settings, stream=runner_log)
        env = settings.to_env()
        services = Services(settings)
        n_permanent = max(1, round(cfg.orders * cfg.permanent_share)) if cfg.permanent_share > 0 else 0
        orders = seed_orders(
            sandbox,
            services.inventory,
            count=cfg.orders,
            esim_share=cfg.esim_share,
            without_pay_method=n_permanent,
            seed=cfg.seed,
        )
        permanent = {o.run_id for o in orders if not o.has_pay_method}
        plan = plan_events(orders, cfg, rng)
        log(
            f"seeded {len(orders)} Orders ({sum(o.esim for o in orders)} eSIM, {len(permanent)} without a pay"
            f" method); {len(plan.payloads)} events to publish; workdir {workdir}"
        )

        fleet = Fleet(env, log_dir, cfg, rng)
        fleet.start()
        timings["startup"] = time.monotonic() - t0
        set_faults(sandbox, cfg, on=True)
        log(f"faults on: {cfg.error_rate:.0%} errors, {cfg.ambiguous_rate:.0%} ambiguous on every simulator")

        # -- chaos --------------------------------------------------------------------------------
        chaos_start = time.monotonic()
        batches = max(1, math.ceil(cfg.publish_duration_s() / 0.5))
        per_batch = math.ceil(len(plan.payloads) / batches)
        published = 0
        next_publish = chaos_start
        next_kill = chaos_start + rng.uniform(cfg.kill_every_min_s, cfg.kill_every_max_s)
        listener_kills_due = list(LISTENER_KILLS_AT[: cfg.listener_kills])
        redis_due = [REDIS_RESTART_AT][: cfg.redis_restarts]
        redis_back_at: float | None = None
        redis_down_since = 0.0
        rabbitmq_due = [RABBITMQ_RESTART_AT][: cfg.rabbitmq_restarts if rabbitmq else 0]
        progress = 0.0
        next_progress = chaos_start
        while True:
            now = time.monotonic()
            if published < len(plan.payloads) and now >= next_publish:
                chunk = plan.payloads[published : published + per_batch]
                publish_events_admin(sandbox, chunk)
                published += len(chunk)
                next_publish += 0.5
            share = published / len(plan.payloads)
            if now >= next_kill:
                name = fleet.kill_random_worker()
                log(f"SIGKILL worker {name} (kill {fleet.stats.worker_kills}); restarted")
                next_kill = now + rng.uniform(cfg.kill_every_min_s, cfg.kill_every_max_s)
            if listener_kills_due and share >= listener_kills_due[0]:
                listener_kills_due.pop(0)
                fleet.kill_listener()
                log(f"SIGKILL listener (kill {fleet.stats.listener_kills}); restarted")
            if redis_due and share >= redis_due[0] and redis_back_at is None:
                redis_due.pop(0)
                redis_down_since = now
                redis_server.stop(stop_signal)
                redis_back_at = now + cfg.redis_down_s
                log(f"Redis stopped (SIG{cfg.redis_stop_signal}) for {cfg.redis_down_s:.0f} s")
            if redis_back_at is not None and now >= redis_back_at:
                redis_server.start()
                fleet.stats.redis_restarts += 1
                fleet.stats.redis_down_s = round(time.monotonic() - redis_down_since, 1)
                redis_back_at = None
                log("Redis restarted")
            if rabbitmq is not None and rabbitmq_due and share >= rabbitmq_due[0] and redis_back_at is None:
                rabbitmq_due.pop(0)
                down_since = time.monotonic()
                rabbitmq.stop()
                log(f"RabbitMQ stopped (SIGTERM) for {cfg.rabbitmq_down_s:.0f} s")
                time.sleep(cfg.rabbitmq_down_s)
                rabbitmq.start()
                fleet.stats.rabbitmq_restarts += 1
                fleet.stats.rabbitmq_down_s = round(time.monotonic() - down_since, 1)
                log(f"RabbitMQ restarted (down {fleet.stats.rabbitmq_down_s} s)")
            if redis_back_at is None:
                fleet.supervise()
            if now >= next_progress:
                progress = terminal_share(sandbox, len(orders))
                next_progress = now + PROGRESS_POLL_S
            disruptions_done = (
                not listener_kills_due and not redis_due and redis_back_at is None and not rabbitmq_due
            )
            enough = progress >= cfg.faults_until or now - chaos_start >= cfg.chaos_cap_s()
            if published == len(plan.payloads) and disruptions_done and enough:
                break
            time.sleep(TICK_S)
        timings["chaos"] = time.monotonic() - chaos_start
        set_faults(sandbox, cfg, on=False)
        injected = injected_faults(sandbox)
        log(f"faults off after {timings['chaos']:.0f} s, {progress:.0%} of the Orders finished")

        # -- settle -------------------------------------------------------------------------------
        settle_start = time.monotonic()

        def settled() -> bool:
            records = sf_orders(sandbox).values()
            if any(r["Activation_Status__c"] not in TERMINAL_STATUSES for r in records):
                return False
            if services.ledger.registries.unfinished():
                return False
            return all(services.ledger.runs.get(o.run_id) is not None for o in orders)

        last_report = [time.monotonic()]

        def tick() -> None:
            fleet.supervise()
            if time.monotonic() - last_report[0] >= SETTLE_REPORT_S:
                last_report[0] = time.monotonic()
                active = services.ledger.registries.unfinished()
                log(
                    f"settling: {terminal_share(sandbox, len(orders)):.1%} of the Orders finished, {active} runs active"
                )

        violations: list[str] = []
        if wait_for(settled, cfg.settle_timeout_s, SETTLE_POLL_S, tick):
            timings["settle"] = time.monotonic() - settle_start
            log(f"settled in {timings['settle']:.1f} s")
        else:
            timings["settle"] = time.monotonic() - settle_start
            stuck = describe_stuck(services, orders)
            violations.append(f"not settled within {cfg.settle_timeout_s:.0f} s: {stuck}")
            log(f"NOT settled within {cfg.settle_timeout_s:.0f} s: {stuck}")
        # Late redeliveries (a message of a killed worker comes back after the visibility
        # timeout) must find nothing left to do: wait past it and count then.
        quiet_s = cfg.quiet_s or settings.celery_visibility_timeout_s + 8
        wait_for(lambda: False, quiet_s, SETTLE_POLL_S, fleet.supervise)
        domain = settings.email_message_id_domain
        snapshot = check_effects(sandbox, services, orders, expect_failed=permanent, message_id_domain=domain)
        attempts = ledger_attempts(services, orders)
        violations += [
            f"{c.name}: expected {c.expected}, observed {c.observed}" for c in snapshot.checks if not c.ok
        ]

        # -- requeue the permanent cases once fixed --------------------------------------------------
        requeue_start = time.monotonic()
        whmcs = sandbox.admin("whmcs")
        for o in orders:
            if o.run_id in permanent:
                whmcs.post(f"/__admin/clients/{o.whmcs_client_id}/paymethods", PAY_METHOD_FIX)
        outcomes = run_requeue_cli(env)
        requeued = {o["target"] for o in outcomes if o["action"] == "requeued"}
        if requeued != permanent:
            violations.append(
                f"requeue --all requeued {len(requeued)} runs, expected the {len(permanent)} fixed ones"
            )

        def requeued_done() -> bool:
            runs = [services.ledger.runs.get(run_id) for run_id in permanent]
            return all(r is not None and r.state is RunState.DONE for r in runs)

        if not wait_for(requeued_done, cfg.settle_timeout_s, SETTLE_POLL_S, tick):
            violations.append(f"the requeued runs were not done within {cfg.settle_timeout_s:.0f} s")
        timings["requeue"] = time.monotonic() - requeue_start
        log(f"requeued {len(requeued)} runs, done in {timings['requeue']:.1f} s")
        wait_for(lambda: False, quiet_s, SETTLE_POLL_S, fleet.supervise)
        after = check_effects(sandbox, services, orders, expect_failed=set(), message_id_domain=domain)
        violations += [
            f"after requeue: {c.name}: expected {c.expected}, observed {c.observed}"
            for c in after.checks
            if not c.ok
        ]
        timings["total"] = time.monotonic() - t0

        logs = count_log_events(log_dir)
        recovery = {
            "worker_log_events": {k: logs["worker"][k] for k in (*WORKER_EVENTS, *CELERY_MARKERS)},
            "listener_log_events": {k: logs["listener"][k] for k in (*LISTENER_EVENTS, *CELERY_MARKERS)},
            "ledger_step_attempts": attempts,
            "email_extra_copies": snapshot.emails_extra,
            "email_duplicated_message_ids": len(snapshot.email_duplicates),
            "requeue_outcomes": dict(Counter(f"{o['action']} at {o['step']}" for o in outcomes)),
        }
        return Summary(
            config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            seeded={
                "orders": len(orders),
                "esim": sum(o.esim for o in orders),
                "physical": sum(not o.esim for o in orders),
                "without_pay_method": len(permanent),
            },
            events={
                "published": len(plan.payloads),
                "orders_published_twice": plan.twice,
                "orders_published_three_times": plan.thrice,
                "orders_approved_twice": plan.approved_twice,
            },
            disruptions=asdict(fleet.stats),
            injected=injected,
            api_calls=api_calls(sandbox),
            timings_s={k: round(v, 1) for k, v in timings.items()},
            checks=[asdict(c) for c in snapshot.checks],
            requeue_checks=[asdict(c) for c in after.checks],
            recovery=recovery,
            violations=violations,
            workdir=str(workdir),
        )
    finally:
        if fleet is not None:
            fleet.stop()
        sandbox.stop()
        redis_server.stop()
        if rabbitmq is not None:
            rabbitmq.stop()


def describe_stuck(services: Services, orders: list[SeededOrder]) -> str:
    stuck = []
    for o in orders:
        run = services.ledger.runs.get(o.run_id)
        if run is None:
            stuck.append(f"{o.run_id}: no run")
        elif run.state not in (RunState.DONE, RunState.FAILED):
            step = CHAIN.first_unfinished(run, services.ledger.orders.provisioning(o.order_id))
            stuck.append(f"{o.run_id}: {run.state.value} at {step} {run.markers}")
    return f"{len(stuck)} runs unfinished: " + "; ".join(stuck[:10])


# -- output ---------------------------------------------------------------------------------------


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render(s: Summary) -> str:
    parts = []
    seeded, ev, d, t = s.seeded, s.events, s.disruptions, s.timings_s
    parts.append(
        f"Chaos run: {seeded['orders']} Orders ({seeded['esim']} eSIM, {seeded['physical']} physical SIM,"
        f" {seeded['without_pay_method']} without a pay method); {s.config['workers']} workers x"
        f" {s.config['concurrency']} threads; {ev['published']} events ({ev['orders_published_twice']} Orders"
        f" twice, {ev['orders_published_three_times']} three times); broker {s.config['broker']}"
        + (f" ({s.config['queue_type']} queues)" if s.config["broker"] == "rabbitmq" else "")
    )
    totals: Counter[str] = Counter()
    rows: list[tuple[str, ...]] = []
    for sim in s.injected:
        calls = s.api_calls.get(sim, {})
        for op in sorted(calls):
            errors = s.injected[sim].get(f"{op}:error", 0)
            ambiguous = s.injected[sim].get(f"{op}:ambiguous", 0)
            totals.update(calls=calls[op], errors=errors, ambiguous=ambiguous)
            rows.append((sim, op, str(calls[op]), str(errors), str(ambiguous)))
    rows.append(("total", "", str(totals["calls"]), str(totals["errors"]), str(totals["ambiguous"])))
    parts.append(
        "Faults injected (simulators' /__admin/calls):\n"
        + table(rows, ("simulator", "operation", "calls", "errors", "ambiguous (applied, answer lost)"))
    )
    parts.append(
        "Kills and restarts:\n"
        + table(
            [
                ("worker SIGKILLs (each restarted)", str(d["worker_kills"])),
                ("listener SIGKILLs (each restarted)", str(d["listener_kills"])),
                (
                    "Redis restarts (ledger)"
                    if s.config["broker"] == "rabbitmq"
                    else "Redis restarts (broker + ledger)",
                    f"{d['redis_restarts']} (down {d['redis_down_s']} s)",
                ),
                ("RabbitMQ restarts (broker)", f"{d['rabbitmq_restarts']} (down {d['rabbitmq_down_s']} s)"),
                ("workers that died on their own, restarted", str(d["worker_crash_restarts"])),
                ("listeners that died on their own, restarted", str(d["listener_crash_restarts"])),
            ],
            ("disruption", "count"),
        )
    )
    parts.append("Timings (s):\n" + table([(k, str(v)) for k, v in t.items()], ("phase", "seconds")))
    for title, checks in (
        ("Checks after settling", s.checks),
        ("Checks after the fix and `provisioning requeue --all`", s.requeue_checks),
    ):
        rows = [("ok" if c["ok"] else "VIOLATION", c["name"], c["expected"], c["observed"]) for c in checks]
        parts.append(f"{title}:\n" + table(rows, ("", "check", "expected", "observed")))
    rec = s.recovery
    rows = [(k, str(v)) for k, v in rec["worker_log_events"].items() if v]
    rows += [(f"listener: {k}", str(v)) for k, v in rec["listener_log_events"].items() if v]
    rows += [
        (f"ledger: attempts of {k}", f"{v['attempts']} for {v['runs']} runs (max {v['max']})")
        for k, v in rec["ledger_step_attempts"].items()
        if k in CHAIN
    ]
    rows.append(
        (
            "ledger: e-mail resends after an unknown outcome",
            str(rec["ledger_step_attempts"]["email_resends"]["attempts"]),
        )
    )
    rows.append(
        (
            "e-mail extra copies (same Message-ID)",
            f"{rec['email_extra_copies']} in {rec['email_duplicated_message_ids']} Message-IDs",
        )
    )
    rows += [(f"requeue: {k}", str(v)) for k, v in rec["requeue_outcomes"].items()]
    parts.append("What the system did (logs and ledger):\n" + table(rows, ("what", "count")))
    if s.violations:
        parts.append("VIOLATIONS:\n" + "\n".join(f"  - {v}" for v in s.violations))
    else:
        parts.append("No violation.")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the workers, the listener and Redis are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    summary = run(cfg)
    print(render(summary), flush=True)
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(asdict(summary), indent=2, default=str))
    workdir = Path(summary.workdir)
    if summary.violations or cfg.keep or cfg.workdir:
        print(f"logs and Redis data kept in {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
