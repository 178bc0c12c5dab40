"""What a step's action gets: its run, the Order's provisioning, the services and the Order's lease.

Celery-free: the domains' steps depend on this, never on the task plumbing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from redis.lock import Lock

from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import Provisioning, Write
from provisioning.step.order import Order
from provisioning.step.results import StepResult

if TYPE_CHECKING:
    # Only for the annotation: the domains that take a context must not depend on every client.
    from provisioning.runs.services import Services

R = TypeVar("R", bound=StepResult)
# A lease set less than this share of its TTL ago is not renewed before a call: renewing costs a round
# trip, and the three quarters left (45 s of the default RUN_LEASE_TTL_S=60) outlast the slowest call
# (a connect timeout plus a read timeout: 40 s).
LEASE_RENEW_AFTER_SHARE = 0.25


@dataclass
class StepContext:
    """Under the Order's lease, so the provisioning read with it stays true: markers are read from it
    (no round trip); a marker that guards an effect goes to Redis at once, one that records an effect
    made goes with the step's end."""

    services: Services
    run_id: RunId
    provisioning: Provisioning
    lease: Lock
    snapshot: dict[str, Any] | None = None
    # When the lease was last set to its full TTL (time.monotonic(), taken before the claim was sent).
    lease_set_at: float = field(default_factory=time.monotonic)
    # Markers of effects already made, written with the step's end (see record_marker).
    pending_markers: dict[str, str] = field(default_factory=dict)
    # Other records of effects made, written with the step's end (see write_with_end).
    pending_writes: list[Write] = field(default_factory=list)
    # The marker this step's claim set on the Order unless it had one: (name, the value it sent).
    stamp: tuple[str, str] | None = None
    # Step tables besides the runs' (services.chain) whose results ``result`` finds: the cancellation's.
    tables: tuple[Any, ...] = ()

    @property
    def order_id(self) -> str:
        return self.run_id.order_id

    @property
    def effect_key(self) -> str:
        """What the idempotency keys of this Order's effects derive from (see ``Provisioning``)."""
        return self.provisioning.effect_key

    @property
    def settings(self) -> Settings:
        return self.services.settings

    def order(self) -> Order:
        data = (
            self.snapshot
            if self.snapshot is not None
            else self.services.ledger.orders.snapshot(self.order_id)
        )
        return Order.model_validate(data)

    def result(self, kind: type[R]) -> R | None:
        """An earlier step's recorded result, typed (None when that step has none)."""
        for table in (self.services.chain, *self.tables):
            try:
                name = table.recording(kind).name
            except KeyError:
                continue
            raw = self.provisioning.step(name).result
            return kind.model_validate(raw) if raw is not None else None
        raise KeyError(f"no step records {kind.__name__}")

    def marker(self, name: str) -> str | None:
        return self.provisioning.markers.get(name)

    def set_marker(self, name: str, value: str) -> None:
        self.services.ledger.orders.set_marker(self.order_id, name, value)
        self.provisioning.markers[name] = value

    def stamped_by_this_try(self, name: str) -> bool:
        """This try's claim set marker ``name`` (the Order had none): no earlier try of the step set it."""
        return self.stamp is not None and self.stamp[0] == name and self.marker(name) == self.stamp[1]

    def confirm_stamp(self, name: str, make_value: Callable[[], str]) -> None:
        """With replicas, confirm the marker the claim stamped before the effect it guards (WAIT).

        Without replicas the claim's write is all there is to it: no round trip here. A context
        the lifecycle did not claim (no stamp) writes it now, with ``make_value()``.
        """
        value = self.marker(name)
        if value is None:
            self.guard_marker(name, make_value())
        elif self.services.replicas.replicas() > 0:
            self.guard_marker(name, value)

    def guard_marker(self, name: str, value: str) -> None:
        """``set_marker`` for a marker an external effect follows (an intent, the outbox's ``sending``):
        with replicas, confirmed by one before it returns; else ReplicaUnconfirmed (transient: retry)."""
        self.services.ledger.orders.guard_marker(self.order_id, name, value, self.services.replicas)
        self.provisioning.markers[name] = value

    def record_marker(self, name: str, value: str) -> None:
        """A marker of an effect that happened (an id, "accepted", "sent"), written with the step's end.

        In the same round trip as the step's result, or its error. Use it only where a retry
        finds the effect again should the marker be lost with its worker: the intent guarded
        before the effect, or a lookup, covers that instant (see each step).
        """
        self.pending_markers[name] = value
        self.provisioning.markers[name] = value

    def write_with_end(self, write: Write) -> None:
        """A Redis write recording an effect that happened, queued in the step's end (or its error).

        ``write`` gets the pipeline. The same rule as :meth:`record_marker`: only where losing it
        with a killed worker is covered by what a retry does.
        """
        self.pending_writes.append(write)

    def incr_marker(self, name: str) -> int:
        value = self.services.ledger.orders.incr_marker(self.order_id, name)
        self.provisioning.markers[name] = str(value)
        return value

    def renew(self) -> None:
        """Renew the lease before a call that may be slow (a lapsed lease lets the reconciler in).

        Only once a quarter of its TTL has gone by: until then it outlasts any call as it is.
        """
        now = time.monotonic()
        ttl_s = self.services.ledger.leases.ttl_s
        if now - self.lease_set_at < ttl_s * LEASE_RENEW_AFTER_SHARE:
            return
        self.lease.reacquire()
        self.lease_set_at = now
