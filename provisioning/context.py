"""What a step's action gets: its run, the Order's provisioning, the services and the Order's lease.

Celery-free: the domains' steps depend on this, never on the task plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from redis.lock import Lock

from provisioning.ledger import Provisioning
from provisioning.order import Order
from provisioning.results import RESULT_TYPES, StepResult
from provisioning.run_id import RunId
from provisioning.settings import Settings

if TYPE_CHECKING:
    # Only for the annotation: the domains that take a context must not depend on every client.
    from provisioning.services import Services

R = TypeVar("R", bound=StepResult)
_STEP_OF = {kind: step for step, kind in RESULT_TYPES.items()}


@dataclass
class StepContext:
    """Under the Order's lease, so the provisioning read with it stays true: markers are read from it
    (no round trip) and every marker written goes to Redis at once (it guards an effect)."""

    services: Services
    run_id: RunId
    provisioning: Provisioning
    lease: Lock
    snapshot: dict[str, Any] | None = None

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
        data = self.snapshot if self.snapshot is not None else self.services.ledger.load_order(self.order_id)
        return Order.model_validate(data)

    def result(self, kind: type[R]) -> R | None:
        """An earlier step's recorded result, typed (None when that step has none)."""
        raw = self.provisioning.step(_STEP_OF[kind]).result
        return kind.model_validate(raw) if raw is not None else None

    def marker(self, name: str) -> str | None:
        return self.provisioning.markers.get(name)

    def set_marker(self, name: str, value: str) -> None:
        self.services.ledger.set_marker(self.order_id, name, value)
        self.provisioning.markers[name] = value

    def guard_marker(self, name: str, value: str) -> None:
        """``set_marker`` for a marker an external effect follows (an intent, the outbox's ``sending``):
        with replicas, confirmed by one before it returns; else ReplicaUnconfirmed (transient: retry)."""
        self.services.ledger.guard_marker(self.order_id, name, value, self.services.replicas)
        self.provisioning.markers[name] = value

    def incr_marker(self, name: str) -> int:
        value = self.services.ledger.incr_marker(self.order_id, name)
        self.provisioning.markers[name] = str(value)
        return value

    def renew(self) -> None:
        """Renew the lease before a call that may be slow (a lapsed lease lets the reconciler in)."""
        self.lease.reacquire()
