"""When the event source gives up: how long the listener waits, what it logs, what /healthz says.

A source raises only what retrying soon cannot fix (its own recovery handles the rest): a
subscription to an event the org does not have (NOT_FOUND), a missing read permission on it
(PERMISSION_DENIED), a login with a key the connected app does not know, or a bug. Each is
fixed by a person, in Salesforce or in the settings, while the listener runs. So it tries
again, but slowly: waits growing from about a second to ``SF_REFUSED_RETRY_MAX_S`` (a minute
by default; :mod:`provisioning.salesforce.reconnect`'s ``REFUSED`` kind), logged once at
ERROR with the remedy and then one summary line per interval
(:class:`~provisioning.core.repeating.RepeatingFailure`), the reason on /healthz until the
source is subscribed again, and one line when it is. Before, it was a try, an ERROR line and a
Subscribe or a login against the customer's org every second.
"""

from __future__ import annotations

import random

from provisioning.core.logs import get_logger
from provisioning.core.repeating import RepeatingFailure
from provisioning.core.settings import Settings
from provisioning.salesforce.reconnect import Failure, ReconnectPolicy, Reconnects

log = get_logger(__name__)

EVENT = "listener_source_failed"


class SourceRefusals:
    """The listener's side of a source that gave up: the waits, the log lines, the reason."""

    def __init__(self, settings: Settings, *, rng: random.Random | None = None) -> None:
        cap_s = settings.sf_refused_retry_max_s
        self._waits = Reconnects(ReconnectPolicy(refused_cap_s=cap_s), rng=rng)
        self._lines = RepeatingFailure(log, EVENT, interval_s=cap_s)
        self.channel = settings.sf_provision_event_channel
        # What /healthz says while the source is down because of it (None: not down for that).
        self.reason: str | None = None

    @property
    def failing(self) -> bool:
        return self._lines.failing

    def failed(self, exc: BaseException) -> float:
        """The source raised ``exc``: log it (once, then summarized); the seconds to wait before trying again."""
        if not self._lines.failing:
            self._waits.reset()
        wait_s = self._waits.wait_s(Failure.REFUSED)
        remedy = getattr(exc, "remedy", None)
        error = f"{type(exc).__name__}: {exc}"
        self.reason = f"the event source gave up: {error}" + (f" Remedy: {remedy}." if remedy else "")
        self._lines.failed(
            f"{type(exc).__name__}:{getattr(exc, 'error_code', None)}",
            channel=self.channel,
            error=error,
            remedy=remedy,
            retry_in_s=round(wait_s, 1),
        )
        return wait_s

    def recovered(self) -> None:
        """The source is subscribed again: one line if it had failed, and /healthz forgets the reason."""
        if self._lines.recovered(channel=self.channel):
            self.reason = None
