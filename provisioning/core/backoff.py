"""The one backoff formula: exponential, capped, with full jitter.

Every wait between two tries uses :func:`backoff_s`: task retries, the listener
waiting out an outage, the streaming client reconnecting, a client's one
connection retry. Full jitter (a uniform draw between 0 and the capped
exponential) spreads the clients that failed together, so they do not come back
together (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from provisioning.core.errors import TransientError

# 2**64 times any base is far past every cap; a bigger exponent would only risk an overflow.
MAX_EXPONENT = 64


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt + 1`` (``attempt`` >= 0 tries have failed since the first).

    ``uniform(0, min(cap_s, base_s * 2**attempt))``: the ceiling doubles from
    ``base_s`` and stops at ``cap_s``. ``rng`` makes it reproducible in tests.
    """
    if base_s <= 0 or cap_s <= 0:
        raise ValueError(f"backoff needs base_s > 0 and cap_s > 0 (got base_s={base_s}, cap_s={cap_s})")
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    ceiling = min(cap_s, base_s * 2 ** min(attempt, MAX_EXPONENT))
    return (rng or random).uniform(0, ceiling)


def tenacity_wait(
    *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> Callable[[RetryCallState], float]:
    """:func:`backoff_s` as a tenacity ``wait=``: after the first failed try, attempt 0."""

    def wait(state: RetryCallState) -> float:
        return backoff_s(state.attempt_number - 1, base_s=base_s, cap_s=cap_s, rng=rng)

    return wait


def retrying_transient(*, attempts: int, base_s: float, cap_s: float) -> Retrying:
    """A few quick tries of a call where no task retry can take over: transient errors only, the last
    one raised."""
    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=tenacity_wait(base_s=base_s, cap_s=cap_s),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )
