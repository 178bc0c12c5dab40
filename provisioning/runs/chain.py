"""The chain: every step, in its order, declared once (one :class:`StepSpec` row each).

Adding a step is: write its action in its domain (``<domain>/steps.py``), add
its row here, add its task line in ``tasks/steps.py``. The lifecycle, the
tasks and their routes, the metrics, the operators' views and the docs read
this table; the ledger stores what it is given under the names it is given.

Effects belong to the Order, not to the run: the steps that act on the world
record their results on the Order's provisioning (``Owner.ORDER``), so any later
run of the Order finds them done and reuses them. Writing the Order back is the
one step every run does itself (``Owner.RUN``): a run exists because the Order
says ``Activating``, and it ends by saying ``Activated`` again, with the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from provisioning.email import steps as email
from provisioning.esim import steps as esim
from provisioning.ledger import Provisioning, RunRecord, StepRecord
from provisioning.salesforce import steps as salesforce
from provisioning.step.results import (
    EsimActivated,
    OrderWrittenBack,
    PaymentChecked,
    StepResult,
    WelcomeEmail,
    WhmcsOrderCreated,
)
from provisioning.step.spec import Owner, Stamp, StepSpec, System
from provisioning.whmcs import steps as whmcs

# Where a run that has not begun begins (reading the Order, in its first step's task), and the
# failed step of a run that failed there: a requeue starts it from the beginning.
BEGIN = "provision_order"


class Chain:
    """The steps in their order, looked up by name; what a run's records say about them."""

    def __init__(self, specs: Iterable[StepSpec]) -> None:
        self.specs: tuple[StepSpec, ...] = tuple(specs)
        self._by_name = {spec.name: spec for spec in self.specs}
        self._by_result = {spec.result: spec for spec in self.specs}
        if len(self._by_name) != len(self.specs) or BEGIN in self._by_name:
            raise ValueError(f"step names must be unique and not {BEGIN!r}: {[s.name for s in self.specs]}")
        if len(self._by_result) != len(self.specs):
            raise ValueError("each step records a result type of its own")

    def __iter__(self) -> Iterator[StepSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> StepSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no step {name!r}; the steps are {', '.join(self.names)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @property
    def first(self) -> StepSpec:
        return self.specs[0]

    def after(self, name: str) -> StepSpec | None:
        """The step after step ``name`` (None after the last)."""
        index = self.names.index(self[name].name)
        return self.specs[index + 1] if index + 1 < len(self.specs) else None

    def recording(self, kind: type[StepResult]) -> StepSpec:
        """The step that records results of type ``kind``."""
        return self._by_result[kind]

    # -- what the records say ------------------------------------------------------------------
    def record(self, run: RunRecord, provisioning: Provisioning, spec: StepSpec) -> StepRecord:
        """The step as this run sees it: the result from whoever holds it, this run's attempts."""
        mine = run.own_steps.get(spec.name) or StepRecord()
        source = provisioning.step(spec.name) if spec.owned_by_order else mine
        return StepRecord(
            result=source.result, at=source.at, attempts=mine.attempts, last_error=mine.last_error
        )

    def first_unfinished(self, run: RunRecord, provisioning: Provisioning) -> StepSpec | None:
        return next((s for s in self.specs if not self.record(run, provisioning, s).done), None)

    def resume_point(self, run: RunRecord, provisioning: Provisioning) -> str:
        """Where a run goes on: BEGIN if it never began, else its first unfinished step (the last
        step when every one is done: its run only has to end)."""
        if run.never_began:
            return BEGIN
        step = self.first_unfinished(run, provisioning)
        return (step or self.specs[-1]).name

    def has_effects(self, provisioning: Provisioning) -> bool:
        """An effect the Order owns exists, or may exist (an intent was recorded before a call)."""
        return any(
            provisioning.step(spec.name).done
            or any(name in provisioning.markers for name in spec.effect_markers)
            for spec in self.specs
            if spec.effect
        )


# The table. ``effect_markers`` name what the step records before or right after its effect;
# ``stamp`` what its claim sets at its Order's first try.
CHAIN = Chain(
    [
        StepSpec(
            "validate_payment",
            whmcs.validate_payment,
            PaymentChecked,
            System.WHMCS,
            calls=2,  # GetClientsDetails, GetPayMethods
            adopt=whmcs.adopt_payment,
        ),
        StepSpec(
            "activate_esim",
            esim.activate_esim,
            EsimActivated,
            System.SMDP,
            calls=2,  # downloadOrder, confirmOrder
            effect=True,
            effect_markers=(esim.DOWNLOADED_MARKER,),
            nothing_to_do=esim.nothing_to_do,
            adopt=esim.adopt,
        ),
        StepSpec(
            "create_whmcs_order",
            whmcs.create_whmcs_order,
            WhmcsOrderCreated,
            System.WHMCS,
            calls=2,  # AddOrder, AcceptOrder
            effect=True,
            effect_markers=(whmcs.WHMCS_INTENT_MARKER,),
            stamp=Stamp(whmcs.WHMCS_INTENT_MARKER, whmcs.intent_stamp),
            adopt=whmcs.adopt_order,
        ),
        StepSpec(
            "update_salesforce",
            salesforce.update_salesforce,
            OrderWrittenBack,
            System.SALESFORCE,
            owner=Owner.RUN,
            stamp=Stamp(salesforce.ACTIVATED_AT_MARKER, salesforce.salesforce_now),
            adopt=salesforce.adopt,
            activates=True,
        ),
        StepSpec(
            "send_email",
            email.send_email,
            WelcomeEmail,
            System.SMTP,
            effect=True,
            effect_markers=(email.OUTBOX_MARKER,),
            adopt=email.adopt,
            notification=True,
        ),
    ]
)
