"""The one reconnect policy of both transports: how long each kind of failure waits."""

from __future__ import annotations

import random

import pytest

from provisioning.salesforce.reconnect import Failure, ReconnectPolicy, Reconnects

POLICY = ReconnectPolicy(
    base_s=0.5, cap_s=60.0, delivery_limit_wait_s=900.0, refused_base_s=1.0, refused_cap_s=60.0
)


@pytest.fixture
def reconnects() -> Reconnects:
    return Reconnects(POLICY, rng=random.Random(7))


@pytest.mark.parametrize("kind", [Failure.AUTH, Failure.STALL, Failure.REHANDSHAKE])
def test_a_routine_failure_is_retried_at_once_the_first_time_then_backs_off(
    reconnects: Reconnects, kind: Failure
) -> None:
    assert reconnects.wait_s(kind) == 0.0
    waits = [reconnects.wait_s(kind) for _ in range(3)]
    assert all(0.0 <= w <= 0.5 * 2**n for n, w in enumerate(waits, start=1))
    assert any(w > 0 for w in waits)


def test_network_trouble_backs_off_from_the_first_and_never_past_the_cap(reconnects: Reconnects) -> None:
    waits = [reconnects.wait_s(Failure.NETWORK) for _ in range(40)]
    assert 0.0 <= waits[0] <= 0.5
    assert max(waits) <= 60.0
    assert max(waits[-10:]) > 30.0  # the ceiling reached the cap (full jitter below it)


def test_the_delivery_limit_waits_its_fixed_time_and_an_invalid_replay_none(reconnects: Reconnects) -> None:
    assert reconnects.wait_s(Failure.DELIVERY_LIMIT) == 900.0
    assert reconnects.wait_s(Failure.INVALID_REPLAY) == 0.0


def test_a_refusal_waits_between_half_its_ceiling_and_the_ceiling_which_doubles_to_its_cap(
    reconnects: Reconnects,
) -> None:
    waits = [reconnects.wait_s(Failure.REFUSED) for _ in range(30)]
    ceilings = [min(60.0, 1.0 * 2**n) for n in range(30)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    # At the cap, one try every 30 to 60 s: one or two a minute.
    assert min(waits[7:]) >= 30.0


def test_a_subscription_that_works_makes_the_next_failure_the_first_again(reconnects: Reconnects) -> None:
    for _ in range(10):
        reconnects.wait_s(Failure.STALL)
    reconnects.reset()
    assert reconnects.failures == 0
    assert reconnects.wait_s(Failure.STALL) == 0.0


@pytest.mark.parametrize("field", ["base_s", "cap_s", "refused_base_s", "refused_cap_s"])
def test_a_wait_of_zero_or_less_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ReconnectPolicy(**{field: 0.0})
