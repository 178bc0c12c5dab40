"""Workers and the listener on hosts of their own (network namespaces), cut off and healed.

Redis (ledger and broker, AOF) listens on the data bridge, the simulators on the api bridge
(provisioning.sandbox.netns); every worker and the listener run on a host of their own, so
everything they say crosses their host's links. Created as root for the test, removed after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.sandbox.netns import Network
from provisioning.sandbox.redis_server import RedisServer
from provisioning.sandbox.runner import Sandbox

from .harness import Stack, stack_settings

SETTLE_TIMEOUT_S = 240.0
PROGRESS_TIMEOUT_S = 120.0


@pytest.fixture
def network() -> Iterator[Network]:
    with Network() as net:
        yield net


@pytest.fixture
def stack(network: Network, tmp_path: Path) -> Iterator[Stack]:
    redis_server = RedisServer(tmp_path / "redis", appendonly=True, host=network.data_ip).start()
    sandbox = Sandbox(
        tmp_path / "sandbox", seed=31, long_poll_s=5.0, pubsub_keepalive_s=5.0, host=network.api_ip
    ).start()
    settings = stack_settings(
        sandbox,
        redis_url=redis_server.url(0),
        celery_broker_url=redis_server.url(1),
        ledger_prefix="net",
        celery_queue="net",
        run_lease_ttl_s=5,
        reconcile_idle_s=8,
    )
    stack = Stack(sandbox, settings, tmp_path / "logs")
    try:
        yield stack
    finally:
        stack.stop()
        sandbox.stop()
        redis_server.stop()


# -- a partition in the middle of a step -----------------------------------------------------------

PARTITION_ORDERS = 12
# Each call that makes an effect takes this long, so the cut finds steps half done.
EFFECT_LATENCY_MS = 2000
# Longer than the lease (5 s) and the visibility timeout (10 s): another worker must take over.
CUT_S = 20.0
IN_STEP_TIMEOUT_S = 60.0


def _slow_effects(sandbox: Sandbox) -> None:
    sandbox.admin("whmcs").post(
        "/__admin/faults", {"latency_ms": EFFECT_LATENCY_MS, "operations": ["AddOrder"]}
    )
    sandbox.admin("smdp").post(
        "/__admin/faults", {"latency_ms": EFFECT_LATENCY_MS, "operations": ["downloadOrder"]}
    )


def _held_leases(stack: Stack) -> set[str]:
    """Orders whose lease is held now: a worker is in the middle of one of their steps."""
    prefix = f"{stack.settings.ledger_prefix}:lease:"
    return {k.decode()[len(prefix) :] for k in stack.services.redis.scan_iter(f"{prefix}*")}


@pytest.mark.slow
def test_a_worker_cut_off_from_redis_mid_step_past_its_lease_is_taken_over_and_every_effect_is_once(
    network: Network, stack: Stack
) -> None:
    h1, h2, h3 = network.add_host("worker-a"), network.add_host("worker-b"), network.add_host("listener")
    orders = stack.seed(PARTITION_ORDERS, esim_share=1.0, seed=17)
    _slow_effects(stack.sandbox)
    stack.listener(host=h3)
    stack.worker("wa", host=h1, concurrency=4)
    stack.publish_in_background(orders, 1.0)

    # Wait until worker A is inside effect calls (leases held, the slow calls under way).
    def in_effect_calls() -> bool:
        calls = stack.sandbox.admin("whmcs").get("/__admin/calls")["calls"]
        calls.update(stack.sandbox.admin("smdp").get("/__admin/calls")["calls"])
        return len(_held_leases(stack)) >= 2 and calls.get("AddOrder", 0) + calls.get("downloadOrder", 0) >= 2

    stack._wait(in_effect_calls, IN_STEP_TIMEOUT_S, "worker A in the middle of effect calls")
    h1.cut("data")
    mid_step = _held_leases(stack)
    cut_at = time.monotonic()
    stack.worker("wb", host=h2, concurrency=4)
    # While A is cut off, B finishes Orders, including ones A was in the middle of.
    stack._wait(lambda: time.monotonic() - cut_at >= CUT_S, CUT_S + 5, "the partition")
    finished_by_b_during_cut = {r["order_id"] for r in stack.logs_of("wb") if r.get("event") == "run_done"}
    h1.heal()

    stack.settle(orders, SETTLE_TIMEOUT_S)
    problems = stack.problems(orders)
    assert problems == {}, problems
    assert stack.services.inventory.stock().claimed == 0
    taken_over = mid_step & finished_by_b_during_cut
    print(
        f"partition: {len(mid_step)} Orders mid-step at the cut, {len(taken_over)} of them finished by B "
        f"during the {CUT_S:.0f} s cut; A's log: {dict(stack.log_events('wa'))}; restarts {dict(stack.restarts)}"
    )
    assert taken_over, (mid_step, finished_by_b_during_cut)


# -- two worker hosts, one cut off and back, 500 Orders -------------------------------------------

FLOW_ORDERS = 500
FLOW_PUBLISH_S = 25.0
HOST_CUT_S = 15.0


@pytest.mark.slow
def test_500_orders_on_two_worker_hosts_one_cut_off_and_restored_nothing_lost_nothing_twice(
    network: Network, stack: Stack
) -> None:
    h1, h2, h3 = network.add_host("workers-1"), network.add_host("workers-2"), network.add_host("listener")
    orders = stack.seed(FLOW_ORDERS, seed=23)
    stack.listener(host=h3)
    stack.worker("w1", host=h1)
    stack.worker("w2", host=h2)
    started = time.monotonic()
    stack.publish_in_background(orders, FLOW_PUBLISH_S)
    stack.wait_activated(FLOW_ORDERS // 4, PROGRESS_TIMEOUT_S)
    h1.cut()
    cut_at = stack.activated()
    time.sleep(HOST_CUT_S)
    during_cut = stack.activated() - cut_at
    h1.heal()
    settle_s = stack.settle(orders, SETTLE_TIMEOUT_S)
    problems = stack.problems(orders)
    assert problems == {}, problems
    assert stack.services.inventory.stock().claimed == 0
    print(
        f"two hosts: {FLOW_ORDERS} Orders in {time.monotonic() - started:.0f} s; {during_cut} Activated by host 2 "
        f"during the {HOST_CUT_S:.0f} s cut; settled {settle_s:.0f} s after; "
        f"host 1's log: {dict(stack.log_events('w1'))}; restarts {dict(stack.restarts)}"
    )
    assert during_cut > 0  # the other host carried on alone
