"""The full stack for the pipeline benchmarks: the sandbox, settings with a unique namespace, workers, batches."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery

from bench.common import POLL_S, BenchRedis, Broker, Cleanup, CpuMeter, log, pythonpath_env, unique
from provisioning.core.settings import Settings
from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.runs.services import Services
from provisioning.sandbox.processes import WORKER_READY_TIMEOUT_S, ManagedProcess, worker
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import SeededOrder, seed_orders

# The simulators whose every API call gets the injected latency.
SIMULATORS = ("salesforce", "whmcs", "smdp", "smtp")
# External calls an order makes before its Order shows Activated (the PATCH is the last of them):
# SOQL query, GetClientsDetails, GetPayMethods, [downloadOrder, confirmOrder], AddOrder, AcceptOrder, PATCH.
CALLS_BEFORE_ACTIVATED = {True: 8, False: 6}
# ... and in the whole run (the SMTP DATA after it).
CALLS_PER_RUN = {True: 9, False: 7}
# A batch that makes no progress for this long is reported as stuck.
STALL_TIMEOUT_S = 120.0
ESIM_SHARE = 0.6
SF_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"
FINAL_STATES = (RunState.DONE.value, RunState.FAILED.value, RunState.SKIPPED.value)


class Stack:
    """One sandbox shared by several configurations; each configuration gets its own namespace."""

    def __init__(
        self,
        workdir: Path,
        redis_server: BenchRedis,
        cleanup: Cleanup,
        *,
        seed: int = 1234,
        broker: Broker | None = None,
    ) -> None:
        self.workdir = workdir
        self.redis_server = redis_server
        self.cleanup = cleanup
        self.broker = broker or Broker("redis", redis_server, cleanup)
        self.sandbox = Sandbox(workdir / "sandbox", seed=seed, long_poll_s=10.0).start()
        cleanup.add("sandbox", self.sandbox.stop)
        self._seed = seed

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings pointing at the sandbox and the Redis server, with a fresh ledger prefix and queue."""
        ns = unique(name)
        values: dict[str, Any] = {k.lower(): v for k, v in self.sandbox.env().items()}
        values.update(
            redis_url=self.redis_server.url(0),
            celery_broker_url=self.broker.url(),
            ledger_prefix=ns,
            celery_queue=f"q-{ns}",
            log_format="json",
            listener_health_port=0,
            # The sandbox's profile pool is seeded just above what a batch needs; with a real stock the
            # low-stock warning (and its extra stock count) does not fire on every claim, so neither here.
            esim_stock_warn_threshold=0,
        )
        values.update(overrides)
        settings = Settings(_env_file=None, **values)
        self.broker.own_queue(settings.celery_queue)
        if not self.redis_server.private:
            self.cleanup.add(f"keys of {ns}", lambda: self.redis_server.forget(f"*{ns}*"))
        return settings

    def services(self, settings: Settings) -> Services:
        services = Services(settings)
        self.cleanup.add("services", services.redis.close)
        return services

    def seed(self, services: Services, count: int, esim_share: float = ESIM_SHARE) -> list[SeededOrder]:
        self._seed += 1
        return seed_orders(
            self.sandbox, services.inventory, count=count, esim_share=esim_share, seed=self._seed
        )

    def start_workers(
        self,
        settings: Settings,
        *,
        count: int = 1,
        pool: str = "threads",
        concurrency: int = 8,
        name: str = "w",
    ) -> list[ManagedProcess]:
        """Real ``celery -A tasks worker`` processes, started together, returned once all are ready."""
        env = {**settings.to_env(), **pythonpath_env()}
        procs = []
        for i in range(count):
            proc = worker(
                env,
                self.workdir / "logs",
                name=f"{name}{i + 1}-{settings.ledger_prefix}",
                pool=pool,
                concurrency=concurrency,
            )
            procs.append(self.cleanup.process(proc.start()))
        for proc in procs:
            proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
        return procs

    def set_latency(self, latency_ms: float) -> None:
        for name in SIMULATORS:
            self.sandbox.admin(name).post("/__admin/faults", {"latency_ms": latency_ms})

    def reset_calls(self) -> None:
        for name in SIMULATORS:
            self.sandbox.admin(name).post("/__admin/calls/reset")

    def calls(self) -> dict[str, dict[str, int]]:
        return {name: dict(self.sandbox.admin(name).get("/__admin/calls")["calls"]) for name in SIMULATORS}

    def activated_at(self, order_ids: set[str]) -> dict[str, float]:
        """When each Order was patched to Activated, from the Salesforce simulator's record of writes."""
        found: dict[str, float] = {}
        for order in self.sandbox.admin("salesforce").get("/__admin/orders")["orders"]:
            if order["Id"] not in order_ids:
                continue
            for patch in order["patches"]:
                if patch["fields"].get("Activation_Status__c") == "Activated":
                    found[order["Id"]] = datetime.strptime(patch["at"], SF_TIME_FORMAT).timestamp()
                    break
        return found


@dataclass
class BatchResult:
    orders: int
    elapsed_s: float
    cpu_s: dict[str, float]
    states: dict[str, int]
    latencies_s: list[float] = field(default_factory=list)
    latencies_by_kind_s: dict[str, list[float]] = field(default_factory=dict)
    latency_ratios: list[float] = field(default_factory=list)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.elapsed_s

    def cpu_per_order_ms(self, who: str) -> float:
        return self.cpu_s.get(who, float("nan")) * 1000 / self.orders

    def external_calls(self) -> int:
        return sum(n for sim in self.calls.values() for op, n in sim.items() if op != "token")


class Batch:
    """Publish runs of seeded Orders and wait until the ledger says each finished."""

    def __init__(self, stack: Stack, settings: Settings, services: Services) -> None:
        self.stack = stack
        self.settings = settings
        self.services = services
        self.publisher: Celery = make_publisher(settings)

    def wait(self, run_ids: list[str], *, what: str) -> dict[str, tuple[str, float | None]]:
        """Block until every run is done, failed or skipped: each one's final state and finished_at."""
        ledger = self.services.ledger
        pending = list(run_ids)
        final: dict[str, tuple[str, float | None]] = {}
        last_progress = time.monotonic()
        while pending:
            runs = {str(r.run_id): r for r in ledger.runs.get_many(pending)}
            still = []
            for run_id in pending:
                run = runs.get(run_id)
                if run is not None and run.state.value in FINAL_STATES:
                    final[run_id] = (run.state.value, run.finished_at)
                else:
                    still.append(run_id)
            if len(still) < len(pending):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"{what}: {len(still)} of {len(run_ids)} runs made no progress in {STALL_TIMEOUT_S:.0f}s"
                )
            pending = still
            if pending:
                time.sleep(POLL_S)
        return final

    def warm_up(self, orders: list[SeededOrder]) -> None:
        """A few runs first: tokens, TLS connections and imports are paid before the clock starts."""
        for order in orders:
            publish_run(self.publisher, order.run_id)
        self.wait([o.run_id for o in orders], what="warm-up")

    def run(
        self,
        orders: list[SeededOrder],
        *,
        meter: CpuMeter,
        rate_per_s: float | None = None,
        latency: bool = False,
        injected_latency_ms: float = 0.0,
    ) -> BatchResult:
        """Publish every run (all at once, or at ``rate_per_s``), wait for all, measure."""
        self.stack.reset_calls()
        published: dict[str, float] = {}
        meter.start()
        start = time.time()
        for i, order in enumerate(orders):
            if rate_per_s is not None:
                delay = start + i / rate_per_s - time.time()
                if delay > 0:
                    time.sleep(delay)
            published[order.order_id] = time.time()
            publish_run(self.publisher, order.run_id)
        log(f"published {len(orders)} runs in {time.time() - start:.2f}s")
        final = self.wait([o.run_id for o in orders], what="batch")
        cpu = meter.stop()
        # The clock stops at the last run's finish (the ledger's finished_at), not at our next poll.
        finished = [at for _, at in final.values() if at is not None]
        elapsed = (max(finished) if len(finished) == len(final) else time.time()) - start
        result = BatchResult(
            orders=len(orders),
            elapsed_s=elapsed,
            cpu_s=cpu,
            states=dict(Counter(state for state, _ in final.values())),
            calls=self.stack.calls(),
        )
        if latency:
            activated = self.stack.activated_at(set(published))
            for order in orders:
                at = activated.get(order.order_id)
                if at is None:
                    continue
                took = at - published[order.order_id]
                result.latencies_s.append(took)
                kind = "esim" if order.esim else "physical"
                result.latencies_by_kind_s.setdefault(kind, []).append(took)
                if injected_latency_ms > 0:
                    injected_s = CALLS_BEFORE_ACTIVATED[order.esim] * injected_latency_ms / 1000
                    result.latency_ratios.append(took / injected_s)
        return result
