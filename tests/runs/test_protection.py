"""A step meets its system's rate limit and circuit breaker (the fast tier: the real lifecycle in-process)."""

from __future__ import annotations

import pytest

from provisioning.core.retry import RATE_SLOT_JITTER_S, Cause, Wait
from provisioning.core.run_id import RunId
from provisioning.esim.errors import Es2PlusServerError
from provisioning.ledger.inventory import InventoryEmpty
from provisioning.ledger.keys import Keys
from provisioning.ledger.limits import BreakerState
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.runs.routing import step_queues
from provisioning.runs.services import Services
from provisioning.sandbox.scenario import seed_orders
from provisioning.step.results import EsimActivated, PaymentChecked
from provisioning.step.spec import System
from provisioning.whmcs.errors import WhmcsTransientError
from tests.steps import at, ok, raising

pytestmark = pytest.mark.fast


@pytest.fixture
def protected(stack_settings):
    settings = stack_settings.model_copy(
        update={
            "breaker_failures": 2,
            "breaker_cooldown_s": 30.0,
            "celery_visibility_timeout_s": 3600,
        }
    )
    services = Services(settings)
    yield services
    services.redis.close()


def _begun(sandbox, services: Services) -> RunId:
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=97)
    run_id = RunId.parse(order.run_id)
    run_step(services, run_id, at("validate_payment", ok(PaymentChecked(whmcs_client_id=1))))
    return run_id


def _attempts(services: Services, run_id: RunId, step: str) -> int:
    run = services.ledger.runs.get(run_id)
    record = run.own_steps.get(step) if run else None
    return record.attempts if record else 0


def test_an_open_circuit_makes_the_step_wait_without_claiming_it_or_spending_its_budget(sandbox, protected):
    run_id = _begun(sandbox, protected)
    down = raising(WhmcsTransientError("WHMCS AddOrder: HTTP 503", action="AddOrder", status=503))
    for _ in range(2):  # BREAKER_FAILURES=2 failures in a row open the circuit
        with pytest.raises(Wait) as failed:
            run_step(protected, run_id, at("create_whmcs_order", down))
        assert failed.value.cause is Cause.TRANSIENT
    (view,) = protected.ledger.limits.breakers(["whmcs"])
    assert view.state is BreakerState.OPEN
    with pytest.raises(Wait) as waiting:
        run_step(protected, run_id, at("create_whmcs_order", down))
    assert waiting.value.cause is Cause.BREAKER_OPEN
    assert 29 <= waiting.value.countdown_s <= 31 + 1  # the cool-down, and a jitter of at most a second
    assert _attempts(protected, run_id, "create_whmcs_order") == 2  # the wait claimed nothing


def test_a_system_s_own_failures_count_against_its_breaker_and_nothing_else_does(sandbox, protected):
    run_id = _begun(sandbox, protected)
    for _ in range(3):  # the inventory is ours, not the SM-DP+'s
        with pytest.raises(Wait):
            run_step(protected, run_id, at("activate_esim", raising(InventoryEmpty())))
    (view,) = protected.ledger.limits.breakers(["smdp"])
    assert (view.state, view.failures) == (BreakerState.CLOSED, 0)
    with pytest.raises(Wait):
        run_step(
            protected, run_id, at("activate_esim", raising(Es2PlusServerError("HTTP 503", status_code=503)))
        )
    (view,) = protected.ledger.limits.breakers(["smdp"])
    assert (view.state, view.failures) == (BreakerState.CLOSED, 1)


def test_a_429_opens_the_circuit_at_once_for_the_retry_after_the_system_gave(sandbox, protected):
    run_id = _begun(sandbox, protected)
    throttled = WhmcsTransientError("WHMCS AddOrder: HTTP 429", action="AddOrder", status=429)
    throttled.throttled, throttled.retry_after_s = True, 7.0
    with pytest.raises(Wait):
        run_step(protected, run_id, at("create_whmcs_order", raising(throttled)))
    with pytest.raises(Wait) as waiting:
        run_step(protected, run_id, at("create_whmcs_order", ok(EsimActivated(iccid="1"))))
    assert waiting.value.cause is Cause.BREAKER_OPEN
    assert 6 <= waiting.value.countdown_s <= 8 + 1


def test_a_step_beyond_its_system_s_rate_limit_waits_for_its_slot_without_spending_budget(
    sandbox, stack_settings
):
    settings = stack_settings.model_copy(
        update={"rate_limit_smdp": "2/m", "celery_visibility_timeout_s": 3600}
    )
    protected = Services(settings)
    run_id = _begun(sandbox, protected)
    # RATE_LIMIT_SMDP=2/m and the eSIM step makes two calls: one step a minute.
    assert protected.ledger.limits.admit("smdp", rate=protected.protection.rate(System.SMDP), calls=2).ok
    with pytest.raises(Wait) as waiting:
        run_step(protected, run_id, at("activate_esim", ok(EsimActivated(iccid="8988211000000000001"))))
    assert waiting.value.cause is Cause.RATE_LIMITED
    # Its slot: when the next two calls are free (a minute), and at most RATE_SLOT_JITTER_S more.
    assert 55 <= waiting.value.countdown_s <= 60 + RATE_SLOT_JITTER_S
    # Another run's step is queued behind it: a step's two calls later.
    other = _begun(sandbox, protected)
    with pytest.raises(Wait) as behind:
        run_step(protected, other, at("activate_esim", ok(EsimActivated(iccid="8988211000000000002"))))
    assert 55 + 60 <= behind.value.countdown_s <= 60 + 60 + RATE_SLOT_JITTER_S
    assert _attempts(protected, run_id, "activate_esim") == 0
    protected.redis.close()


def test_each_call_of_an_admitted_step_is_counted_when_it_goes_out_not_when_it_was_admitted(
    sandbox, stack_settings
):
    settings = stack_settings.model_copy(update={"rate_limit_smdp": "100/s"})
    protected = Services(settings)
    run_id = _begun(sandbox, protected)
    sandbox.admin("smdp").post("/__admin/faults", {"latency_ms": 150})
    try:
        admitted_at_ms = protected.redis.time()[0] * 1000
        run_step(protected, run_id, CHAIN["activate_esim"])
    finally:
        sandbox.admin("smdp").post("/__admin/faults", {})
    calls = protected.redis.zrange(
        Keys(settings.ledger_prefix).limit("smdp", "calls"), 0, -1, withscores=True
    )
    # downloadOrder, then confirmOrder once the first answered (150 ms later): two calls, the second
    # counted from when it went out.
    scores = sorted(score for _, score in calls)
    assert len(scores) == 2
    assert scores[0] >= admitted_at_ms
    assert scores[1] - scores[0] >= 140
    protected.redis.close()


def test_a_step_or_a_system_gets_a_queue_of_its_own_and_an_unknown_name_is_refused():
    assert step_queues({}) == {}
    assert step_queues({"whmcs": "billing", "create_whmcs_order": "orders"}) == {
        "provisioning.validate_payment": "billing",
        "provisioning.create_whmcs_order": "orders",
    }
    with pytest.raises(ValueError, match="CELERY_STEP_QUEUES names 'activate_sim': neither a step"):
        step_queues({"activate_sim": "esim"})


def test_the_orgs_api_usage_a_salesforce_answer_reports_is_kept_for_the_exporter_and_the_backfill(
    sandbox, protected
):
    assert protected.ledger.limits.api_usage() is None
    _begun(sandbox, protected)  # the run's beginning queried the Order
    usage = protected.ledger.limits.api_usage()
    assert usage is not None
    used, limit = protected.salesforce.api_usage()
    assert (usage.used, usage.limit) == (used, limit)
    assert 0 < usage.used < usage.limit
