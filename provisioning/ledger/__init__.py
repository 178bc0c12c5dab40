"""The Redis ledger: what makes every external effect happen once per Order.

A *run* is one attempt at one Order (one event, one reconciler pass, one operator
action). A *provisioning* is what the Order got (its payment check, eSIM, WHMCS
order and e-mail), recorded once per Order, so a second run of the Order reuses
it instead of making it again. At most one run of an Order acts at a time: the
lease is the Order's, and a run that finds another run of its Order in flight
joins it.

One face, :class:`Ledger`, split by what it keeps, each part with a few methods:

- ``runs``: a run from queued through its steps to its one ending (:mod:`.runs`);
- ``orders``: the Orders' provisionings and their markers (:mod:`.orders`);
- ``registries``: failed runs, write-backs, stale runs, undelivered e-mails, the
  quarantine, the list of recent runs (:mod:`.registries`);
- ``leases``: the Orders' leases (:mod:`.leases`);
- ``listener``: the listener's leader lock, checkpoints and leader (:mod:`.listener`);
- ``inventory``: the eSIM ICCID stock (:mod:`.inventory`);
- ``limits``: each external system's rate limit and circuit breaker, and the Salesforce API usage
  (:mod:`.limits`);
- ``esim_status``: the released profiles' states, from the SM-DP+'s notifications (:mod:`.esim_status`);
- ``metrics``: the run metrics, counted in the same round trips (:mod:`.metrics`).

The key names are private to this package, all in :mod:`.keys`; the scripts are
``lua/*.lua``, each with its KEYS and ARGV at its top. No module outside the
ledger names a Redis key.

The listener records a run as ``queued`` (and in the unfinished runs) before it
publishes its first task, so that a task lost on its way (on a Redis broker, a
worker killed between its BRPOP and its unacked record loses the message) is
republished by the reconciler like any other stale run.

Finished runs and provisionings expire after the retention period (default 30
days, far beyond the 72 h replay window of the event bus, so a replayed event
still finds its run); failed ones stay until requeued or superseded. Beyond the
retention the Order itself is the record: a run that reads ``WHMCS_Order_ID__c``
on an Order the ledger forgot adopts those effects instead of making new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from provisioning.core.run_id import RunId
from provisioning.ledger.esim_status import EsimStatuses
from provisioning.ledger.inventory import EsimInventory
from provisioning.ledger.keys import Keys
from provisioning.ledger.leases import Leases
from provisioning.ledger.limits import Limits
from provisioning.ledger.listener import ListenerStore
from provisioning.ledger.metrics import RunMetrics, Snapshot
from provisioning.ledger.orders import Orders
from provisioning.ledger.records import (
    BEGIN,
    Cancel,
    ClaimStatus,
    NotRequeueable,
    Origin,
    Provisioning,
    Recorded,
    RunRecord,
    RunState,
    StepClaim,
    StepRecord,
)
from provisioning.ledger.registries import Registries, Sizes
from provisioning.ledger.runs import Runs, Write
from provisioning.ledger.scripts import Scripts

if TYPE_CHECKING:
    from provisioning.core.replication import ReplicaWait

__all__ = [
    "BEGIN",
    "Cancel",
    "ClaimStatus",
    "Footprint",
    "Ledger",
    "NotRequeueable",
    "Origin",
    "Provisioning",
    "Recorded",
    "RunRecord",
    "RunState",
    "Scrape",
    "StepClaim",
    "StepRecord",
    "Write",
]


@dataclass(frozen=True)
class Footprint:
    """What one finished run leaves in Redis (the benchmarks measure memory per run with it)."""

    run_bytes: int
    order_bytes: int
    order_runs_bytes: int
    run_ttl_s: int
    snapshot_left: bool
    lease_left: bool


@dataclass(frozen=True)
class Scrape:
    """What the metrics' scrape reads of the ledger, in one round trip."""

    metrics: Snapshot
    sizes: Sizes
    leader: bool


class Ledger:
    """Run and provisioning records in Redis. Thread-safe: it holds only a redis-py client (a pool)."""

    def __init__(
        self,
        *,
        redis: redis.Redis,
        prefix: str,
        retention_s: int,
        lease_ttl_s: int,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys = Keys(prefix)
        scripts = Scripts(redis)
        self.retention_s = retention_s
        self.metrics = RunMetrics(keys, redis)
        self.leases = Leases(redis, keys, lease_ttl_s)
        self.orders = Orders(redis, keys, retention_s)
        self.runs = Runs(redis, keys, scripts, self.metrics, self.leases, self.orders, retention_s)
        self.registries = Registries(redis, keys, self.runs, self.metrics)
        self.listener = ListenerStore(redis, keys)
        self.inventory = EsimInventory(redis, keys, scripts, replicas)
        self.limits = Limits(redis, keys, scripts)
        self.esim_status = EsimStatuses(redis, keys, scripts)

    def footprint(self, run_id: RunId) -> Footprint:
        """The memory of a run's records and its Order's, and what should be gone once it is done."""
        keys, order_id = self._keys, run_id.order_id
        pipe = self._redis.pipeline(transaction=False)
        for key in (keys.run(run_id), keys.order(order_id), keys.order_runs(order_id)):
            pipe.memory_usage(key, samples=0)
        pipe.ttl(keys.run(run_id))
        pipe.exists(keys.snapshot(order_id))
        pipe.exists(keys.lease(order_id))
        run_b, order_b, runs_b, ttl, snapshot, lease = pipe.execute()
        return Footprint(
            int(run_b or 0), int(order_b or 0), int(runs_b or 0), int(ttl), bool(snapshot), bool(lease)
        )

    def scrape(self, channel: str) -> Scrape:
        """The run metrics, the registries' sizes and the listener lock (for ``provisioning metrics``)."""
        pipe = self._redis.pipeline(transaction=False)
        n = self.metrics.read_commands(pipe)
        m = self.registries.queue_sizes(pipe)
        self.listener.queue_leader_held(pipe, channel)
        answers = pipe.execute()
        return Scrape(
            metrics=self.metrics.parse(answers[:n]),
            sizes=self.registries.sizes(answers[n : n + m]),
            leader=bool(answers[n + m]),
        )
