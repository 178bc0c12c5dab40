"""Run metrics counted in Redis by the lifecycle, read back by the exporter's collector (the fast tier).

Real Redis, the real simulators, the real lifecycle in this process; the collector's
output is parsed with prometheus-client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import Origin
from provisioning.ledger.keys import Keys
from provisioning.ledger.metrics import STEP_DURATION, FailureCause, RunMetrics
from provisioning.ops.actions import requeue
from provisioning.ops.exporter import LedgerCollector, exported_names
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import RunEnded, RunFailed, run_step
from provisioning.runs.publishing import make_publisher
from provisioning.runs.reconciler import backfill_orders, resume_stale
from provisioning.runs.services import Services
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
from tests.steps import at

pytestmark = pytest.mark.fast

RESULTS: dict[str, StepResult] = {
    "validate_payment": PaymentChecked(whmcs_client_id=1, pay_methods=1),
    "activate_esim": EsimActivated(iccid="8988211000000000001"),
    "create_whmcs_order": WhmcsOrderCreated(whmcs_order_id=7),
    "update_salesforce": OrderWrittenBack(activated_at="2026-12-02T06:00:00.000Z"),
    "send_email": WelcomeEmail(message_id="<x@y>"),
}


class Flaky(TransientError):
    pass


class Refused(PermanentError):
    pass


def _ok(result: StepResult) -> Any:
    return lambda ctx: result


def _slow_ok(result: StepResult, seconds: float) -> Any:
    def action(ctx: StepContext) -> StepResult:
        time.sleep(seconds)
        return result

    return action


def _raise(exc: Exception) -> Any:
    def action(ctx: StepContext) -> StepResult:
        raise exc

    return action


def scrape(services: Services) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}, from the text format the collector serves."""
    registry = CollectorRegistry()
    registry.register(LedgerCollector(services))
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
def orders(sandbox, services):
    return seed_orders(sandbox, services.inventory, count=3, esim_share=1.0, seed=71)


def test_a_done_run_counts_its_start_its_end_each_steps_duration_and_retries_and_its_latency(
    sandbox, services, orders
):
    run_id = RunId.parse(orders[0].run_id)
    # The first step begins the run, then its first attempt fails for now.
    with pytest.raises(Wait):
        run_step(services, run_id, at("validate_payment", _raise(Flaky("WHMCS answered 503"))))
    for step in CHAIN.names:
        action = _slow_ok(RESULTS[step], 0.3) if step == "activate_esim" else _ok(RESULTS[step])
        run_step(services, run_id, at(step, action))
    # A second event with another key after it: the Order says Activated, the run is skipped.
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{orders[0].order_id}", {"activation_status": "Activated"}
    )
    with pytest.raises(RunEnded):
        run_step(
            services,
            RunId(orders[0].order_id, "approval-2"),
            at("validate_payment", _ok(RESULTS["validate_payment"])),
        )

    s = scrape(services)
    assert value(s, "provisioning_runs_started_total") == 1
    assert value(s, "provisioning_runs_ended_total", outcome="done") == 1
    assert value(s, "provisioning_runs_ended_total", outcome="skipped") == 1
    assert value(s, "provisioning_runs_ended_total", outcome="failed") == 0
    for step in CHAIN.names:
        assert value(s, "provisioning_step_duration_seconds_count", step=step) == 1
    # The eSIM step slept 0.3 s: in the 0.5 s bucket, not in the 0.25 s one.
    assert value(s, "provisioning_step_duration_seconds_bucket", step="activate_esim", le="0.25") == 0
    assert value(s, "provisioning_step_duration_seconds_bucket", step="activate_esim", le="0.5") == 1
    assert value(s, "provisioning_step_duration_seconds_sum", step="activate_esim") >= 0.3
    # validate_payment needed one retry; the others none.
    assert value(s, "provisioning_step_retries_bucket", step="validate_payment", le="0.0") == 0
    assert value(s, "provisioning_step_retries_bucket", step="validate_payment", le="1.0") == 1
    assert value(s, "provisioning_step_retries_sum", step="send_email") == 0
    assert value(s, "provisioning_activation_latency_seconds_count", origin="event") == 1
    latency = value(s, "provisioning_activation_latency_seconds_sum", origin="event")
    assert 0.3 <= latency < 60
    assert value(s, "provisioning_unfinished_runs") == 0
    assert value(s, "provisioning_oldest_unfinished_run_age_seconds") == 0


def test_failures_are_counted_by_step_and_cause_and_a_requeue_is_counted(
    sandbox, stack_settings, services, orders
):
    permanent, exhausted = (RunId.parse(o.run_id) for o in orders[:2])
    with pytest.raises(RunFailed):
        run_step(services, permanent, at("validate_payment", _raise(Refused("no pay method"))))
    run_step(services, exhausted, at("validate_payment", _ok(RESULTS["validate_payment"])))
    # Transient failures until the step's retries are spent.
    for _ in range(services.settings.task_max_retries):
        with pytest.raises(Wait):
            run_step(services, exhausted, at("activate_esim", _raise(Flaky("SM-DP+ down"))))
    with pytest.raises(RunFailed):
        run_step(services, exhausted, at("activate_esim", _raise(Flaky("SM-DP+ down"))))

    s = scrape(services)
    assert value(s, "provisioning_runs_failed_total", step="validate_payment", cause="permanent") == 1
    assert value(s, "provisioning_runs_failed_total", step="activate_esim", cause="transient_exhausted") == 1
    assert value(s, "provisioning_runs_failed_total", step="activate_esim", cause="permanent") == 0
    assert value(s, "provisioning_runs_ended_total", outcome="failed") == 2
    assert value(s, "provisioning_failed_runs") == 2
    assert value(s, "provisioning_failure_writebacks_pending") == 0
    assert value(s, "provisioning_step_retries_count", step="activate_esim") == 1

    requeue(services, make_publisher(stack_settings), [str(permanent)], dry_run=True, user="ops")
    assert value(scrape(services), "provisioning_runs_requeued_total") == 0
    requeue(services, make_publisher(stack_settings), [str(permanent)], dry_run=False, user="ops")
    s = scrape(services)
    assert value(s, "provisioning_runs_requeued_total") == 1
    assert value(s, "provisioning_failed_runs") == 1
    assert value(s, "provisioning_unfinished_runs") == 1
    assert value(s, "provisioning_oldest_unfinished_run_age_seconds") > 0


def test_joined_and_superseded_runs_are_counted(sandbox, services, orders):
    first = RunId.parse(orders[0].run_id)
    ok = _ok(RESULTS["validate_payment"])
    run_step(services, first, at("validate_payment", ok))
    with pytest.raises(RunEnded):  # joins the first, in flight
        run_step(services, RunId(orders[0].order_id, "approval-2"), at("validate_payment", ok))
    with pytest.raises(RunFailed):
        run_step(services, first, at("activate_esim", _raise(Refused("no such profile type"))))
    # A re-approval: the Order back in Activating, a new run continues and supersedes the failed one.
    sandbox.admin("salesforce").patch(
        f"/__admin/orders/{orders[0].order_id}", {"activation_status": "Activating"}
    )
    run_step(services, RunId(orders[0].order_id, "approval-3"), at("validate_payment", ok))
    s = scrape(services)
    assert value(s, "provisioning_runs_ended_total", outcome="joined") == 1
    assert value(s, "provisioning_runs_ended_total", outcome="superseded") == 1
    assert value(s, "provisioning_runs_started_total") == 2
    assert value(s, "provisioning_failed_runs") == 0


def test_the_reconcilers_resumes_and_backfill_are_counted_with_the_orders_waiting_in_activating(
    sandbox, stack_settings, services, orders
):
    app = make_publisher(stack_settings)
    stale = RunId.parse(orders[0].run_id)
    services.ledger.runs.enqueue(stale, Origin.EVENT)
    assert resume_stale(services, app, idle_s=0) == [stale]
    time.sleep(1.1)  # the query compares LastModifiedDate to the second
    started = backfill_orders(services, app, grace_s=0)
    # The first Order has a run in flight; the two others get theirs from the backfill.
    assert {r.order_id for r in started} == {o.order_id for o in orders[1:]}

    s = scrape(services)
    assert value(s, "provisioning_reconciler_actions_total", action="resume") == 1
    assert value(s, "provisioning_reconciler_actions_total", action="backfill") == 2
    assert value(s, "provisioning_reconciler_actions_total", action="writeback") == 0
    assert value(s, "provisioning_activating_orders") == 3
    assert 0 <= value(s, "provisioning_activating_oldest_order_age_seconds") < 120
    assert time.time() - value(s, "provisioning_activating_checked_timestamp_seconds") < 60


def test_the_registries_stock_and_listener_lock_are_read_at_scrape_time(services, orders):
    ledger = services.ledger
    ledger.registries.quarantine([{"replay_id": 1, "reason": "OrderId__c is missing", "payload": {}}])
    ledger.orders.email_refused(orders[0].order_id, "550 mailbox unavailable", {"outbox": "refused"})
    channel = services.settings.sf_provision_event_channel
    s = scrape(services)
    assert value(s, "provisioning_quarantined_events") == 1
    assert value(s, "provisioning_undelivered_emails") == 1
    stock = services.inventory.stock()
    assert value(s, "provisioning_esim_stock", state="free") == stock.free > 0
    assert value(s, "provisioning_esim_stock_warn_threshold") == services.settings.esim_stock_warn_threshold
    assert value(s, "provisioning_listener_leader", channel=channel) == 0
    lock = ledger.listener.leader_lock(channel, 30)
    assert lock.acquire(blocking=False)
    assert value(scrape(services), "provisioning_listener_leader", channel=channel) == 1


def test_every_exported_family_is_described_and_served_even_before_any_run(settings):
    services = Services(settings)
    collector = LedgerCollector(services)
    served = set(scrape(services))
    # What the backfill sweep reports has no value before its first sweep, the rate limits none when
    # none is set, the API budget none before Salesforce's first answer.
    assert exported_names(collector) - served == {
        "provisioning_activating_orders",
        "provisioning_activating_oldest_order_age_seconds",
        "provisioning_activating_checked_timestamp_seconds",
        "provisioning_rate_limit_calls_per_second",
        "provisioning_salesforce_api_requests_used",
        "provisioning_salesforce_api_requests_limit",
    }
    assert served <= exported_names(collector)
    assert "provisioning_runs_failed_total" in served
    # Zero-valued series exist from the start, so increase() counts a first failure.
    s = scrape(services)
    assert value(s, "provisioning_runs_failed_total", step="send_email", cause="permanent") == 0
    assert value(s, "provisioning_breaker_state", system="whmcs") == 0
    assert value(s, "provisioning_step_waits_total", system="smdp", cause="rate_limited") == 0


def test_a_systems_breaker_its_waits_its_rate_limit_and_the_api_budget_are_read_at_scrape_time(
    stack_settings,
):
    from provisioning.ledger.limits import BreakerPolicy, Outcome

    services = Services(stack_settings.model_copy(update={"rate_limit_whmcs": "600/m"}))
    limits = services.ledger.limits
    for _ in range(2):
        limits.record("whmcs", Outcome.FAILED, BreakerPolicy(failures=2, cooldown_s=60, cooldown_max_s=60))
    assert not limits.admit("whmcs", rate=None, calls=1).ok
    limits.record_api_usage(12000, 15000)
    s = scrape(services)
    assert value(s, "provisioning_breaker_state", system="whmcs") == 2
    assert value(s, "provisioning_breaker_failures", system="whmcs") == 2
    assert value(s, "provisioning_step_waits_total", system="whmcs", cause="breaker_open") == 1
    assert value(s, "provisioning_rate_limit_calls_per_second", system="whmcs") == 10
    assert value(s, "provisioning_salesforce_api_requests_used") == 12000
    assert value(s, "provisioning_salesforce_api_requests_limit") == 15000


def test_the_exporter_reports_the_ledger_down_instead_of_failing_the_scrape(settings):
    from provisioning.sandbox.processes import free_port

    down = Settings(
        _env_file=None, **{**settings.model_dump(), "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )  # type: ignore[call-arg]
    s = scrape(Services(down))
    assert s == {"provisioning_ledger_up": {(): 0.0}}


def test_a_histogram_bucket_index_matches_prometheus_le_semantics():
    assert STEP_DURATION.bucket_index(0.05) == 0  # le="0.05" holds 0.05 itself
    assert STEP_DURATION.bucket_index(0.051) == 1
    assert STEP_DURATION.bucket_index(10_000) == len(STEP_DURATION.buckets)
    metrics = RunMetrics(Keys("x"))
    assert metrics.histogram_key(STEP_DURATION) == "x:metrics:h:provisioning_step_duration_seconds"
    assert FailureCause("transient_exhausted") is FailureCause.TRANSIENT_EXHAUSTED


def test_the_retries_histogram_derives_its_sum_from_its_buckets_and_stores_only_what_overflows(
    services,
):
    from provisioning.ledger.metrics import STEP_RETRIES, StepObservation

    metrics = services.ledger.metrics
    pipe = services.redis.pipeline(transaction=False)
    for attempts in (1, 3, 3, 40):
        metrics.step_done(pipe, StepObservation("send_email", attempts=attempts, duration_s=0.01))
    commands = len(pipe.command_stack)
    pipe.execute()
    # Per observation: duration bucket and sum, retries bucket; the overflow (39 retries) adds its sum.
    assert commands == 4 * 3 + 1
    s = scrape(services)
    assert value(s, "provisioning_step_retries_sum", step="send_email") == 0 + 2 + 2 + 39
    assert value(s, "provisioning_step_retries_count", step="send_email") == 4
    assert value(s, "provisioning_step_retries_bucket", step="send_email", le="2.0") == 3
    assert value(s, "provisioning_step_retries_bucket", step="send_email", le="10.0") == 3
    assert value(s, "provisioning_step_retries_bucket", step="send_email", le="+Inf") == 4
    assert STEP_RETRIES.integer
