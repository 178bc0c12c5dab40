"""What a step is, as one row of the step table: the declaration everything else reads.

A step is declared once, by a :class:`StepSpec` row in the step table
(:mod:`provisioning.runs.chain`): its name (and with it its Celery task's), its
action, what it records, what it stamps when it is claimed, when it has nothing
to do, what it adopts from an Order the ledger forgot, which external system it
calls and for how long it may run. The lifecycle, the ledger's callers, the
tasks, the metrics, the console and the docs test read the row; none of them
names a step.

This module holds models only (the seam between the runs and the domains): a
domain writes the action and its helpers, the table puts them in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import StepResult

# What a step does: act once per Order, idempotently, and say what it did (ids only).
Action = Callable[[StepContext], StepResult]

# The task names' namespace: Flower shows ``provisioning.<step>``.
TASK_PREFIX = "provisioning."
# How long one try of a step may run before Celery stops it (prefork pool; the threads pool has no
# time limits, and each call's own timeouts bound it there). A minute is 40 s of connect and read
# timeouts with room to spare.
DEFAULT_TIME_LIMIT_S = 120.0


class System(StrEnum):
    """The external systems the steps call: rate limits, circuit breakers and queues hang on these."""

    SALESFORCE = "salesforce"
    WHMCS = "whmcs"
    SMDP = "smdp"
    SMTP = "smtp"


class Owner(StrEnum):
    """Whose record holds a step's result."""

    # Recorded once per Order: every later run of the Order finds it done and reuses it.
    ORDER = "order"
    # Every run does it itself (writing the Order back: a run exists because the Order says Activating).
    RUN = "run"


@dataclass(frozen=True)
class Stamp:
    """A marker the step needs from its Order's first try, set by the step's claim unless the Order
    has it (no round trip of its own): an intent before an effect, a time every write must repeat."""

    marker: str
    make: Callable[[], str]


@dataclass(frozen=True)
class Adoption:
    """What a step records for an Order whose effects the ledger forgot (past its retention) but the
    Order itself shows: the result, and the markers that say the effect exists."""

    result: StepResult | None = None
    markers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSpec:
    """One step, declared once."""

    name: str
    action: Action
    result: type[StepResult]
    system: System
    # Calls to its system per try: each takes one of the system's rate limit (RATE_LIMIT_<SYSTEM>).
    calls: int = 1
    owner: Owner = Owner.ORDER
    # It makes an effect the Order owns, to happen once (an eSIM profile, a WHMCS order, an e-mail).
    effect: bool = False
    # Markers whose presence says the effect exists or may exist (an intent recorded before a call).
    effect_markers: tuple[str, ...] = ()
    stamp: Stamp | None = None
    # What the step records for an Order it has nothing to do for (None: it has something to do).
    nothing_to_do: Callable[[Order], StepResult | None] | None = None
    adopt: Callable[[Order], Adoption] | None = None
    # A notification: once the Order says Activated, its failure leaves the run done (the Order
    # is live) and is reported instead.
    notification: bool = False
    # It writes the Order Activated: the activation latency is measured at its end.
    activates: bool = False
    time_limit_s: float = DEFAULT_TIME_LIMIT_S

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + self.name

    @property
    def owned_by_order(self) -> bool:
        return self.owner is Owner.ORDER
