"""The end-to-end harness of the high-availability tests: the sandbox, the real listener and real
workers (on loopback or on hosts of their own), events published in the background, progress read
from the simulators, and each Order's effects checked from their own records at the end."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from provisioning.core.settings import Settings
from provisioning.ledger import RunState
from provisioning.runs.services import Services
from provisioning.sandbox.netns import Host
from provisioning.sandbox.processes import ManagedProcess, free_port, listener, worker
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import (
    SeededOrder,
    effects_by_order,
    event_payload,
    publish_events_admin,
    seed_orders,
)

# Settings for runs with failovers and partitions: short backoffs, leases and redelivery, and
# retries enough that an outage of tens of seconds never exhausts them.
FAST: dict[str, Any] = {
    "task_retry_backoff_s": 0.2,
    "task_retry_backoff_max_s": 2.0,
    "task_max_retries": 40,
    "task_max_age_s": 7200,
    "run_lease_ttl_s": 8,
    "celery_visibility_timeout_s": 10,
    "reconcile_interval_s": 2,
    "reconcile_idle_s": 12,
    "listener_lock_ttl_s": 3,
    "sf_events_replay": "EARLIEST",
    "log_format": "json",
    "redis_wait_timeout_ms": 500,
}
WORKER_READY_TIMEOUT_S = 60.0
LISTENER_READY_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 2.0
# Events go out in batches this far apart.
PUBLISH_EVERY_S = 0.5
POLL_S = 0.5
# After settling, wait this long past the visibility timeout: late redeliveries must find nothing.
QUIET_EXTRA_S = 3.0
# Celery's log messages counted by Stack.log_events as "celery: <message>".
CELERY_MESSAGES = ("Unrecoverable error", "Connection to broker lost")


@dataclass
class Stack:
    sandbox: Sandbox
    settings: Settings
    log_dir: Path
    services: Services = field(init=False)
    procs: list[ManagedProcess] = field(default_factory=list)
    hosts: dict[str, Host | None] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    # Per restart: the process, its exit code and the end of its log (why it died).
    deaths: list[str] = field(default_factory=list)
    publisher: threading.Thread | None = None
    published: int = 0

    def __post_init__(self) -> None:
        self.services = Services(self.settings)

    # -- processes ----------------------------------------------------------------------------
    def worker(self, name: str, *, host: Host | None = None, concurrency: int = 8) -> ManagedProcess:
        proc = worker(
            self.settings.to_env(), self.log_dir, name=name, pool="threads", concurrency=concurrency
        )
        if host is not None:
            proc.argv = host.wrap(proc.argv)
        self.hosts[name] = host
        self.procs.append(proc.start())
        proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
        return proc

    def listener(self, name: str = "listener", *, host: Host | None = None) -> ManagedProcess:
        port = free_port()
        env = self.settings.to_env()
        if host is not None:
            env["LISTENER_HEALTH_HOST"] = host.ip("api")
        proc = listener(env, self.log_dir, name=name, extra=["--health-port", str(port)])
        if host is not None:
            proc.argv = host.wrap(proc.argv)
        proc.health_url = f"http://{env.get('LISTENER_HEALTH_HOST', '127.0.0.1')}:{port}/healthz"  # type: ignore[attr-defined]
        self.hosts[name] = host
        self.procs.append(proc.start())
        self._wait(
            lambda: self.healthy(proc) or not proc.alive(), LISTENER_READY_TIMEOUT_S, "listener healthy"
        )
        assert proc.alive(), proc.log_text()[-3000:]
        return proc

    @staticmethod
    def healthy(proc: ManagedProcess) -> bool:
        try:
            return requests.get(proc.health_url, timeout=HEALTH_TIMEOUT_S).status_code == 200  # type: ignore[attr-defined]
        except requests.RequestException:
            return False

    def supervise(self) -> None:
        """Restart a process that died on its own, as a supervisor would (counted per name)."""
        for proc in self.procs:
            if not proc.alive():
                assert proc.proc is not None
                self.restarts[proc.name] += 1
                tail = "\n".join(proc.log_text().splitlines()[-25:])
                self.deaths.append(f"{proc.name} exited {proc.proc.returncode}:\n{tail}")
                proc.start()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.publisher is not None:
            self.publisher.join(timeout=30)
        self.services.redis.close()

    # -- Orders -------------------------------------------------------------------------------
    def seed(self, count: int, *, esim_share: float = 0.6, seed: int = 7) -> list[SeededOrder]:
        return seed_orders(
            self.sandbox, self.services.inventory, count=count, esim_share=esim_share, seed=seed
        )

    def publish_in_background(self, orders: list[SeededOrder], spread_s: float) -> None:
        """One event per Order, in batches every PUBLISH_EVERY_S over ``spread_s``."""
        payloads = [event_payload(o) for o in orders]
        batches = max(1, round(spread_s / PUBLISH_EVERY_S))
        size = -(-len(payloads) // batches)

        def run() -> None:
            for start in range(0, len(payloads), size):
                publish_events_admin(self.sandbox, payloads[start : start + size])
                self.published += len(payloads[start : start + size])
                time.sleep(PUBLISH_EVERY_S)

        self.publisher = threading.Thread(target=run, name="publisher", daemon=True)
        self.publisher.start()

    def statuses(self) -> Counter[str]:
        orders = self.sandbox.admin("salesforce").get("/__admin/orders")["orders"]
        return Counter(str(o.get("Activation_Status__c")) for o in orders)

    def activated(self) -> int:
        return self.statuses()["Activated"]

    def wait_activated(self, count: int, timeout_s: float) -> None:
        self._wait(lambda: self.activated() >= count, timeout_s, f"{count} Orders Activated")

    def settle(self, orders: list[SeededOrder], timeout_s: float) -> float:
        """Until every Order is Activated and no run is unfinished; then quiet past the visibility
        timeout. Returns the seconds it took to settle."""
        started = time.monotonic()
        ledger = self.services.ledger

        def settled() -> bool:
            if self.activated() < len(orders):
                return False
            return not ledger.registries.unfinished()

        self._wait(
            settled,
            timeout_s,
            "every Order Activated, no run unfinished",
            describe=lambda: self.stuck(orders),
        )
        took = time.monotonic() - started
        quiet = time.monotonic() + self.settings.celery_visibility_timeout_s + QUIET_EXTRA_S
        while time.monotonic() < quiet:
            self.supervise()
            time.sleep(POLL_S)
        return took

    def stuck(self, orders: list[SeededOrder]) -> str:
        statuses = self.statuses()
        unfinished = []
        for o in orders:
            run = self.services.ledger.runs.get(o.run_id)
            if run is None or run.state not in (RunState.DONE, RunState.FAILED):
                unfinished.append(f"{o.run_id}: {run.state.value if run else 'no run'}")
        return f"statuses {dict(statuses)}; {len(unfinished)} runs unfinished: {unfinished[:5]}"

    def problems(self, orders: list[SeededOrder]) -> dict[str, list[str]]:
        """Per Order, why it was not provisioned exactly once (only Orders with a problem)."""
        effects = effects_by_order(self.sandbox)
        found = {o.order_id: effects[o.order_id].problems() for o in orders}
        return {k: v for k, v in found.items() if v}

    def log_events(self, prefix: str = "") -> Counter[str]:
        """Log events of the processes whose name starts with ``prefix``, counted."""
        counts: Counter[str] = Counter()
        for path in sorted(self.log_dir.glob(f"{prefix}*.log")):
            for line in path.read_text(errors="replace").splitlines():
                # Celery's own messages, in a JSON line's event or a plain line alike.
                for message in CELERY_MESSAGES:
                    if message in line:
                        counts[f"celery: {message}"] += 1
                if line.startswith("{"):
                    try:
                        event = json.loads(line).get("event")
                    except json.JSONDecodeError:
                        continue
                    if isinstance(event, str) and " " not in event:
                        counts[event] += 1
        return counts

    def logs_of(self, name: str) -> list[dict[str, Any]]:
        records = []
        for line in (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def _wait(
        self,
        predicate: Callable[[], bool],
        timeout_s: float,
        what: str,
        describe: Callable[[], str] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                detail = f": {describe()}" if describe else ""
                raise TimeoutError(f"not within {timeout_s:.0f} s: {what}{detail}")
            self.supervise()
            time.sleep(POLL_S)


def stack_settings(sandbox: Sandbox, **values: Any) -> Settings:
    env = {k.lower(): v for k, v in sandbox.env().items()}
    return Settings(_env_file=None, **{**env, **FAST, **values})  # type: ignore[call-arg]
