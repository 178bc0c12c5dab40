"""The shared backoff: capped exponential ceiling, full jitter, usable as tenacity's wait."""

from __future__ import annotations

import random

import pytest
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from provisioning.core.backoff import backoff_s, tenacity_wait

pytestmark = pytest.mark.fast


class _Highest(random.Random):
    """Always draws the top of the range, so the ceiling itself shows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_ceiling_doubles_from_the_base_and_stops_at_the_cap() -> None:
    ceilings = [backoff_s(n, base_s=0.5, cap_s=5.0, rng=_Highest()) for n in range(7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_delays_are_spread_over_the_whole_range_below_the_ceiling() -> None:
    rng = random.Random(3)
    delays = [backoff_s(3, base_s=1.0, cap_s=60.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter: some waits are short, some near the ceiling (equal jitter would never go below 4).
    assert min(delays) < 0.5
    assert max(delays) > 7.5


def test_a_huge_attempt_number_stays_at_the_cap_without_overflowing() -> None:
    assert backoff_s(5000, base_s=1.0, cap_s=30.0, rng=_Highest()) == 30.0


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "message"),
    [(-1, 1.0, 2.0, "attempt must be >= 0"), (0, 0.0, 2.0, "base_s > 0"), (0, 1.0, -1.0, "cap_s > 0")],
)
def test_nonsense_arguments_are_refused_with_what_was_given(
    attempt: int, base_s: float, cap_s: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        backoff_s(attempt, base_s=base_s, cap_s=cap_s)


def test_as_tenacity_wait_the_first_retry_waits_at_most_the_base() -> None:
    waits: list[float] = []
    retrying = Retrying(
        stop=stop_after_attempt(4),
        retry=retry_if_exception_type(OSError),
        wait=tenacity_wait(base_s=0.001, cap_s=0.003, rng=_Highest()),
        sleep=waits.append,
        reraise=True,
    )
    with pytest.raises(OSError, match="down"):
        retrying(_always_down)
    assert waits == [0.001, 0.002, 0.003]


def _always_down() -> None:
    raise OSError("down")
