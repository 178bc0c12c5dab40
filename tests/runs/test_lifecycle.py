"""The run lifecycle in-process (the fast tier): begin, step, fail, join, skip, requeue, resume.

Real Redis, the real simulators in this process, the real lifecycle functions; no
worker process, so each test takes well under a second once the sandbox is up.
Delivery and crashes are the worker-process tests' business (``tests/tasks``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from provisioning.core.errors import TransientError
from provisioning.core.retry import (
    LEASE_BUSY_BASE_S,
    LEASE_BUSY_CAP_S,
    LEDGER_DOWN_BASE_S,
    LEDGER_DOWN_CAP_S,
    Cause,
    Wait,
)
from provisioning.core.run_id import RunId
from provisioning.email.errors import EmailPermanentError
from provisioning.esim.steps import activate_esim
from provisioning.ledger import Origin, RunState
from provisioning.ops.actions import requeue
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import RunEnded, RunFailed, run_step
from provisioning.runs.publishing import make_publisher
from provisioning.runs.reconciler import resume_stale
from provisioning.runs.services import Services
from provisioning.salesforce.steps import update_salesforce
from provisioning.sandbox.processes import free_port
from provisioning.sandbox.scenario import seed_orders
from provisioning.step.context import StepContext
from provisioning.step.results import (
    EsimActivated,
    OrderWrittenBack,
    PaymentChecked,
    StepResult,
    WelcomeEmail,
    WhmcsOrderCreated,
)
from provisioning.step.spec import StepSpec
from provisioning.whmcs.steps import create_whmcs_order, order_note

pytestmark = pytest.mark.fast


class Flaky(TransientError):
    """What a test action raises to look like a transient failure of an API."""


def at(name: str, action: Any) -> StepSpec:
    """The step table's row ``name``, acting with ``action``."""
    return dataclasses.replace(CHAIN[name], action=action)


def _ok(result: StepResult) -> Any:
    def action(ctx: StepContext) -> StepResult:
        return result

    return action


def _raise(exc: Exception) -> Any:
    def action(ctx: StepContext) -> StepResult:
        raise exc

    return action


@pytest.fixture
def order(sandbox, services):
    (seeded,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=61)
    return seeded


@pytest.fixture
def broker(stack_settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack_settings.celery_broker_url)
    yield client
    client.close()


def _queued_tasks(broker: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in broker.lrange(queue, 0, -1)]


def _api_calls(sandbox) -> dict[str, int]:
    """Salesforce API calls by operation, logins (token) aside."""
    calls = sandbox.admin("salesforce").get("/__admin/calls")["calls"]
    return {k: v for k, v in calls.items() if k != "token"}


def _sf_order(sandbox, order_id):
    return sandbox.admin("salesforce").get(f"/__admin/orders/{order_id}")


def _run_chain(services: Services, run_id: RunId, actions: dict[str, Any] | None = None) -> None:
    """Every step once, in order, with the given (or trivial) actions."""
    results: dict[str, StepResult] = {
        "validate_payment": PaymentChecked(whmcs_client_id=1, pay_methods=1),
        "activate_esim": EsimActivated(iccid="8988211000000000001"),
        "create_whmcs_order": WhmcsOrderCreated(whmcs_order_id=7),
        "update_salesforce": OrderWrittenBack(activated_at="2026-12-02T06:00:00.000Z"),
        "send_email": WelcomeEmail(message_id="<x@y>"),
    }
    for name in CHAIN.names:
        action = (actions or {}).get(name) or _ok(results[name])
        run_step(services, run_id, at(name, action))


def _fail(services: Services, run_id: RunId, step: str, exc: Exception) -> None:
    """Run ``step`` with an action that always raises ``exc`` until the run fails (retries spent)."""
    for _ in range(services.settings.task_max_retries + 1):
        try:
            run_step(services, run_id, at(step, _raise(exc)))
        except Wait:
            continue
        except RunFailed:
            return
    raise AssertionError("the run did not fail")


def _begin(services: Services, run_id: RunId) -> dict[str, Any]:
    """The run's first step, which begins it."""
    return run_step(services, run_id, at("validate_payment", _ok(PaymentChecked(whmcs_client_id=1)))).result


def test_a_runs_first_step_begins_it_reading_the_order_once_and_holding_it_as_the_active_run(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    sandbox.admin("salesforce").post("/__admin/calls/reset")
    assert _begin(services, run_id) == {"whmcs_client_id": 1}
    assert _api_calls(sandbox) == {"query": 1}
    run = services.ledger.runs.get(run_id)
    assert run.state is RunState.RUNNING
    assert services.ledger.orders.provisioning(order.order_id).active == str(run_id)
    assert services.ledger.orders.snapshot(order.order_id)["id"] == order.order_id
    assert services.ledger.leases.is_held(order.order_id) == 0  # given back
    # The same step again (a redelivery, a duplicate event's chain) returns the recorded result.
    assert _begin(services, run_id) == {"whmcs_client_id": 1}
    assert _api_calls(sandbox) == {"query": 1}


def test_a_second_run_of_an_order_in_flight_joins_it_without_a_query(sandbox, services, order):
    first = RunId.parse(order.run_id)
    second = RunId(order.order_id, "approval-2")
    _begin(services, first)
    sandbox.admin("salesforce").post("/__admin/calls/reset")
    with pytest.raises(RunEnded) as ended:
        _begin(services, second)
    assert ended.value.result == {"joined": str(first)}
    assert _api_calls(sandbox) == {}
    joined = services.ledger.runs.get(second)
    assert joined.state is RunState.JOINED
    assert joined.joined == str(first)
    with pytest.raises(RunEnded) as again:
        run_step(services, second, at("activate_esim", _ok(EsimActivated(iccid="1"))))
    assert again.value.result == {"ended": "joined"}


def test_a_run_whose_order_is_not_activating_is_skipped_with_the_reason(sandbox, services, order):
    sandbox.admin("salesforce").patch(f"/__admin/orders/{order.order_id}", {"activation_status": "Activated"})
    run_id = RunId.parse(order.run_id)
    with pytest.raises(RunEnded) as ended:
        _begin(services, run_id)
    assert "skipped" in ended.value.result
    run = services.ledger.runs.get(run_id)
    assert run.state is RunState.SKIPPED
    assert run.note == "skipped: the Order is 'Activated', not 'Activating': nothing to do"
    assert services.ledger.orders.in_flight(order.order_id) == []


def test_a_re_approval_reuses_the_orders_effects_and_only_writes_it_back(sandbox, services, order):
    first = RunId.parse(order.run_id)
    _run_chain(services, first)
    assert services.ledger.runs.get(first).state is RunState.DONE
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{order.order_id}", {"activation_status": "Activating"}
    )

    second = RunId(order.order_id, "approval-2")
    called = []

    def must_not_run(ctx: StepContext) -> StepResult:
        called.append(ctx.run_id)
        return PaymentChecked()

    provisioning = services.ledger.orders.provisioning(order.order_id)
    for step in ("validate_payment", "activate_esim", "create_whmcs_order"):
        assert run_step(services, second, at(step, must_not_run)).result == provisioning.step(step).result
    assert called == []
    run = services.ledger.runs.get(second)
    assert run.state is RunState.RUNNING
    assert run.note == f"continues the provisioning of run {first}: no effect is made twice"
    first_unfinished = CHAIN.first_unfinished(run, services.ledger.orders.provisioning(order.order_id))
    assert first_unfinished is CHAIN["update_salesforce"]


def test_a_transient_error_is_retried_with_a_bounded_backoff_then_fails_the_run_and_the_order(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    settings = services.settings
    flaky = _raise(Flaky("WHMCS answered 503"))
    countdowns = []
    for attempt in range(1, settings.task_max_retries + 1):
        with pytest.raises(Wait) as caught:
            run_step(services, run_id, at("validate_payment", flaky))
        countdowns.append(caught.value.countdown_s)
        run = services.ledger.runs.get(run_id)
        assert (
            CHAIN.record(
                run, services.ledger.orders.provisioning(order.order_id), CHAIN["validate_payment"]
            ).attempts
            == attempt
        )
    # Full jitter under a ceiling that doubles from TASK_RETRY_BACKOFF_S, capped.
    ceilings = [
        min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2**n) for n in range(8)
    ]
    assert all(0 <= c <= top for c, top in zip(countdowns, ceilings, strict=True))

    attempts = settings.task_max_retries + 1
    with pytest.raises(
        RunFailed, match=f"validate_payment: gave up after {attempts} attempts: WHMCS answered 503"
    ):
        run_step(services, run_id, at("validate_payment", flaky))
    run = services.ledger.runs.get(run_id)
    assert run.state is RunState.FAILED
    assert run.failed_step == "validate_payment"
    assert [str(r.run_id) for r in services.ledger.registries.failed()] == [order.run_id]
    view = _sf_order(sandbox, order.order_id)
    assert view["Activation_Status__c"] == "Failed"
    assert (
        view["Activation_Error__c"]
        == f"validate_payment: gave up after {attempts} attempts: WHMCS answered 503"
    )
    # The failure reached the Order: nothing left for the reconciler's write-back sweep.
    assert services.ledger.registries.pending_writebacks(0) == []
    assert services.ledger.leases.is_held(order.order_id) == 0
    with pytest.raises(RunEnded) as ended:
        run_step(services, run_id, at("activate_esim", _ok(EsimActivated(iccid="1"))))
    assert ended.value.result == {"ended": "failed"}


def test_another_worker_holding_the_orders_lease_means_retry_shortly(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    other = services.ledger.leases.lease(order.order_id)
    assert other.acquire(blocking=False)
    try:
        with pytest.raises(Wait) as caught:
            run_step(services, run_id, at("activate_esim", _ok(EsimActivated(iccid="1"))))
        assert caught.value.cause is Cause.LEASE_BUSY
        assert LEASE_BUSY_BASE_S <= caught.value.countdown_s <= LEASE_BUSY_CAP_S
        with pytest.raises(Wait):
            _begin(services, RunId(order.order_id, "approval-2"))
    finally:
        other.release()


def test_a_step_that_cannot_reach_the_ledger_is_retried_shortly_without_spending_its_budget(
    sandbox, services, stack_settings, order
):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    # The same worker a moment later, its ledger gone (a failover under way): nothing listens there.
    cut_off = Services(stack_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    called: list[str] = []

    def action(ctx: StepContext) -> StepResult:
        called.append("activate_esim")
        return EsimActivated(iccid="8988211000000000001")

    try:
        with pytest.raises(Wait) as caught:
            run_step(cut_off, run_id, at("activate_esim", action))
    finally:
        cut_off.redis.close()
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert caught.value.cause is Cause.LEDGER_DOWN
    assert LEDGER_DOWN_BASE_S <= caught.value.countdown_s <= LEDGER_DOWN_CAP_S
    assert called == []
    # Back on the ledger, the step runs once and counts one attempt: the outage cost none.
    run_step(services, run_id, at("activate_esim", action))
    assert called == ["activate_esim"]
    run = services.ledger.runs.get(run_id)
    assert (
        CHAIN.record(
            run, services.ledger.orders.provisioning(order.order_id), CHAIN["activate_esim"]
        ).attempts
        == 1
    )


def test_a_refused_email_ends_the_run_done_and_leaves_the_order_activated(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    refused = EmailPermanentError("RCPT TO refused: 550 5.1.1", code=550)
    _run_chain(services, run_id, {"send_email": _raise(refused)})
    run = services.ledger.runs.get(run_id)
    assert run.state is RunState.DONE
    assert "welcome e-mail was not delivered" in run.note
    assert services.ledger.registries.failed() == []
    assert [oid for oid, _ in services.ledger.registries.undelivered()] == [order.order_id]
    provisioning = services.ledger.orders.provisioning(order.order_id)
    assert provisioning.markers["outbox"] == "refused"
    assert provisioning.email_error == "RCPT TO refused: 550 5.1.1"
    view = _sf_order(sandbox, order.order_id)
    assert view["Activation_Error__c"] == (
        "Activated; the welcome e-mail was not delivered: RCPT TO refused: 550 5.1.1"
    )


def test_requeue_shows_a_dry_run_first_then_resumes_the_failed_run_at_its_step(
    sandbox, stack_settings, services, order, broker
):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    _fail(services, run_id, "activate_esim", Flaky("SM-DP+ down"))
    app = make_publisher(stack_settings)

    (dry,) = requeue(services, app, [order.run_id], dry_run=True, user="ops")
    assert (dry.action, dry.step) == ("would requeue", "activate_esim")
    assert services.ledger.runs.get(run_id).state is RunState.FAILED
    assert _queued_tasks(broker, stack_settings.celery_queue) == []

    (done,) = requeue(services, app, [order.run_id], dry_run=False, user="ops")
    assert (done.action, done.step) == ("requeued", "activate_esim")
    assert services.ledger.runs.get(run_id).state is RunState.RUNNING
    assert services.ledger.registries.failed() == []
    assert _sf_order(sandbox, order.order_id)["Activation_Status__c"] == "Activating"
    assert _queued_tasks(broker, stack_settings.celery_queue) == ["provisioning.activate_esim"]

    (again,) = requeue(services, app, [order.run_id], dry_run=False, user="ops")
    assert again.action == "skipped"
    assert "running, not failed" in again.detail
    (bad,) = requeue(services, app, ["not-a-run"], dry_run=False, user="ops")
    assert bad.action == "skipped"
    assert "not a run id" in bad.detail


def test_the_reconciler_resumes_an_idle_run_nobody_holds_where_it_stopped(
    sandbox, stack_settings, services, order, broker
):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    app = make_publisher(stack_settings)
    assert resume_stale(services, app, idle_s=3600) == []
    assert resume_stale(services, app, idle_s=0) == [run_id]
    assert _queued_tasks(broker, stack_settings.celery_queue) == ["provisioning.activate_esim"]
    # A run queued whose chain was lost is sent again from the start.
    lost = RunId(order.order_id, "approval-9")
    services.ledger.runs.enqueue(lost, Origin.EVENT)
    broker.delete(stack_settings.celery_queue)
    assert lost in resume_stale(services, app, idle_s=0)
    assert "provisioning.validate_payment" in _queued_tasks(broker, stack_settings.celery_queue)


def test_the_runs_beginning_and_its_first_step_each_have_their_own_retry_budget(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    # Reading the Order fails twice: the beginning retries, its first step has spent nothing.
    sandbox.admin("salesforce").post("/__admin/faults", {"force": {"query": ["error", "error"]}})
    for _ in range(2):
        with pytest.raises(Wait):
            _begin(services, run_id)
    assert _begin(services, run_id) == {"whmcs_client_id": 1}
    run = services.ledger.runs.get(run_id)
    assert run.own_steps["provision_order"].attempts == 2
    assert (
        CHAIN.record(
            run, services.ledger.orders.provisioning(order.order_id), CHAIN["validate_payment"]
        ).attempts
        == 1
    )


def test_markers_of_effects_made_are_written_with_the_steps_end_or_its_error(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)

    def accepted_then_flaky(ctx: StepContext) -> StepResult:
        ctx.record_marker("whmcs_order_id", "42")
        # Not in Redis yet: it goes with the step's end (or error), in that same round trip.
        assert services.ledger.orders.marker(order.order_id, "whmcs_order_id") is None
        raise Flaky("AcceptOrder: HTTP 503")

    with pytest.raises(Wait):
        run_step(services, run_id, at("create_whmcs_order", accepted_then_flaky))
    # The retry finds the order it made, instead of looking for it or making another.
    assert services.ledger.orders.marker(order.order_id, "whmcs_order_id") == "42"

    def accepted(ctx: StepContext) -> StepResult:
        assert ctx.marker("whmcs_order_id") == "42"
        ctx.record_marker("whmcs_accepted", "1")
        return WhmcsOrderCreated(whmcs_order_id=42)

    run_step(services, run_id, at("create_whmcs_order", accepted))
    provisioning = services.ledger.orders.provisioning(order.order_id)
    assert provisioning.markers["whmcs_accepted"] == "1"
    assert provisioning.step("create_whmcs_order").result == {"whmcs_order_id": 42}


def test_a_lease_is_renewed_before_a_call_only_once_a_quarter_of_its_ttl_has_gone_by(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    ttl_ms = services.ledger.leases.ttl_s * 1000
    seen: dict[str, int] = {}

    def action(ctx: StepContext) -> StepResult:
        lease_key = ctx.lease.name  # the lease knows its own key
        services.redis.pexpire(lease_key, 1_000)
        ctx.renew()  # just claimed: not renewed, no round trip
        seen["fresh"] = services.redis.pttl(lease_key)
        ctx.lease_set_at -= ctx.services.ledger.leases.ttl_s * 0.3
        ctx.renew()
        seen["later"] = services.redis.pttl(lease_key)
        return EsimActivated(iccid="8988211000000000001")

    run_step(services, run_id, at("activate_esim", action))
    assert 0 < seen["fresh"] <= 1_000
    assert seen["later"] > ttl_ms - 1_000


def test_a_physical_sim_orders_esim_step_is_recorded_by_the_step_before_and_not_sent(sandbox, services):
    (physical,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, seed=62)
    run_id = RunId.parse(physical.run_id)
    done = run_step(services, run_id, at("validate_payment", _ok(PaymentChecked(whmcs_client_id=1))))
    assert done.next_step.name == "create_whmcs_order"
    provisioning = services.ledger.orders.provisioning(physical.order_id)
    assert provisioning.step("activate_esim").result == {"sim": "physical"}
    # Run anyway (an operator's resume at that step), its task finds it done and sends the next.
    resumed = run_step(services, run_id, at("activate_esim", activate_esim))
    assert resumed.result == {"sim": "physical"}
    assert resumed.next_step.name == "create_whmcs_order"


def test_an_esim_orders_step_claims_downloads_and_marks_its_iccid_used_with_the_steps_end(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    assert _begin_done(services, run_id).next_step.name == "activate_esim"
    before = services.inventory.stock()
    done = run_step(services, run_id, at("activate_esim", activate_esim))
    assert done.next_step.name == "create_whmcs_order"
    iccid = done.result["iccid"]
    provisioning = services.ledger.orders.provisioning(order.order_id)
    assert provisioning.markers["esim_downloaded"] == iccid
    assert "activation_code" in provisioning.markers
    after = services.inventory.stock()
    assert (after.used, after.free) == (before.used + 1, before.free - 1)
    assert services.inventory.claimed_by(order.order_id) == iccid
    calls = sandbox.admin("smdp").get("/__admin/calls")["calls"]
    assert (calls.get("downloadOrder"), calls.get("confirmOrder")) == (1, 1)


def test_the_activation_time_is_fixed_by_the_first_claim_and_sent_unchanged_by_a_repeat(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    _run_chain(services, run_id, {"update_salesforce": update_salesforce})
    first = services.ledger.orders.marker(order.order_id, "activated_at")
    assert first is not None
    # Salesforce (and its simulator) answer a DateTime as +0000 where we send Z.
    sent = first.removesuffix("Z")
    patches = _sf_order(sandbox, order.order_id)["patches"]
    assert patches[-1]["fields"]["Activated_At__c"].startswith(sent)
    # A re-approval writes the Order back with the very same time.
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{order.order_id}", {"activation_status": "Activating"}
    )
    second = RunId(order.order_id, "approval-2")
    _run_chain(services, second, {"update_salesforce": update_salesforce})
    patches = [p for p in _sf_order(sandbox, order.order_id)["patches"] if p["source"] == "api"]
    assert len(patches) == 2
    assert patches[-1]["fields"]["Activated_At__c"].startswith(sent)
    assert patches[-1]["fields"]["Activation_Status__c"] == "Activated"


def _begin_done(services: Services, run_id: RunId) -> Any:
    return run_step(services, run_id, at("validate_payment", _ok(PaymentChecked(whmcs_client_id=1))))


def _whmcs_calls(sandbox) -> dict[str, int]:
    return dict(sandbox.admin("whmcs").get("/__admin/calls")["calls"])


def test_a_first_try_of_the_whmcs_step_orders_at_once_on_the_intent_its_claim_stamped(
    sandbox, services, order
):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    sandbox.admin("whmcs").post("/__admin/calls/reset")
    done = run_step(services, run_id, at("create_whmcs_order", create_whmcs_order))
    calls = _whmcs_calls(sandbox)
    assert (calls.get("AddOrder"), calls.get("AcceptOrder"), calls.get("GetOrders", 0)) == (1, 1, 0)
    markers = services.ledger.orders.provisioning(order.order_id).markers
    assert markers["whmcs_intent"]
    assert markers["whmcs_order_id"] == str(done.result["whmcs_order_id"])


def test_a_try_that_finds_an_earlier_tries_intent_adopts_the_order_that_try_made(sandbox, services, order):
    run_id = RunId.parse(order.run_id)
    _begin(services, run_id)
    # An earlier try: its claim stamped the intent, AddOrder went through, the answer was lost
    # with its worker (no step end).
    earlier = services.ledger.runs.claim(
        run_id, "create_whmcs_order", owned_by_order=True, stamp=("whmcs_intent", "earlier")
    )
    assert earlier.lease is not None
    made = services.whmcs.add_order(
        client_id=order.whmcs_client_id,
        payment_method=services.settings.whmcs_payment_method,
        items=[(1, 1)],
        notes=order_note(order.order_id),
    )
    earlier.lease.release()
    sandbox.admin("whmcs").post("/__admin/calls/reset")
    done = run_step(services, run_id, at("create_whmcs_order", create_whmcs_order))
    assert done.result == {"whmcs_order_id": made.order_id}
    calls = _whmcs_calls(sandbox)
    assert (calls.get("GetOrders"), calls.get("AddOrder", 0), calls.get("AcceptOrder")) == (1, 0, 1)
