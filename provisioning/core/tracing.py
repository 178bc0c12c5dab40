"""Traces (OpenTelemetry): one trace per run, off unless ``TRACING_EXPORTER`` says where they go.

A run's trace begins at the listener's event (``provisioning.event``, where the listener publishes
the run: ``runs/publishing.py:publish_runs``), goes through every step task (``run/<task name>``,
``tasks/app.py``), each a child of the task that sent it, and ends in the HTTP and SMTP calls the
steps make (urllib3's and requests' instrumentations; the SMTP span is ours, ``email/sender.py``).
The context travels in the task messages' headers (W3C ``traceparent``): :func:`headers` when a
task is sent or retried, :func:`carrier` and :func:`run_span` when a task runs. We hand it over
ourselves rather than through opentelemetry-instrumentation-celery: a process that sends a task
by name without having it registered (the listener, the operators' commands) gets from that
instrumentation a span that is never ended, whose context stays attached to the thread, and every
later run of the process would join the first one's trace.

What a span says: the run id (``provisioning.run_id``), the task's name, the HTTP method, host and
path (never a query string, a header or a body), the SMTP server; an error as its exception's
class only (an error's text can quote the Order's customer). No customer data, no secrets.

Off (the default) nothing here imports OpenTelemetry, and every helper returns after one test
of a module global. On, without the ``otel`` extra installed, :func:`start` raises a ConfigError
that names the extra to install.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from provisioning.core.settings import ConfigError, Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, Tracer

# The attribute every span of ours carries: which run it belongs to (an Order id and a generation).
RUN_ID_ATTRIBUTE: Final = "provisioning.run_id"
INSTALL_HINT: Final = (
    "needs the otel extra: pip install 'sf-provisioning[otel]' "
    "(requirements/runtime.txt and `make install` include it)"
)
# The span attributes of an HTTP client span that hold its URL (old and new semantic conventions).
URL_ATTRIBUTES: Final = ("http.url", "url.full")

Kind = Literal["internal", "producer", "consumer", "client"]


class _Tracing:
    """What one process's tracing holds while it is on: the provider and the instrumentations."""

    def __init__(self, provider: TracerProvider, tracer: Tracer, instrumentors: list[Any]) -> None:
        self.provider = provider
        self.tracer = tracer
        self.instrumentors = instrumentors


_active: _Tracing | None = None
_lock = threading.Lock()


def enabled() -> bool:
    return _active is not None


def start(settings: Settings, service: str, *, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process when ``TRACING_EXPORTER`` asks for it (or ``exporter`` is given).

    Returns whether it is on. ``service`` is the service name the spans carry unless
    ``OTEL_SERVICE_NAME`` names one. ``exporter`` (tests: the SDK's in-memory exporter) is used
    instead of the setting's, each span exported as it ends; the setting's are batched. Calling it
    again while tracing is on changes nothing. Call it before any HTTP client is used, once per
    process (a forked child keeps it: the batch exporter restarts its thread after a fork).
    """
    global _active
    if exporter is None and settings.tracing_exporter == "none":
        return False
    with _lock:
        if _active is not None:
            return True
        try:
            from opentelemetry import trace
            from opentelemetry.instrumentation.requests import RequestsInstrumentor
            from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as exc:
            raise ConfigError(
                [("TRACING_EXPORTER", f"{settings.tracing_exporter} {INSTALL_HINT} ({exc.name} is missing)")]
            ) from None
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
        provider = TracerProvider(resource=Resource.create(attributes), sampler=_runs_only())
        processor: SpanProcessor
        if exporter is not None:
            processor = SimpleSpanProcessor(exporter)
        else:
            processor = BatchSpanProcessor(_exporter(settings))
        provider.add_span_processor(processor)
        urllib3_instrumentor = URLLib3Instrumentor()
        urllib3_instrumentor.instrument(tracer_provider=provider, url_filter=without_query)
        requests_instrumentor = RequestsInstrumentor()
        requests_instrumentor.instrument(tracer_provider=provider, request_hook=_requests_url)
        tracer = trace.get_tracer("provisioning", tracer_provider=provider)
        _active = _Tracing(provider, tracer, [urllib3_instrumentor, requests_instrumentor])
        return True


def stop() -> None:
    """Export what is left and turn tracing off again (the instrumentations removed)."""
    global _active
    with _lock:
        active, _active = _active, None
    if active is None:
        return
    for instrumentor in active.instrumentors:
        instrumentor.uninstrument()
    active.provider.shutdown()


def flush(timeout_ms: int = 5000) -> None:
    """Export every span that has ended (the batch exporter sends on its own every few seconds)."""
    active = _active
    if active is not None:
        active.provider.force_flush(timeout_ms)


def _runs_only() -> Sampler:
    """Every trace is a run's: a span with no parent is kept only when it names its run.

    What a process calls outside any run (the listener's CometD polls and its backfill query, a
    login) would otherwise be a trace of one HTTP span each, every few seconds.
    """
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
    )

    class RunsOnly(Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if attributes and RUN_ID_ATTRIBUTE in attributes:
                return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links)
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "RunsOnly"

    return ParentBased(root=RunsOnly())


def _exporter(settings: Settings) -> SpanExporter:
    if settings.tracing_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError([("TRACING_EXPORTER", f"otlp {INSTALL_HINT} ({exc.name} is missing)")]) from None
    # Its endpoint, headers and timeout from the standard OTEL_EXPORTER_OTLP_* variables.
    return OTLPSpanExporter()


def without_query(url: str) -> str:
    """The URL a span may show: no query string, no fragment, no credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _requests_url(span: Span, request: Any) -> None:
    """requests' instrumentation keeps the query string (a SOQL query's text): replace it."""
    if not span.is_recording():
        return
    recorded = getattr(span, "attributes", None) or {}
    for key in URL_ATTRIBUTES:
        if key in recorded:
            span.set_attribute(key, without_query(str(request.url)))


def headers() -> dict[str, str] | None:
    """The current span's context as a task message's headers; None when off or outside any span."""
    if _active is None:
        return None
    from opentelemetry.propagate import inject

    carried: dict[str, str] = {}
    inject(carried)
    return carried or None


def carrier(get: Callable[[str], object]) -> dict[str, str] | None:
    """The propagation headers ``get`` finds (a task's request: ``getattr(request, name, None)``)."""
    if _active is None:
        return None
    from opentelemetry.propagate import get_global_textmap

    found = {name: get(name) for name in get_global_textmap().fields}
    return {name: value for name, value in found.items() if isinstance(value, str)} or None


def run_span(
    name: str,
    run_id: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: Kind = "internal",
    attributes: Mapping[str, str | int] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> contextlib.AbstractContextManager[None]:
    """A span of the run (current inside the block), a child of ``parent`` (message headers) if given.

    An exception leaving the block marks the span failed with the exception's class only, unless
    it is one of ``expected`` (a task's retry).
    """
    if _active is None:
        return contextlib.nullcontext()
    return _span(_active, name, {**(attributes or {}), RUN_ID_ATTRIBUTE: run_id}, parent, kind, expected)


def client_span(name: str, attributes: Mapping[str, str | int]) -> contextlib.AbstractContextManager[None]:
    """A call to another system that no instrumentation sees (SMTP), under the current span."""
    if _active is None:
        return contextlib.nullcontext()
    return _span(_active, name, dict(attributes), None, "client", ())


@contextlib.contextmanager
def _span(
    active: _Tracing,
    name: str,
    attributes: dict[str, str | int],
    parent: Mapping[str, str] | None,
    kind: Kind,
    expected: tuple[type[BaseException], ...],
) -> Iterator[None]:
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind, Status, StatusCode

    context = extract(parent) if parent else None
    with active.tracer.start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, expected):
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
