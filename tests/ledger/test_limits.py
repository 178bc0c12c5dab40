"""The external systems' rate limits and circuit breakers on the real Redis (the fast tier)."""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest
import redis

from provisioning.core.rate import Rate
from provisioning.ledger import Ledger
from provisioning.ledger.keys import Keys
from provisioning.ledger.limits import LEAD_RISE, BreakerPolicy, BreakerState, Outcome
from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

POLICY = BreakerPolicy(failures=3, cooldown_s=0.5, cooldown_max_s=2.0)


@pytest.fixture
def ledger(settings):
    services = Services(settings)
    yield services.ledger
    services.redis.close()


def test_a_rate_limit_admits_its_calls_per_window_and_says_when_the_next_is_free(ledger: Ledger) -> None:
    rate = Rate(4, 1.0)
    assert ledger.limits.admit("smdp", rate=rate, calls=2).ok
    assert ledger.limits.admit("smdp", rate=rate, calls=2).ok
    refused = ledger.limits.admit("smdp", rate=rate, calls=2)
    assert (refused.ok, refused.cause) == (False, "rate_limited")
    assert 0 < refused.wait_s <= 1.0
    # Nothing was taken by the refusal: once the first calls leave the window, two are free again.
    time.sleep(refused.wait_s + 0.01)
    assert ledger.limits.admit("smdp", rate=rate, calls=2).ok


def test_a_step_s_second_call_is_reserved_for_when_second_calls_go_out_not_for_its_admission(
    settings, ledger: Ledger
) -> None:
    rate = Rate(2, 1.0)
    keys = Keys(settings.ledger_prefix)
    client = redis.Redis.from_url(str(settings.redis_url))
    first = ledger.limits.admit("smdp", rate=rate, calls=2)
    assert first.ok
    ledger.limits.call_made("smdp", first, 1, rate=rate)
    time.sleep(0.5)
    ledger.limits.call_made("smdp", first, 2, rate=rate)
    # Each call is scored when it went out, and the second's lead after the admission is learned.
    calls = dict(client.zrange(keys.limit("smdp", "calls"), 0, -1, withscores=True))
    lead = calls[f"{first.id}:2".encode()] - first.at_ms
    assert lead >= 500
    assert float(client.hget(keys.limit("smdp", "leads"), "2")) == lead
    # Asked while both calls are in the window: free when the first call leaves it, since the new
    # step's second call goes out a lead later, after the first step's second call has left. (Both
    # of its calls counted from its admission, it would wait for that one too: half a window more.)
    seconds, micros = client.time()
    asked_ms = seconds * 1000 + micros // 1000
    refused = ledger.limits.admit("smdp", rate=rate, calls=2)
    assert refused.cause == "rate_limited"
    assert 0 < refused.wait_s * 1000 <= calls[f"{first.id}:1".encode()] + 1000 - asked_ms + 1
    time.sleep(refused.wait_s + 0.01)
    second = ledger.limits.admit("smdp", rate=rate, calls=2)
    assert second.ok
    # Its calls are reserved at its admission and a lead later; no window holds more than the limit.
    calls = dict(client.zrange(keys.limit("smdp", "calls"), 0, -1, withscores=True))
    assert calls[f"{second.id}:1".encode()] == second.at_ms
    assert calls[f"{second.id}:2".encode()] == second.at_ms + math.floor(lead)
    times = sorted(calls.values())
    assert all(sum(1 for t in times if end - 1000 < t <= end) <= 2 for end in times)
    client.close()


def test_a_shorter_lead_is_learned_at_once_and_a_longer_one_slowly(settings, ledger: Ledger) -> None:
    rate = Rate(100, 1.0)
    keys = Keys(settings.ledger_prefix)
    client = redis.Redis.from_url(str(settings.redis_url))

    def step(gap_s: float) -> float:
        admission = ledger.limits.admit("whmcs", rate=rate, calls=2)
        ledger.limits.call_made("whmcs", admission, 1, rate=rate)
        time.sleep(gap_s)
        ledger.limits.call_made("whmcs", admission, 2, rate=rate)
        seen = client.zscore(keys.limit("whmcs", "calls"), f"{admission.id}:2") - admission.at_ms
        return float(seen)

    long_seen = step(0.3)
    short_seen = step(0.05)
    assert float(client.hget(keys.limit("whmcs", "leads"), "2")) == short_seen
    third_seen = step(0.3)
    learned = float(client.hget(keys.limit("whmcs", "leads"), "2"))
    assert learned == pytest.approx(short_seen + (third_seen - short_seen) * LEAD_RISE, abs=0.1)
    assert short_seen < learned < long_seen
    client.close()


def test_steps_turned_away_are_given_slots_in_turn_at_the_limit_s_pace(settings, ledger: Ledger) -> None:
    rate = Rate(10, 1.0)  # one call every 100 ms
    for _ in range(10):
        assert ledger.limits.admit("whmcs", rate=rate, calls=1).ok
    for i in range(4):
        refused = ledger.limits.admit("whmcs", rate=rate, calls=1, holder=f"run{i}:step")
        assert (refused.ok, refused.cause) == (False, "rate_limited")
    ledger.limits.admit("whmcs", rate=rate, calls=2, holder="run9:step")
    # The slots as the script gave them out (Redis's clock, ms), not as the asks' timing shows them.
    keys = Keys(settings.ledger_prefix)
    client = redis.Redis.from_url(str(settings.redis_url))
    oldest_call = min(
        score for _, score in client.zrange(keys.limit("whmcs", "calls"), 0, -1, withscores=True)
    )
    slots = dict(client.zrange(keys.limit("whmcs", "slots"), 0, -1, withscores=True))
    ones = [slots[f"run{i}:step".encode()] for i in range(4)]
    # The first when the window's oldest call leaves it, each next one a call (100 ms) later ...
    assert ones[0] == oldest_call + 1000
    assert [later - earlier for earlier, later in itertools.pairwise(ones)] == [100, 100, 100]
    # ... and a step of two calls after them takes two; the tail is the last slot given out.
    assert slots[b"run9:step"] == ones[-1] + 200 == slots[b""]
    client.close()


def test_a_step_back_before_its_slot_keeps_it_and_a_newcomer_queues_behind_it(ledger: Ledger) -> None:
    rate = Rate(2, 0.5)
    assert ledger.limits.admit("smdp", rate=rate, calls=2).ok
    first = ledger.limits.admit("smdp", rate=rate, calls=2, holder="a:activate_esim")
    second = ledger.limits.admit("smdp", rate=rate, calls=2, holder="b:activate_esim")
    assert 0 < first.wait_s < second.wait_s
    # Back early (a countdown cut short): the same slot, not one behind the others.
    again = ledger.limits.admit("smdp", rate=rate, calls=2, holder="a:activate_esim")
    assert again.cause == "rate_limited"
    assert again.wait_s <= first.wait_s < second.wait_s
    # The window has room before b's slot, but b is queued: a newcomer does not go before it.
    time.sleep(first.wait_s + 0.01)
    newcomer = ledger.limits.admit("smdp", rate=rate, calls=2, holder="c:activate_esim")
    assert newcomer.cause == "rate_limited"
    assert newcomer.wait_s > second.wait_s - first.wait_s
    # At its slot, a gets its calls; a second ask afterwards is a new one (its slot is spent).
    assert ledger.limits.admit("smdp", rate=rate, calls=2, holder="a:activate_esim").ok


def test_a_slot_nobody_comes_back_for_is_forgotten_and_the_window_alone_answers(ledger: Ledger) -> None:
    rate = Rate(1, 0.2)
    assert ledger.limits.admit("smtp", rate=rate, calls=1).ok
    gone = ledger.limits.admit("smtp", rate=rate, calls=1, holder="dead:send_email")
    assert gone.cause == "rate_limited"
    time.sleep(gone.wait_s + 0.25)
    # The queue's tail has passed: a newcomer is admitted at once, without waiting for the dead step.
    assert ledger.limits.admit("smtp", rate=rate, calls=1, holder="alive:send_email").ok


def test_forty_threads_asking_at_once_get_the_limit_per_window_and_never_more(ledger: Ledger) -> None:
    rate = Rate(10, 0.5)
    granted: list[int] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop = started + 1.6

    def ask() -> None:
        while time.monotonic() < stop:
            if ledger.limits.admit("whmcs", rate=rate, calls=1).ok:
                with lock:
                    granted.append(1)

    threads = [threading.Thread(target=ask) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    # The window slides on Redis's clock: whatever the threads' timing, in ``elapsed`` seconds at most
    # one full window's worth per window that fits (rounded up), and the limit was used.
    assert len(granted) <= rate.calls * math.ceil(elapsed / rate.window_s)
    assert len(granted) >= rate.calls * math.floor(1.6 / rate.window_s)


def test_no_rate_limit_admits_everything_and_a_clean_breaker_needs_no_write(ledger: Ledger) -> None:
    admission = ledger.limits.admit("smtp", rate=None, calls=1)
    assert (admission.ok, admission.clean, admission.probe_id) == (True, True, None)


def test_a_run_of_failures_opens_the_circuit_and_one_probe_closes_it(ledger: Ledger) -> None:
    limits = ledger.limits
    for n in range(POLICY.failures - 1):
        assert limits.record("whmcs", Outcome.FAILED, POLICY) is BreakerState.CLOSED, n
    assert not limits.admit("whmcs", rate=None, calls=1).clean  # failures are counted
    assert limits.record("whmcs", Outcome.FAILED, POLICY) is BreakerState.OPEN
    refused = limits.admit("whmcs", rate=None, calls=1)
    assert (refused.ok, refused.cause) == (False, "breaker_open")
    assert 0 < refused.wait_s <= POLICY.cooldown_s
    (view,) = limits.breakers(["whmcs"])
    assert view.state is BreakerState.OPEN
    time.sleep(refused.wait_s + 0.01)
    probe = limits.admit("whmcs", rate=None, calls=1)
    assert probe.ok
    assert probe.probe_id is not None
    # Only one probe at a time.
    other = limits.admit("whmcs", rate=None, calls=1)
    assert (other.ok, other.cause) == (False, "breaker_open")
    assert limits.record("whmcs", Outcome.OK, POLICY) is BreakerState.CLOSED
    assert limits.admit("whmcs", rate=None, calls=1).clean


def test_a_failed_probe_opens_the_circuit_again_for_twice_as_long(ledger: Ledger) -> None:
    limits = ledger.limits
    for _ in range(POLICY.failures):
        limits.record("smdp", Outcome.FAILED, POLICY)
    time.sleep(POLICY.cooldown_s + 0.01)
    assert limits.admit("smdp", rate=None, calls=1).probe_id is not None
    assert limits.record("smdp", Outcome.FAILED, POLICY) is BreakerState.OPEN
    refused = limits.admit("smdp", rate=None, calls=1)
    assert POLICY.cooldown_s < refused.wait_s <= 2 * POLICY.cooldown_s


def test_failures_reported_while_open_do_not_lengthen_the_cool_down(ledger: Ledger) -> None:
    limits = ledger.limits
    for _ in range(POLICY.failures + 30):  # forty threads failing at once after the circuit opened
        limits.record("whmcs", Outcome.FAILED, POLICY)
    assert limits.admit("whmcs", rate=None, calls=1).wait_s <= POLICY.cooldown_s


def test_a_throttle_or_a_retry_after_opens_the_circuit_at_once_for_what_the_system_asked(
    ledger: Ledger,
) -> None:
    limits = ledger.limits
    assert limits.record("salesforce", Outcome.THROTTLED, POLICY) is BreakerState.OPEN
    assert limits.record("smtp", Outcome.FAILED, POLICY, retry_after_s=1.5) is BreakerState.OPEN
    assert 1.0 < limits.admit("smtp", rate=None, calls=1).wait_s <= 1.5
    # Capped at the longest cool-down.
    assert limits.record("smdp", Outcome.FAILED, POLICY, retry_after_s=3600) is BreakerState.OPEN
    assert limits.admit("smdp", rate=None, calls=1).wait_s <= POLICY.cooldown_max_s


def test_a_probe_that_did_not_call_lets_the_next_step_probe_at_once(ledger: Ledger) -> None:
    limits = ledger.limits
    for _ in range(POLICY.failures):
        limits.record("whmcs", Outcome.FAILED, POLICY)
    time.sleep(POLICY.cooldown_s + 0.01)
    probe = limits.admit("whmcs", rate=None, calls=1)
    assert probe.probe_id is not None
    limits.release_probe("whmcs", probe)
    assert limits.admit("whmcs", rate=None, calls=1).probe_id is not None


def test_the_salesforce_api_usage_is_kept_as_the_last_answer_said_it(ledger: Ledger) -> None:
    assert ledger.limits.api_usage() is None
    ledger.limits.record_api_usage(4200, 15000)
    usage = ledger.limits.api_usage()
    assert usage is not None
    assert (usage.used, usage.limit, round(usage.share, 2)) == (4200, 15000, 0.28)
