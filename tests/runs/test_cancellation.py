"""An Order's cancellation in-process (the fast tier): the runs stop, each compensation happens once.

Real Redis, the real simulators, the real steps and compensations, called in this process; the
worker-process tests (``tests/tasks/test_cancellation.py``) do the same through Celery and crashes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.ledger import Origin, RunState
from provisioning.ledger.esim_status import EsimState
from provisioning.runs.cancellation import CANCELLATION, plan, request_cancel, run_compensation
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import RunEnded, run_step
from provisioning.runs.publishing import make_publisher
from provisioning.runs.reconciler import resume_stale
from provisioning.runs.services import Services
from provisioning.sandbox.scenario import seed_orders

pytestmark = pytest.mark.fast


@pytest.fixture
def order(sandbox, services):
    (seeded,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=61)
    return seeded


@pytest.fixture
def app(stack_settings) -> Iterator[object]:
    publisher = make_publisher(stack_settings)
    yield publisher
    publisher.close()


def _steps(services: Services, run_id: RunId, *names: str) -> None:
    for name in names:
        run_step(services, run_id, CHAIN[name])


def _compensate(services: Services, run_id: RunId) -> dict[str, dict]:
    return {spec.name: run_compensation(services, run_id, spec).result for spec in CANCELLATION}


def _profile(sandbox, iccid: str) -> dict:
    return sandbox.admin("smdp").get(f"/__admin/profiles/{iccid}")


def _whmcs_orders(sandbox, client_id: int) -> list[dict]:
    return sandbox.admin("whmcs").get("/__admin/orders", userid=client_id)["orders"]


def _sf_order(sandbox, order_id: str) -> dict:
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def _calls(sandbox, name: str) -> dict[str, int]:
    return sandbox.admin(name).get("/__admin/calls")["calls"]


def test_a_run_cancelled_mid_run_stops_before_its_next_effect_and_each_effect_is_undone_once(
    sandbox, services, order, app
):
    run_id = RunId.parse(order.run_id)
    _steps(services, run_id, "validate_payment", "activate_esim")
    # The order is added, and AcceptOrder's connection reset: the step waits to try again, the order Pending.
    sandbox.admin("whmcs").post("/__admin/faults", {"force": {"AcceptOrder": ["reset"]}})
    with pytest.raises(Wait):
        _steps(services, run_id, "create_whmcs_order")
    [pending] = _whmcs_orders(sandbox, order.whmcs_client_id)
    assert pending["status"] == "Pending"
    whmcs_order_id = pending["id"]
    iccid = services.ledger.orders.provisioning(order.order_id).step("activate_esim").result["iccid"]
    assert _profile(sandbox, iccid)["state"] == "released"
    free_before = services.inventory.stock().free

    requested = request_cancel(services, app, order.order_id, "customer withdrew", by="ops-ann")
    assert (requested.new, requested.published) == (True, True)
    # The step's retry: its claim stops the run before AcceptOrder (the next effect).
    with pytest.raises(RunEnded) as ended:
        _steps(services, run_id, "create_whmcs_order")
    assert ended.value.result == {"ended": "cancelled"}
    assert services.ledger.runs.get(run_id).state is RunState.CANCELLED

    results = _compensate(services, requested.run_id)
    assert results["cancel_esim"] == {"outcome": "undone", "iccid": iccid, "returned_to_stock": True}
    assert results["cancel_whmcs_order"] == {
        "outcome": "undone",
        "whmcs_order_id": whmcs_order_id,
        "action": "cancelled",
    }
    assert results["write_cancelled"]["outcome"] == "undone"
    # The simulators' counts: the profile available again, the order cancelled, the ICCID free in our
    # stock, the Order Cancelled saying what was undone.
    assert _profile(sandbox, iccid)["state"] == "available"
    [whmcs_order] = _whmcs_orders(sandbox, order.whmcs_client_id)
    assert whmcs_order["status"] == "Cancelled"
    assert {s["status"] for s in whmcs_order["services"]} == {"Cancelled"}
    assert services.inventory.stock().free == free_before + 1
    assert services.inventory.claimed_by(order.order_id) is None
    sf = _sf_order(sandbox, order.order_id)
    assert sf["Activation_Status__c"] == "Cancelled"
    assert sf["ESIM_Status__c"] == "Cancelled"
    assert sf["Activation_Error__c"].startswith("Cancelled (customer withdrew): eSIM ")
    assert services.ledger.esim_status.get(iccid).state is EsimState.CANCELLED
    run = services.ledger.runs.get(requested.run_id)
    assert run.state is RunState.DONE
    assert run.origin is Origin.OPERATOR
    assert _calls(sandbox, "smdp").get("cancelOrder") == 1
    assert _calls(sandbox, "whmcs").get("CancelOrder") == 1
    assert _calls(sandbox, "whmcs").get("AcceptOrder") == 1  # the reset one: none after the cancellation


def test_a_cancel_repeated_and_raced_with_a_re_approval_makes_each_compensation_once(
    sandbox, services, order, app
):
    run_id = RunId.parse(order.run_id)
    _steps(services, run_id, *CHAIN.names)
    assert services.ledger.runs.get(run_id).state is RunState.DONE
    first = request_cancel(
        services, app, order.order_id, "payment reversed", by="salesforce", origin=Origin.EVENT
    )
    # A re-approval arrives meanwhile: its run is cancelled at its first claim, before reading the Order.
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{order.order_id}", {"activation_status": "Activating"}
    )
    again = RunId(order.order_id, "approval-2")
    services.ledger.runs.enqueue(again)
    with pytest.raises(RunEnded):
        _steps(services, again, "validate_payment")
    assert services.ledger.runs.get(again).state is RunState.CANCELLED
    _compensate(services, first.run_id)
    second = request_cancel(services, app, order.order_id, "asked twice", by="ops-bob")
    assert (second.new, second.run_id, second.published, second.cancel.reason) == (
        False,
        first.run_id,
        False,
        "payment reversed",
    )
    # The same compensations once more (a redelivered message): each finds its result, calls nothing.
    before = (_calls(sandbox, "smdp"), _calls(sandbox, "whmcs"))
    _compensate(services, first.run_id)
    assert (_calls(sandbox, "smdp"), _calls(sandbox, "whmcs")) == before
    # The order was accepted: its services were terminated (WHMCS_CANCEL_ACCEPTED=terminate), once each.
    [whmcs_order] = _whmcs_orders(sandbox, order.whmcs_client_id)
    assert {s["status"] for s in whmcs_order["services"]} == {"Terminated"}
    terminations = sandbox.admin("whmcs").get("/__admin/terminations")["service_ids"]
    assert sorted(terminations) == sorted(s["id"] for s in whmcs_order["services"])
    assert _calls(sandbox, "whmcs").get("CancelOrder") is None


def test_a_downloaded_profile_is_reported_for_a_person_and_its_iccid_stays_used(
    sandbox, services, order, app
):
    run_id = RunId.parse(order.run_id)
    _steps(services, run_id, *CHAIN.names)
    iccid = services.ledger.orders.provisioning(order.order_id).step("activate_esim").result["iccid"]
    sandbox.admin("smdp").post(f"/__admin/profiles/{iccid}", {"state": "downloaded"})
    used = services.inventory.stock().used
    requested = request_cancel(services, app, order.order_id, "fraud", by="ops-ann")
    results = _compensate(services, requested.run_id)
    assert results["cancel_esim"]["outcome"] == "manual"
    assert "was downloaded" in results["cancel_esim"]["reason"]
    assert _profile(sandbox, iccid)["state"] == "downloaded"
    assert services.inventory.stock().used == used
    sf = _sf_order(sandbox, order.order_id)
    assert sf["Activation_Status__c"] == "Cancelled"
    assert f"MANUAL: eSIM {iccid} was downloaded" in sf["Activation_Error__c"]
    assert sf["ESIM_Status__c"] == "Released"  # what the profile was, not Cancelled: it was not cancelled


def test_the_dry_run_plan_says_what_would_be_undone_and_changes_nothing(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _steps(services, run_id, "validate_payment", "activate_esim")
    seen = plan(services, order.order_id)
    assert seen.cancel is None
    assert seen.in_flight == [str(run_id)]
    assert seen.iccid is not None
    assert seen.esim_state == "released"
    lines = seen.lines()
    assert lines[0] == f"stop 1 run(s) in flight before their next effect: {run_id}"
    assert lines[-1] == "the welcome e-mail will not be sent"
    assert services.ledger.orders.provisioning(order.order_id).cancel is None


def test_the_reconciler_resumes_a_cancellation_nobody_works_on_from_its_first_unfinished_step(
    sandbox, services, order, app, stack_settings
):
    run_id = RunId.parse(order.run_id)
    _steps(services, run_id, "validate_payment", "activate_esim")
    requested = request_cancel(services, app, order.order_id, "r", by="ops")
    run_compensation(services, requested.run_id, CANCELLATION["cancel_esim"])
    # Its worker died here: the run is unfinished, nobody touches it.
    resumed = resume_stale(services, app, idle_s=0)
    # Both are sent on: the cancellation from cancel_whmcs_order, the forward run to its next claim
    # (which ends it as cancelled).
    assert set(resumed) == {requested.run_id, run_id}
    assert (
        run_compensation(services, requested.run_id, CANCELLATION["cancel_esim"]).next_step
        is (CANCELLATION["cancel_whmcs_order"])
    )
    with pytest.raises(RunEnded):
        _steps(services, run_id, "create_whmcs_order")
