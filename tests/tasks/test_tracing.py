"""Traces (TRACING_EXPORTER, the otel extra): one trace per run, from its event to every call.

In-process, as the fast tier runs a chain (``test_steps.py``): the real tasks, lifecycle, ledger on
Redis and simulators, Celery's in-memory transport, and OpenTelemetry's SDK with its in-memory
exporter in place of the console or OTLP one.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import signals
from celery.contrib.testing.worker import start_worker
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from provisioning.core import tracing
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN
from provisioning.runs.publishing import EVENT_SPAN, publish_runs
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import seed_orders, wait_until
from tasks.app import ProvisioningCelery, create_app
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path_factory.mktemp("sandbox"), seed=2468).start()
    yield sandbox
    sandbox.stop()


def _settings(box: Sandbox, ns: str) -> Settings:
    values = {k.lower(): v for k, v in box.env().items()}
    return Settings(
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


def _worker_app(box: Sandbox, exporter: InMemorySpanExporter | None) -> Iterator[ProvisioningCelery]:
    """The tasks' app on memory:// with a worker thread in this process; its worker starts tracing."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    application = create_app(_settings(box, ns), span_exporter=exporter)
    application.conf.broker_transport_options = {
        **application.conf.broker_transport_options,
        "polling_interval": 0.01,
    }
    application.loader.import_default_modules()
    try:
        with start_worker(
            application, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10
        ):
            yield application
    finally:
        tracing.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced_app(box: Sandbox, exporter: InMemorySpanExporter) -> Iterator[ProvisioningCelery]:
    """A worker per test: tracing is the process's, on from its worker's start to its stop."""
    yield from _worker_app(box, exporter)


@pytest.fixture
def untraced_app(box: Sandbox) -> Iterator[ProvisioningCelery]:
    yield from _worker_app(box, None)


@pytest.fixture
def sandbox(box: Sandbox) -> Sandbox:
    box.admin("whmcs").post("/__admin/faults", {})
    return box


class Published:
    """The headers of every task message sent (Celery's own signal)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        with self._lock:
            self.headers.append(dict(headers or {}))


@pytest.fixture
def published() -> Iterator[Published]:
    seen = Published()
    signals.before_task_publish.connect(seen, weak=False)
    yield seen
    signals.before_task_publish.disconnect(seen)


def _state(app: ProvisioningCelery, run_id: str) -> RunState | None:
    run = app.services.ledger.runs.get(run_id)
    return run.state if run is not None else None


def _run(app: ProvisioningCelery, run_id: str) -> None:
    """Start the run as the listener does (publish_runs), and wait for it to end done."""
    publish_runs(app, [RunId.parse(run_id)])
    wait_until(lambda: _state(app, run_id) is RunState.DONE, timeout_s=30)


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    found = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        found.append(span)
    return found


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _attribute(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def _attribute_text(spans: list[ReadableSpan]) -> str:
    return "\n".join(f"{key}={value}" for span in spans for key, value in (span.attributes or {}).items())


def test_a_run_is_one_trace_from_its_event_through_each_step_task_to_each_call(traced_app, sandbox, exporter):
    (order,) = seed_orders(sandbox, traced_app.services.inventory, count=1, esim_share=1.0, seed=71)
    _run(traced_app, order.run_id)
    tracing.flush()
    spans = list(exporter.get_finished_spans())

    # One trace: the event's span is its root, and every span recorded belongs to it (what the test and
    # the workers called outside the run, the simulators' admin calls, is no trace at all).
    (event,) = [s for s in spans if s.name == EVENT_SPAN]
    assert event.parent is None
    assert {s.context.trace_id for s in spans} == {event.context.trace_id}

    # The five step tasks, in the chain's order, each the child of the task that sent it.
    tasks = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert [s.name for s in sorted(tasks, key=lambda s: s.start_time)] == [
        f"run/{spec.task_name}" for spec in CHAIN
    ]
    parents = [event, *sorted(tasks, key=lambda s: s.start_time)]
    for parent, child in itertools.pairwise(parents):
        assert _parent_id(child) == parent.context.span_id, child.name

    # The run id on the event and on every task; no span of ours without it.
    for span in [event, *tasks]:
        assert _attribute(span, tracing.RUN_ID_ATTRIBUTE) == order.run_id

    # HTTP calls (Salesforce, WHMCS, the SM-DP+) and the SMTP send, each beneath its step's task.
    by_id = {s.context.span_id: s for s in spans}
    calls = [s for s in spans if s.kind is SpanKind.CLIENT]
    under = {
        call.name: next(a.name for a in _ancestors(call, by_id) if a.kind is SpanKind.CONSUMER)
        for call in calls
    }
    assert under["smtp send"] == "run/provisioning.send_email"
    http_under = {
        next(a.name for a in _ancestors(c, by_id) if a.kind is SpanKind.CONSUMER)
        for c in calls
        if c.name != "smtp send"
    }
    assert {
        "run/provisioning.validate_payment",
        "run/provisioning.activate_esim",
        "run/provisioning.create_whmcs_order",
        "run/provisioning.update_salesforce",
    } <= http_under

    # No customer data and no secrets in any attribute: not the e-mail address, the name, the EID or
    # the ICCID of the seeded Order, nor a credential of the settings, nor any URL's query string.
    text = _attribute_text(spans)
    view = sandbox.admin("salesforce").get(f"/__admin/orders/{order.order_id}")
    iccid = (
        traced_app.services.ledger.orders.provisioning(order.order_id).step("activate_esim").result["iccid"]
    )
    customer = [f"customer{0}@example.test", "Customer0", "Example", view["EID__c"], iccid]
    settings = traced_app.settings
    secrets = [
        value.get_secret_value()
        for value in (settings.whmcs_identifier, settings.whmcs_secret, settings.smtp_password)
        if value is not None
    ]
    for value in [*customer, *secrets]:
        assert value
        assert value not in text, value
    assert "?" not in "".join(str(_attribute(s, "http.url")) for s in calls)


def test_a_retried_step_stays_in_its_runs_trace_beneath_the_attempt_that_retried(
    traced_app, sandbox, exporter
):
    (order,) = seed_orders(sandbox, traced_app.services.inventory, count=1, esim_share=0.0, seed=72)
    sandbox.admin("whmcs").post("/__admin/faults", {"force": {"AddOrder": ["error"]}})
    _run(traced_app, order.run_id)
    tracing.flush()
    spans = list(exporter.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1
    attempts = sorted(
        (s for s in spans if s.name == "run/provisioning.create_whmcs_order"), key=lambda s: s.start_time
    )
    assert len(attempts) == 2
    first, second = attempts
    # The retry is no failure of the span; the second attempt is the first one's child.
    assert first.status.is_ok
    assert _parent_id(second) == first.context.span_id
    assert _attribute(second, "celery.retries") == 1


def test_with_tracing_off_a_run_carries_no_trace_context_and_records_no_span(
    untraced_app, sandbox, published
):
    assert untraced_app.settings.tracing_exporter == "none"
    (order,) = seed_orders(sandbox, untraced_app.services.inventory, count=1, esim_share=1.0, seed=73)
    _run(untraced_app, order.run_id)
    assert not tracing.enabled()
    sent = [h for h in published.headers if h.get("argsrepr") == repr((order.run_id,))]
    assert len(sent) == len(CHAIN)
    assert all("traceparent" not in headers for headers in sent)


def test_with_tracing_off_no_process_loads_the_tracing_sdk_or_an_instrumentation():
    # What a worker and the listener load, tracing left at its default: neither the SDK's tracing nor
    # an instrumentation is imported. (redis-py imports OpenTelemetry's metrics SDK itself when it is
    # installed, for its own observability, which stays off: not ours to count.)
    code = """
import sys
from provisioning.core import tracing
from provisioning.core.settings import Settings
import tasks.steps, provisioning.runs.publishing, provisioning.email.sender, provisioning.listener.command
from tasks.app import create_app
settings = Settings(_env_file=None)
create_app(settings)
assert tracing.start(settings, "provisioning-worker") is False
assert tracing.headers() is None
with tracing.run_span("provisioning.event", "x"):
    pass
tracing_stack = ("opentelemetry.sdk.trace", "opentelemetry.instrumentation", "opentelemetry.exporter")
loaded = sorted(m for m in sys.modules if m.startswith(tracing_stack))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("exporter_name", ["console", "otlp"])
def test_tracing_asked_for_without_the_otel_extra_is_a_configuration_error_naming_it(exporter_name):
    # The extra not installed: its modules cannot be imported (None in sys.modules makes import fail).
    code = f"""
import sys
for name in ("opentelemetry", "opentelemetry.sdk", "opentelemetry.trace"):
    sys.modules[name] = None
from provisioning.core import tracing
from provisioning.core.settings import ConfigError, Settings
try:
    tracing.start(Settings(_env_file=None, tracing_exporter="{exporter_name}"), "provisioning-worker")
except ConfigError as exc:
    print(exc)
else:
    raise SystemExit("no error")
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert "TRACING_EXPORTER" in out.stdout
    assert "pip install 'sf-provisioning[otel]'" in out.stdout


def test_a_span_url_keeps_no_query_string_fragment_or_credentials():
    assert (
        tracing.without_query("https://user:pw@example.test:8443/services/data/v64.0/query?q=SELECT+Id#x")
        == "https://example.test:8443/services/data/v64.0/query"
    )
