"""One logging setup for every process: the listener, the workers and the CLI.

Lines are human-readable or JSON (``LOG_FORMAT``). Code logs through
:func:`get_logger` (structlog over the standard library, so Celery's own
records get the same format). :func:`bind_run` puts the run id and the Order
id on every line logged in the current context (a task, an event); never bind
or log secrets or customer data (names, e-mail addresses).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from provisioning.core.settings import Settings

_SECRET_KEYS = frozenset(
    {"password", "secret", "token", "access_token", "authorization", "assertion", "private_key"}
)


def _drop_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
    return event


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Install the handler and formats on the root logger; call once at process start."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    renderer: Any
    if settings.log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        # Below LOG_LEVEL a line is dropped first, before any processor (a debug line on the hot path
        # would otherwise be stamped and merged, then thrown away by the standard library).
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Third-party chatter that would otherwise drown the run lines.
    for noisy in ("urllib3", "aiohttp.access", "mail.log", "amqp", "kombu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind_run(run_id: str) -> None:
    """Tag every following line of this context with the run id and its Order id."""
    order_id = run_id.split(":", 1)[0]
    structlog.contextvars.bind_contextvars(run_id=run_id, order_id=order_id)


def unbind_run() -> None:
    structlog.contextvars.unbind_contextvars("run_id", "order_id")
