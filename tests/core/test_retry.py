"""The one retry policy: every cause's wait, bounded, and what each broker can take."""

from __future__ import annotations

import random

import pytest

from provisioning.core.retry import (
    KNOWN_WAIT_JITTER_S,
    RATE_SLOT_JITTER_S,
    Cause,
    RetryPolicy,
)
from provisioning.core.settings import Settings

pytestmark = pytest.mark.fast


def _policy(settings: Settings, broker: str, seed: int = 25) -> RetryPolicy:
    return RetryPolicy.from_settings(
        settings.model_copy(update={"celery_broker_url": broker}), rng=random.Random(seed)
    )


def test_a_rate_limited_step_comes_back_at_its_slot_and_barely_after(settings: Settings) -> None:
    policy = _policy(settings, "redis://127.0.0.1:6379/1")
    waits = [policy.wait_s(Cause.RATE_LIMITED, known_s=0.35) for _ in range(200)]
    assert all(0.35 <= w <= 0.35 + RATE_SLOT_JITTER_S for w in waits)
    assert len(set(waits)) > 1  # still jittered


def test_a_breaker_s_wait_is_spread_over_up_to_a_second_after_the_probe_may_go(settings: Settings) -> None:
    policy = _policy(settings, "redis://127.0.0.1:6379/1")
    waits = [policy.wait_s(Cause.BREAKER_OPEN, known_s=5.0) for _ in range(200)]
    assert all(5.0 <= w <= 5.0 + KNOWN_WAIT_JITTER_S for w in waits)
    assert max(waits) - min(waits) > KNOWN_WAIT_JITTER_S / 2


def test_on_rabbitmq_every_wait_is_whole_seconds_rounded_up_never_cut_short(settings: Settings) -> None:
    policy = _policy(settings, "amqp://guest:guest@127.0.0.1:5672//")
    slot = policy.wait_s(Cause.RATE_LIMITED, known_s=1.3)
    assert slot == 2.0  # the broker would have delivered it after int(1.3) = 1 s: before its slot
    assert policy.wait_s(Cause.RATE_LIMITED, known_s=0.001) == 1.0  # RabbitMQ's shortest countdown
    for cause in Cause:
        wait = policy.wait_s(cause, attempts=3, known_s=2.5)
        assert wait == int(wait) >= 1.0, (cause, wait)


def test_on_redis_a_wait_keeps_its_fraction_and_none_passes_the_cap(settings: Settings) -> None:
    policy = _policy(settings, "redis://127.0.0.1:6379/1")
    assert policy.wait_s(Cause.RATE_LIMITED, known_s=0.2) < 1.0
    for cause in Cause:
        assert policy.wait_s(cause, attempts=50, known_s=1e9) <= policy.max_wait_s
