"""A failed run's write of Failed on the Order, on its short schedule, in-process (the fast tier).

Real Redis, the real Salesforce simulator (its forced faults refuse the PATCHes), the real lifecycle and
write-back functions; the task that carries the schedule between tries is ``tasks/writeback.py``'s (its
worker-process test: ``tests/tasks/test_writeback.py``). Here each try is called directly, with the try
number the task would pass.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from provisioning.core.retry import Cause, RetryPolicy, Wait
from provisioning.core.run_id import RunId
from provisioning.ledger.metrics import FAILURE_WRITEBACKS
from provisioning.ops.actions import requeue
from provisioning.runs import writeback
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import RunFailed, run_step
from provisioning.runs.publishing import make_publisher
from provisioning.runs.reconciler import repair_failure_writebacks
from provisioning.runs.services import Services
from provisioning.sandbox.scenario import seed_orders
from provisioning.step.context import StepContext
from provisioning.step.results import StepResult
from provisioning.whmcs.errors import WhmcsPermanentError

pytestmark = pytest.mark.fast

REASON = "no valid payment method: the card expired"


class Highest(random.Random):
    """Every draw at the top of its range: the longest waits the schedule can give."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _refusing(action_error: Exception):
    def action(ctx: StepContext) -> StepResult:
        raise action_error

    return action


@pytest.fixture
def order(sandbox, services):
    (seeded,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, seed=28)
    return seeded


def _refuse_patches(sandbox, n: int) -> None:
    """The next ``n`` PATCHes of an Order answer 503 SERVER_UNAVAILABLE (Salesforce down)."""
    sandbox.admin("salesforce").post("/__admin/faults", {"force": {"order_patch": ["error"] * n}})


def _sf_order(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def _api_patches(sandbox, order_id) -> list[dict]:
    return [p for p in _sf_order(sandbox, order_id)["patches"] if p["source"] == "api"]


def _counted(services: Services) -> dict[str, float]:
    found = services.ledger.scrape(services.settings.sf_provision_event_channel).metrics.counter(
        FAILURE_WRITEBACKS
    )
    return {dict(labels)["outcome"]: value for labels, value in found.items()}


def _fail(services: Services, run_id: RunId) -> RunFailed:
    """validate_payment fails the run at once (a permanent error); returns what the step raised."""
    spec = dataclasses.replace(CHAIN["validate_payment"], action=_refusing(WhmcsPermanentError(REASON)))
    with pytest.raises(RunFailed) as failed:
        run_step(services, run_id, spec)
    return failed.value


def test_the_schedule_is_jittered_doubles_from_its_base_and_its_longest_tries_end_within_a_minute(settings):
    tries = settings.failure_writeback_tries
    longest = RetryPolicy.from_settings(settings, rng=Highest())
    ceilings = [longest.wait_s(Cause.WRITEBACK_REFUSED, attempts=n) for n in range(1, tries)]
    assert ceilings == [2.0, 4.0, 8.0, 16.0, 16.0]
    # Five waits between six tries: at most 46 s from the first refusal to the last try.
    assert sum(ceilings) < 60
    policy = RetryPolicy.from_settings(settings, rng=random.Random(28))
    for _ in range(50):
        waits = [policy.wait_s(Cause.WRITEBACK_REFUSED, attempts=n) for n in range(1, tries)]
        assert all(0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len({policy.wait_s(Cause.WRITEBACK_REFUSED, attempts=3) for _ in range(20)}) > 1
    assert Cause.WRITEBACK_REFUSED.spends_budget


def test_the_cap_stays_below_half_the_visibility_timeout(settings):
    short = settings.model_copy(update={"celery_visibility_timeout_s": 10})
    policy = RetryPolicy.from_settings(short, rng=Highest())
    assert policy.wait_s(Cause.WRITEBACK_REFUSED, attempts=10) == 5.0


def test_a_failure_written_at_once_is_counted_and_leaves_nothing_to_retry(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    failed = _fail(services, run_id)
    assert failed.writeback_in_s is None
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Failed"
    assert services.ledger.registries.pending_writebacks(0) == []
    assert _counted(services) == {"written": 1}


def test_a_write_refused_three_times_is_tried_again_and_written_once_on_the_fourth_try(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    _refuse_patches(sandbox, 3)
    failed = _fail(services, run_id)
    # The first try (the failing step's) was refused: the step's task sends the next one this much later.
    assert failed.writeback_in_s is not None
    assert 0 <= failed.writeback_in_s <= services.settings.failure_writeback_backoff_s
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Activating"
    assert services.ledger.registries.pending_writebacks(0) == [run_id]

    countdowns = []
    for tries in (2, 3):
        with pytest.raises(Wait) as wait:
            writeback.retry(services, run_id, tries)
        assert wait.value.cause is Cause.WRITEBACK_REFUSED
        countdowns.append(wait.value.countdown_s)
    assert 0 <= countdowns[0] <= 4.0
    assert 0 <= countdowns[1] <= 8.0
    assert writeback.retry(services, run_id, 4) is writeback.Outcome.WRITTEN

    view = _sf_order(sandbox, order.order_id)
    assert view["Activation_Status__c"] == "Failed"
    assert view["Activation_Error__c"] == f"validate_payment: {REASON}"
    assert len(_api_patches(sandbox, order.order_id)) == 1
    assert services.ledger.registries.pending_writebacks(0) == []
    assert _counted(services) == {"retried": 3, "written": 1}
    # A repeat (a redelivered message) finds nothing to write; the reconciler neither.
    assert writeback.retry(services, run_id, 5) is writeback.Outcome.NOT_NEEDED
    assert repair_failure_writebacks(services, 0) == []
    assert len(_api_patches(sandbox, order.order_id)) == 1


def test_a_write_refused_at_every_try_is_given_up_and_left_to_the_reconciler(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    tries = services.settings.failure_writeback_tries
    _refuse_patches(sandbox, tries)
    assert _fail(services, run_id).writeback_in_s is not None
    for n in range(2, tries):
        with pytest.raises(Wait):
            writeback.retry(services, run_id, n)
    assert writeback.retry(services, run_id, tries) is writeback.Outcome.GIVEN_UP
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Activating"
    assert services.ledger.registries.pending_writebacks(0) == [run_id]
    assert _counted(services) == {"retried": tries - 1, "given_up": 1}

    assert repair_failure_writebacks(services, 0) == [run_id]
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Failed"
    assert len(_api_patches(sandbox, order.order_id)) == 1


def test_a_late_try_does_not_write_the_failure_of_a_run_an_operator_requeued(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _refuse_patches(sandbox, 1)
    assert _fail(services, run_id).writeback_in_s is not None
    app = make_publisher(services.settings)
    # The requeue's own write of Activating on the Order.
    requeue(services, app, [str(run_id)], dry_run=False, user="test")
    patches = len(_api_patches(sandbox, order.order_id))
    assert writeback.retry(services, run_id, 2) is writeback.Outcome.NOT_NEEDED
    assert len(_api_patches(sandbox, order.order_id)) == patches
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] != "Failed"


def test_a_try_while_another_worker_holds_the_orders_lease_waits_for_it(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _refuse_patches(sandbox, 1)
    assert _fail(services, run_id).writeback_in_s is not None
    lease = services.ledger.leases.lease(order.order_id)
    assert lease.acquire(blocking=False)
    try:
        with pytest.raises(Wait) as wait:
            writeback.retry(services, run_id, 2)
        assert wait.value.cause is Cause.LEASE_BUSY
    finally:
        lease.release()
    assert writeback.retry(services, run_id, 3) is writeback.Outcome.WRITTEN
    assert len(_api_patches(sandbox, order.order_id)) == 1
