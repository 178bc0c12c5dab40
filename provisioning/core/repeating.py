"""A failure that repeats is logged once, then summarized: not one line per try.

A call refused for a reason only a person can fix (an event the org does not have, a
missing permission, a key the connected app does not know) is tried again and again until
someone fixes it. A line per try buries the one line that says what to do, and costs the
log pipeline for nothing. So, per place that retries:

- the first failure: one ERROR line with the error and its remedy (what to fix), or a
  WARNING for a failure that may well cure itself (``level="warning"``);
- while the same failure goes on: at most one WARNING line per ``interval_s``, saying how
  many tries failed since the last line and since when (``<event>_repeated``);
- a different failure (another ``key``): a first failure again, at ERROR;
- the recovery: one INFO line with the count and how long it lasted (``<event>_recovered``).

Thread-safe: a retry loop may report failures while another thread notices the recovery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

SUMMARY_SUFFIX = "_repeated"
RECOVERED_SUFFIX = "_recovered"


class RepeatingFailure:
    """The log lines of one retrying place: ``event`` names them (``event``, ``..._repeated``, ...)."""

    def __init__(
        self,
        logger: structlog.stdlib.BoundLogger,
        event: str,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be above 0 (got {interval_s!r})")
        self._log = logger
        self.event = event
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._key: str | None = None
        self._since = 0.0
        self._failures = 0
        self._unreported = 0
        self._reported_at = 0.0

    @property
    def failing(self) -> bool:
        """A failure was reported and no recovery since."""
        return self._key is not None

    @property
    def failures(self) -> int:
        """Failures in a row of the current kind (0 when not failing)."""
        return self._failures

    def failed(self, key: str, *, level: str = "error", **fields: Any) -> None:
        """One more failure; ``key`` names its kind (another key is a new first failure).

        ``level`` is the first line's (``error`` or ``warning``). ``fields`` go on the line logged,
        if one is (e.g. ``error=``, ``remedy=``, ``retry_in_s=``): never secrets.
        """
        if level not in ("error", "warning"):
            raise ValueError(f"level is error or warning (got {level!r})")
        with self._lock:
            now = self._clock()
            if key != self._key:
                self._key, self._since, self._failures, self._unreported = key, now, 1, 0
                self._reported_at = now
                first = self._log.error if level == "error" else self._log.warning
                first(self.event, failures=1, **fields)
                return
            self._failures += 1
            self._unreported += 1
            if now - self._reported_at < self.interval_s:
                return
            self._log.warning(
                self.event + SUMMARY_SUFFIX,
                failures=self._failures,
                since_last_line=self._unreported,
                failing_for_s=round(now - self._since, 1),
                **fields,
            )
            self._unreported = 0
            self._reported_at = now

    def recovered(self, **fields: Any) -> bool:
        """The call works again: one INFO line if it was failing; True then."""
        with self._lock:
            if self._key is None:
                return False
            self._log.info(
                self.event + RECOVERED_SUFFIX,
                failures=self._failures,
                failed_for_s=round(self._clock() - self._since, 1),
                **fields,
            )
            self._key, self._failures, self._unreported = None, 0, 0
            return True
