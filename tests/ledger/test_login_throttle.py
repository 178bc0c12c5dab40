"""Console login throttling on the real Redis: a growing wait per user, locks per user and per address."""

from __future__ import annotations

import pytest

from provisioning.ledger.login_throttle import Hold, LoginThrottle, Scope, ThrottlePolicy

pytestmark = pytest.mark.fast

POLICY = ThrottlePolicy(
    free_failures=3, delay_s=1.0, max_failures=10, max_failures_per_address=30, lock_s=900
)
HOME = "192.0.2.10"


@pytest.fixture
def throttle(redis_client, namespace, clock) -> LoginThrottle:
    return LoginThrottle(redis=redis_client, prefix=namespace, policy=POLICY, clock=clock)


def fail(throttle: LoginThrottle, user: str = "olivia", address: str = HOME):
    """One wrong password: the attempt is counted (and nothing takes it back)."""
    attempt = throttle.attempt(user, address)
    assert attempt.held is None, attempt.held
    return attempt


def lock_user(throttle: LoginThrottle, clock, user: str = "olivia", address: str = HOME) -> list[Scope]:
    """Wrong passwords for ``user``, each as soon as it may be tried, until the user is locked; the
    locks reported on the way."""
    reports: list[Scope] = []
    while True:
        attempt = fail(throttle, user, address)
        reports += attempt.locks
        hold = attempt.if_failed
        if hold is not None and hold.locked:
            return reports
        if hold is not None:
            clock.advance(hold.until - clock.now)


def test_the_free_failures_are_answered_at_once_then_each_try_waits_twice_as_long(throttle, clock):
    for _ in range(3):
        assert fail(throttle).if_failed is None
    waits = []
    for _ in range(6):
        hold = fail(throttle).if_failed
        assert hold is not None
        assert (hold.scope, hold.locked) == (Scope.USER, False)
        waits.append(hold.until - clock.now)
        held = throttle.attempt("olivia", HOME).held  # too early
        assert held == hold
        clock.advance(hold.until - clock.now)
    assert waits == [1, 2, 4, 8, 16, 32]


def test_the_failure_that_reaches_the_limit_locks_the_user_and_reports_it_once(throttle, clock):
    assert lock_user(throttle, clock) == [Scope.USER]
    again = throttle.attempt("olivia", HOME)
    assert again.held == Hold(Scope.USER, clock.now + 900, locked=True)
    assert again.locks == ()  # reported by the failure that reached it, not by the refused tries
    # Another address changes nothing: the user is locked.
    assert throttle.attempt("olivia", "198.51.100.7").held == again.held


def test_a_held_attempt_is_not_counted(throttle, clock):
    for _ in range(4):
        fail(throttle)
    for _ in range(20):
        assert throttle.attempt("olivia", HOME).held is not None
    clock.advance(1)
    # Still the fifth failure (wait 2 s), not the twenty-fifth.
    assert fail(throttle).if_failed.until == clock.now + 2


def test_attempts_side_by_side_cannot_slip_past_a_hold(throttle):
    for _ in range(3):
        fail(throttle)
    first = throttle.attempt("olivia", HOME)  # its password is being checked...
    assert first.held is None
    second = throttle.attempt("olivia", HOME)  # ...when another attempt comes in
    assert second.held == first.if_failed


def test_the_lock_ends_after_lock_s_and_the_counter_starts_again_from_zero(throttle, clock):
    lock_user(throttle, clock)
    clock.advance(899)
    assert throttle.attempt("olivia", HOME).held is not None
    clock.advance(1)
    for _ in range(3):
        assert fail(throttle).if_failed is None


def test_an_address_is_locked_after_its_failures_whatever_the_users(throttle):
    reports = []
    for n in range(30):
        attempt = fail(throttle, user=f"user{n}")
        reports += attempt.locks
    assert reports == [Scope.ADDRESS]
    held = throttle.attempt("victor", HOME).held
    assert held is not None
    assert (held.scope, held.locked) == (Scope.ADDRESS, True)
    assert throttle.attempt("victor", "198.51.100.7").held is None


def test_a_right_password_resets_the_user_but_not_the_addresses_other_failures(throttle):
    for n in range(3):
        fail(throttle, user=f"user{n}")
    for _ in range(3):
        fail(throttle)
    assert throttle.attempt("olivia", HOME).held is None  # the fourth attempt...
    throttle.succeeded("olivia", HOME)  # ...had the right password
    for _ in range(3):
        assert fail(throttle).if_failed is None  # the user starts again from 0
    # The address: 3 + 3 + 3 failures (the right password taken back), 21 more lock it.
    locks = [s for n in range(21) for s in fail(throttle, user=f"other{n}").locks]
    assert locks == [Scope.ADDRESS]


def test_unlock_forgets_a_user_or_an_address(throttle, clock):
    lock_user(throttle, clock)
    for n in range(20):
        fail(throttle, user=f"user{n}")
    assert throttle.attempt("olivia", "198.51.100.7").held is not None
    assert throttle.unlock(user="olivia") == 1
    assert throttle.attempt("olivia", "198.51.100.7").held is None
    assert throttle.attempt("victor", HOME).held is not None
    assert throttle.unlock(address=HOME) == 1
    assert throttle.attempt("victor", HOME).held is None
    assert throttle.unlock(user="nobody") == 0


def test_every_counter_expires_on_the_server_within_the_lock(throttle, redis_client, namespace):
    fail(throttle)
    keys = list(redis_client.scan_iter(f"{namespace}:*"))
    assert len(keys) == 2  # the user's and the address's
    assert all(0 < redis_client.pttl(key) <= 900_000 for key in keys)


def test_a_very_long_user_name_is_counted_under_its_first_characters(throttle, redis_client, namespace):
    fail(throttle, user="x" * 1_000_000)
    assert max(len(k) for k in redis_client.scan_iter(f"{namespace}:*")) < 300
