"""The console's Redis stores, built from the settings: its sessions and its login throttle.

The keys are the ledger's (:mod:`provisioning.ledger.console_sessions`,
:mod:`provisioning.ledger.login_throttle`); the console and its commands
(``revoke-sessions``, ``unlock``) build them here, from the same settings, so they
always agree. Imports neither Flask nor the rest of the console extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from provisioning.core.settings import Settings
from provisioning.ledger.console_sessions import ConsoleSessions
from provisioning.ledger.login_throttle import LoginThrottle, ThrottlePolicy


def console_sessions(
    settings: Settings, client: redis.Redis, clock: Callable[[], float] = time.time
) -> ConsoleSessions:
    return ConsoleSessions(
        redis=client, prefix=settings.ledger_prefix, ttl_s=settings.console_session_ttl_s, clock=clock
    )


def login_throttle(
    settings: Settings, client: redis.Redis, clock: Callable[[], float] = time.time
) -> LoginThrottle:
    policy = ThrottlePolicy(
        free_failures=settings.console_login_free_failures,
        delay_s=settings.console_login_delay_s,
        max_failures=settings.console_login_max_failures,
        max_failures_per_address=settings.console_login_max_failures_per_address,
        lock_s=settings.console_login_lock_s,
    )
    return LoginThrottle(redis=client, prefix=settings.ledger_prefix, policy=policy, clock=clock)
