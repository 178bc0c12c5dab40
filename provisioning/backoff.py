"""The one backoff rule: exponential, capped, with full jitter (AWS's "full jitter").

Every wait before trying again uses it (task retries, the listener's outages,
the streaming clients' reconnects), so one number means the same everywhere.
"""

from __future__ import annotations

import random

_rng = random.Random()


def compute_backoff(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0): uniform in [0, min(cap, base·2^attempt)]."""
    ceiling = min(cap_s, base_s * 2 ** max(attempt, 0))
    return (rng or _rng).uniform(0, ceiling)
