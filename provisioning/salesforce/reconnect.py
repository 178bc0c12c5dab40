"""How long an event source waits before it subscribes again: one policy for both transports.

The Pub/Sub API and the Streaming API lose a subscription for the same few reasons, whatever
the wire says; each transport sorts what its server said into a :class:`Failure` (its own
table of codes and messages) and asks :class:`Reconnects` how long to wait:

- ``STALL``, ``REHANDSHAKE``, ``AUTH``: routine (a silent stream torn down, CometD's
  ``403::Unknown client``, an expired token renewed): at once the first time in a row, then
  the backoff, so a server that keeps answering so is not hammered;
- ``INVALID_REPLAY``: the fallback start is chosen instead: at once;
- ``NETWORK``: the backoff from the first (connection lost, stream reset, 5xx, server ended it);
- ``DELIVERY_LIMIT``: the org's daily event delivery allocation is used up: a long fixed wait,
  since events stay retained 72 h and trying sooner only spends what is left;
- ``REFUSED``: refused for a reason only a person can fix (the event not deployed, no read
  permission on it, a key the connected app does not know): the source gives up, and its
  caller (the listener) waits the slow backoff below before trying again.

The backoff is :func:`provisioning.core.backoff.backoff_s` (exponential, capped, full jitter),
counted over the failures in a row: a subscription that works resets the count. A refusal
waits at least half its ceiling ("equal jitter": half the ceiling plus a full-jitter draw over
the other half): full jitter would try again at once now and then, and nothing is gained by
asking an org sooner about a permission nobody granted yet; half a ceiling of spread still
keeps replicas apart. So at the default cap a refusal costs one or two calls a minute.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from provisioning.core.backoff import backoff_s


class Failure(enum.Enum):
    """Why a subscription was lost, in one set of names for both transports."""

    AUTH = "auth"
    INVALID_REPLAY = "invalid_replay"
    STALL = "stall"
    REHANDSHAKE = "rehandshake"
    DELIVERY_LIMIT = "delivery_limit"
    NETWORK = "network"
    REFUSED = "refused"


# Routine kinds: the first one in a row is retried at once.
ROUTINE = frozenset({Failure.AUTH, Failure.STALL, Failure.REHANDSHAKE})

# Network trouble: the first wait is at most half a second, doubling up to a minute.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
# The daily delivery allocation: 15 minutes between tries (events are retained 72 h).
DELIVERY_LIMIT_WAIT_S = 900.0
# Refusals: 0.5 to 1 s the first time, the range doubling up to SF_REFUSED_RETRY_MAX_S (a minute by
# default): between half the ceiling and the ceiling.
REFUSED_BASE_S = 1.0
REFUSED_CAP_S = 60.0


@dataclass(frozen=True)
class ReconnectPolicy:
    """The waits, in seconds: tests shorten them, production keeps the defaults."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    delivery_limit_wait_s: float = DELIVERY_LIMIT_WAIT_S
    refused_base_s: float = REFUSED_BASE_S
    refused_cap_s: float = REFUSED_CAP_S

    def __post_init__(self) -> None:
        for name in ("base_s", "cap_s", "refused_base_s", "refused_cap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0 (got {getattr(self, name)!r})")
        if self.delivery_limit_wait_s < 0:
            raise ValueError(f"delivery_limit_wait_s must be 0 or more (got {self.delivery_limit_wait_s!r})")


class Reconnects:
    """Failures in a row and the wait each one earns (one per subscription loop; not thread-safe)."""

    def __init__(self, policy: ReconnectPolicy | None = None, *, rng: random.Random | None = None) -> None:
        self.policy = policy or ReconnectPolicy()
        self.failures = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        """A subscription works again: the next failure is the first in a row."""
        self.failures = 0

    def wait_s(self, kind: Failure) -> float:
        """Count one failure of ``kind``; the seconds to wait before trying again."""
        self.failures += 1
        if kind is Failure.DELIVERY_LIMIT:
            return self.policy.delivery_limit_wait_s
        if kind is Failure.INVALID_REPLAY:
            return 0.0
        if kind is Failure.REFUSED:
            base_s, cap_s = self.policy.refused_base_s, self.policy.refused_cap_s
            ceiling_s = min(cap_s, base_s * 2.0 ** min(self.failures - 1, 64))
            return ceiling_s / 2 + self._backoff(base_s / 2, cap_s / 2)
        if kind in ROUTINE and self.failures == 1:
            return 0.0
        return self.backoff_s()

    def backoff_s(self) -> float:
        """The network backoff for the failures so far (also after a login that failed on the way)."""
        return self._backoff(self.policy.base_s, self.policy.cap_s)

    def _backoff(self, base_s: float, cap_s: float) -> float:
        return backoff_s(max(self.failures - 1, 0), base_s=base_s, cap_s=cap_s, rng=self._rng)
