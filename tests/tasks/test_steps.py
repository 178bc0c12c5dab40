"""The step tasks in-process (the fast tier): a Celery app on ``memory://`` with a worker thread.

The real tasks of ``tasks/steps.py``, the real lifecycle, the real ledger on Redis and
the simulators in this process; only the broker is Celery's in-memory transport, so
the hand-off from step to step, the retries and the failures run in milliseconds. What a
broker adds (redelivery after a crash, visibility timeouts) is the worker-process
tests' business (``test_crashes.py``, ``test_rabbitmq.py``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import signals
from celery.contrib.testing.worker import start_worker

from provisioning.core.settings import Settings
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN, Chain
from provisioning.runs.publishing import publish_run
from provisioning.runs.services import Services
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import count_effects, seed_orders, wait_until
from provisioning.step.context import StepContext
from provisioning.step.results import StepResult
from provisioning.step.spec import StepSpec, System
from tasks.app import ProvisioningCelery, create_app
from tasks.steps import step_task
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.fast


class Seen:
    """What the worker did, from Celery's own signals: each task's name and outcome, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()

    def _add(self, name: str, what: str, detail: Any = None) -> None:
        with self._lock:
            self.events.append((name, what, detail))

    def on_success(self, sender: Any, result: Any, **_: Any) -> None:
        self._add(sender.name, "success", result)

    def on_retry(self, sender: Any, reason: Any, **_: Any) -> None:
        self._add(sender.name, "retry", reason)

    def on_failure(self, sender: Any, exception: BaseException, **_: Any) -> None:
        self._add(sender.name, "failure", exception)

    def outcomes(self, what: str) -> list[str]:
        with self._lock:
            return [name for name, kind, _ in self.events if kind == what]

    def result(self, name: str) -> Any:
        with self._lock:
            return next(detail for n, kind, detail in self.events if n == name and kind == "success")


@pytest.fixture
def seen() -> Iterator[Seen]:
    watcher = Seen()
    signals.task_success.connect(watcher.on_success, weak=False)
    signals.task_retry.connect(watcher.on_retry, weak=False)
    signals.task_failure.connect(watcher.on_failure, weak=False)
    yield watcher
    signals.task_success.disconnect(watcher.on_success)
    signals.task_retry.disconnect(watcher.on_retry)
    signals.task_failure.disconnect(watcher.on_failure)


# One sandbox, one app and one worker thread for the module: a worker takes seconds to stop.
@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path_factory.mktemp("sandbox"), seed=4321).start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def app(box: Sandbox) -> Iterator[ProvisioningCelery]:
    """The tasks' own app on memory://, with a worker thread in this process."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    values = {k.lower(): v for k, v in box.env().items()}
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{
            **values,
            "redis_url": REDIS_URL,
            "celery_broker_url": "memory://",
            "ledger_prefix": ns,
            "celery_queue": f"q-{ns}",
            "task_retry_backoff_s": 0.05,
            "task_retry_backoff_max_s": 0.2,
            "run_lease_ttl_s": 10,
        },
    )
    application = create_app(settings)
    # The in-memory transport polls its queues (every second by default): poll often instead.
    application.conf.broker_transport_options = {
        **application.conf.broker_transport_options,
        "polling_interval": 0.01,
    }
    application.loader.import_default_modules()
    with start_worker(
        application, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10
    ):
        yield application
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def services(app: ProvisioningCelery) -> Services:
    services: Services = app.services
    return services


@pytest.fixture
def sandbox(box: Sandbox) -> Sandbox:
    box.admin("whmcs").post("/__admin/faults", {})
    return box


def _state(services: Any, run_id: str) -> RunState | None:
    run = services.ledger.runs.get(run_id)
    return run.state if run is not None else None


def test_a_run_goes_through_its_chain_each_step_a_task_that_sends_the_next(app, sandbox, services, seen):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=91)
    before = count_effects(sandbox)
    publish_run(app, order.run_id)
    wait_until(lambda: len(seen.outcomes("success")) == len(CHAIN), timeout_s=30)
    assert seen.outcomes("success") == [spec.task_name for spec in CHAIN]
    assert seen.outcomes("retry") == seen.outcomes("failure") == []
    # Each result is the step's (ids only) and names the step it sent; the last sends none.
    assert seen.result("provisioning.create_whmcs_order")["next"] == "update_salesforce"
    assert "whmcs_order_id" in seen.result("provisioning.create_whmcs_order")
    assert "next" not in seen.result("provisioning.send_email")
    assert _state(services, order.run_id) is RunState.DONE
    effects = count_effects(sandbox)
    assert effects.whmcs_orders - before.whmcs_orders == 1
    assert effects.esim_confirmed - before.esim_confirmed == 1
    assert effects.emails - before.emails == 1


def test_a_transient_error_retries_the_steps_own_task_and_the_chain_goes_on(app, sandbox, services, seen):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, seed=92)
    before = count_effects(sandbox)
    sandbox.admin("whmcs").post("/__admin/faults", {"force": {"AddOrder": ["error"]}})
    publish_run(app, order.run_id)
    wait_until(lambda: _state(services, order.run_id) is RunState.DONE, timeout_s=30)
    assert seen.outcomes("retry") == ["provisioning.create_whmcs_order"]
    # A physical SIM's run sends no eSIM task: its result is recorded by the step before.
    assert seen.outcomes("success") == [spec.task_name for spec in CHAIN if spec.name != "activate_esim"]
    assert count_effects(sandbox).whmcs_orders - before.whmcs_orders == 1


def test_a_permanent_error_fails_the_steps_task_and_no_later_step_is_sent(app, sandbox, services, seen):
    # The Order's client has no pay method: validate_payment refuses it for good.
    (order,) = seed_orders(
        sandbox, services.inventory, count=1, esim_share=0.0, without_pay_method=1, seed=93
    )
    publish_run(app, order.run_id)
    wait_until(lambda: seen.outcomes("failure"), timeout_s=30)
    assert seen.outcomes("failure") == ["provisioning.validate_payment"]
    assert seen.outcomes("success") == []
    assert _state(services, order.run_id) is RunState.FAILED
    view = sandbox.admin("salesforce").get(f"/__admin/orders/{order.order_id}")
    assert view["Activation_Status__c"] == "Failed"
    assert view["Activation_Error__c"].startswith("validate_payment: ")


def test_another_worker_holding_the_orders_lease_is_waited_for_without_failing(app, sandbox, services, seen):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=0.0, seed=94)
    lease = services.ledger.leases.lease(order.order_id)
    assert lease.acquire(blocking=False)
    publish_run(app, order.run_id)
    wait_until(lambda: seen.outcomes("retry"), timeout_s=30)
    lease.release()
    wait_until(lambda: _state(services, order.run_id) is RunState.DONE, timeout_s=30)
    assert set(seen.outcomes("retry")) == {"provisioning.validate_payment"}
    assert seen.outcomes("failure") == []


class CrmNotified(StepResult):
    crm_ticket: str


NOTIFIED: list[str] = []


def notify_crm(ctx: StepContext) -> CrmNotified:
    """The toy step's action: what a domain's ``steps.py`` would hold."""
    NOTIFIED.append(ctx.order_id)
    return CrmNotified(crm_ticket=f"CRM-{ctx.effect_key[-4:]}")


# The recipe of docs/architecture.md ("How to add a step"): the action above, its row, its task line.
NOTIFY_CRM = StepSpec("notify_crm", notify_crm, CrmNotified, System.SALESFORCE, effect=True)
notify_crm_task = step_task(NOTIFY_CRM)


def test_a_step_added_to_the_table_with_its_task_line_goes_through_a_real_run(app, sandbox, services, seen):
    table = Chain([*CHAIN.specs[:4], NOTIFY_CRM, CHAIN.specs[4]])
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=95)
    NOTIFIED.clear()
    app.chain = table
    app.reset_services()
    try:
        services = app.services
        publish_run(app, order.run_id)
        wait_until(lambda: len(seen.outcomes("success")) == len(table), timeout_s=30)
    finally:
        app.chain = CHAIN
        app.reset_services()
    assert seen.outcomes("success") == [spec.task_name for spec in table]
    assert [order.order_id] == NOTIFIED
    # Recorded once for the Order, like any step with an effect.
    recorded = services.ledger.orders.provisioning(order.order_id).step("notify_crm").result
    assert recorded == {"crm_ticket": f"CRM-{order.order_id[-4:]}"}
    assert seen.result("provisioning.update_salesforce")["next"] == "notify_crm"
