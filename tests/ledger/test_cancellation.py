"""The Order's cancellation in the ledger: recorded once, and every forward claim after it ends its run."""

from __future__ import annotations

import pytest

from provisioning.core.run_id import RunId
from provisioning.ledger import ClaimStatus, Recorded, RunState
from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

ORDER = "801Dn0000HeJ6rrIQC"


@pytest.fixture
def services(settings):
    svc = Services(settings)
    yield svc
    svc.redis.close()


def test_a_cancellation_is_recorded_once_and_a_repeat_keeps_the_first_reason(services: Services) -> None:
    orders = services.ledger.orders
    new, first, gen = orders.request_cancel(ORDER, "customer changed their mind", "ops-ann")
    assert (new, first.reason, first.by, gen) == (True, "customer changed their mind", "ops-ann", 1)
    again, second, _ = orders.request_cancel(ORDER, "payment reversed", "salesforce")
    assert again is False
    assert second == first
    assert orders.provisioning(ORDER).cancel == first


def test_a_forward_claim_after_the_cancellation_ends_the_run_cancelled_before_the_lease(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.enqueue(run)
    ledger.runs.begin(run, {"id": ORDER})
    claim = ledger.runs.claim(run, "validate_payment", owned_by_order=True)
    assert claim.lease is not None
    ledger.runs.end_step(run, Recorded("validate_payment", True, {"ok": 1}), claim.lease, finish=False)

    ledger.orders.request_cancel(ORDER, "cancelled by sales", "ops-ann")
    stopped = ledger.runs.claim(run, "activate_esim", owned_by_order=True)
    assert (stopped.status, stopped.state) == (ClaimStatus.ENDED, RunState.CANCELLED)
    assert not ledger.leases.is_held(ORDER)
    recorded = ledger.runs.get(run)
    assert recorded is not None
    assert recorded.state is RunState.CANCELLED
    assert ledger.orders.in_flight(ORDER) == []
    # Even a step the Order has done does not answer done any more: nothing is sent after it.
    assert ledger.runs.claim(run, "validate_payment", owned_by_order=True).status is ClaimStatus.ENDED


def test_a_run_not_begun_and_a_failed_run_are_cancelled_too_and_a_done_run_stays_done(
    services: Services,
) -> None:
    ledger = services.ledger
    queued, failed, finished = RunId(ORDER, "q"), RunId(ORDER, "f"), RunId(ORDER, "d")
    ledger.runs.begin(finished, {"id": ORDER})
    ledger.runs.finish(finished)
    ledger.runs.begin(failed, {"id": ORDER})
    ledger.runs.fail(failed, "create_whmcs_order", "WHMCS refused")
    ledger.runs.enqueue(queued)
    ledger.orders.request_cancel(ORDER, "r", "ops")

    assert ledger.runs.claim(queued, "validate_payment", owned_by_order=True).state is RunState.CANCELLED
    assert [r.run_id for r in ledger.registries.failed()] == [failed]
    ledger.runs.cancel(failed)
    assert ledger.registries.failed() == []
    got = ledger.runs.get(failed)
    assert got is not None
    assert got.state is RunState.CANCELLED
    assert not ledger.registries.awaiting_writeback(failed)
    claim = ledger.runs.claim(finished, "send_email", owned_by_order=True)
    assert claim.status is not ClaimStatus.ENDED
    done = ledger.runs.get(finished)
    assert done is not None
    assert done.state is RunState.DONE


def test_a_step_of_the_cancellation_claims_the_lease_of_a_cancelled_order(services: Services) -> None:
    ledger = services.ledger
    ledger.orders.request_cancel(ORDER, "r", "ops")
    run = RunId(ORDER, "cancel:g1")
    ledger.runs.enqueue(run)
    claim = ledger.runs.claim(run, "cancel_esim", owned_by_order=True, cancellable=False)
    assert claim.status is ClaimStatus.GO
    assert ledger.leases.is_held(ORDER)
    started, attempts = ledger.runs.start(run, attempt="cancel_esim")
    assert (started.state, attempts) == (RunState.RUNNING, 1)
    assert claim.lease is not None
    ledger.runs.end_step(run, Recorded("cancel_esim", True, {"outcome": "nothing"}), claim.lease, finish=True)
    again = ledger.runs.claim(run, "cancel_esim", owned_by_order=True, cancellable=False)
    assert (again.status, again.result) == (ClaimStatus.DONE, {"outcome": "nothing"})


def test_an_iccid_returned_to_stock_is_free_again_once(services: Services) -> None:
    inventory = services.ledger.inventory
    inventory.load(["8988299000000000016", "8988299000000000024"])
    iccid = inventory.claim(ORDER)
    pipe = services.redis.pipeline()
    inventory.queue_mark_used(pipe, iccid)
    pipe.execute()
    assert inventory.stock().used == 1
    assert inventory.return_to_stock(ORDER) == iccid
    assert inventory.return_to_stock(ORDER) is None
    stock = inventory.stock()
    assert (stock.free, stock.claimed, stock.used) == (2, 0, 0)
