"""What the whole console shares, kept on the Flask app: settings, services, stores, the publisher.

One typed object in ``app.extensions`` instead of closures over ``create_app``'s
locals: a view is a plain module-level function that asks :func:`console` for
what it needs, and a test can build the app twice side by side.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from celery import Celery
from flask import current_app
from itsdangerous import URLSafeTimedSerializer

from provisioning.core.settings import Settings
from provisioning.ledger.console_sessions import ConsoleSessions
from provisioning.ledger.login_throttle import LoginThrottle
from provisioning.runs.services import Services

EXTENSION = "provisioning_console"


@dataclass
class ConsoleState:
    settings: Settings
    services: Services
    sessions: ConsoleSessions
    throttle: LoginThrottle
    # Signs a dry run's confirmation (what it found actionable, for whom).
    confirmations: URLSafeTimedSerializer
    # Builds the Celery app that sends requeued runs, on first use.
    make_publisher: Callable[[], Celery]
    clock: Callable[[], float]
    _publisher: Celery | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def publisher(self) -> Celery:
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    self._publisher = self.make_publisher()
        return self._publisher


def console() -> ConsoleState:
    """The state of the console serving this request."""
    return cast(ConsoleState, current_app.extensions[EXTENSION])
