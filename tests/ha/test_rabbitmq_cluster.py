"""Quorum queues on a three-node RabbitMQ cluster: a node dies, then a second, and a leader mid-batch.

One cluster for the module (``RabbitCluster``: three private nodes, one cookie, quorum queues,
``pause_minority``); every process is given every node (``CELERY_BROKER_URL=amqp://n1;amqp://n2;
amqp://n3``) and fails over along the list. Each test has its own queue, ledger (a private Redis
with AOF), sandbox, real listener and real workers, and ends with every Order ``Activated`` and, from
the simulators' own records, exactly one WHMCS order, at most one eSIM profile and one Message-ID
per Order; each leaves the three nodes running.

1. The node that leads the queue is SIGKILLed with 300 Orders in flight: the other two elect a
   leader and go on; the node comes back and rejoins.
2. Then a second node is killed while the first is still down: one node of three is no quorum, and
   it pauses (``pause_minority``), so a publish is refused (the publisher sees an error, never a
   confirm); the listener keeps its events until it can publish. Both come back: every Order once,
   the refused runs published again by their caller.
3. ``publish_runs`` (the listener's batch publish with confirms) sends batch after batch while the
   queue's leader is killed, from a follower and from the leader's own node: each batch is either
   confirmed, and then every run of it is done without being sent again, or refused, and then sent
   again by the caller; nothing is lost.

The times (kill to a new leader, kill to Orders flowing again, the outage) are printed, not
asserted: this machine is shared.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.run_id import RunId
from provisioning.runs.publishing import make_publisher, publish_runs
from provisioning.sandbox.rabbitmq_server import RabbitCluster, RabbitServer
from provisioning.sandbox.redis_server import RedisServer
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import SeededOrder, count_effects

from .harness import Stack, stack_settings

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

ORDERS = 300
WORKERS = 2
PUBLISH_SPREAD_S = 10.0
PROGRESS_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 240.0
LEADER_TIMEOUT_S = 60.0
# Orders Activated after a kill that show the cluster serves again.
FLOWING = 5
# How long the two-node outage lasts (the refusal is seen within it).
OUTAGE_S = 8.0
# Scenario 3: runs per publish_runs batch, and the pause between two batches (so that the batches
# go on through the leader's death and the election).
BATCH = 10
BATCH_PAUSE_S = 0.1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    nodes = RabbitCluster(tmp_path_factory.mktemp("rabbitmq-cluster")).start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def stack(cluster: RabbitCluster, tmp_path: Path) -> Iterator[Stack]:
    ledger = RedisServer(tmp_path / "redis", appendonly=True).start()
    sandbox = Sandbox(tmp_path / "sandbox", seed=61, long_poll_s=5.0, pubsub_keepalive_s=5.0).start()
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    settings = stack_settings(
        sandbox,
        redis_url=ledger.url(0),
        celery_broker_url=cluster.url,
        celery_queue_type="quorum",
        celery_queue=name,
        ledger_prefix=name,
    )
    stack = Stack(sandbox, settings, tmp_path / "logs")
    try:
        yield stack
    finally:
        stack.stop()
        sandbox.stop()
        ledger.stop()
        # The next test finds three nodes running.
        RabbitCluster.start_nodes([n for n in cluster.nodes if not n.alive()])


def _start(stack: Stack, *, listener: bool = True) -> None:
    for n in range(WORKERS):
        stack.worker(f"w{n + 1}")
    if listener:
        stack.listener()


def _kill(node: RabbitServer) -> float:
    killed_at = time.monotonic()
    node.stop(signal.SIGKILL)
    return killed_at


def _flowing_again(stack: Stack, killed_at: float) -> float:
    """Seconds from the kill until Orders are Activated again (a few more than now)."""
    stack.wait_activated(stack.activated() + FLOWING, PROGRESS_TIMEOUT_S)
    return round(time.monotonic() - killed_at, 1)


def _effects(stack: Stack, orders: list[SeededOrder]) -> dict[str, Any]:
    """Each Order's effects checked (none may have a problem), and the totals for the record."""
    problems = stack.problems(orders)
    assert problems == {}, problems
    assert stack.services.inventory.stock().claimed == 0
    effects = count_effects(stack.sandbox)
    esims = sum(1 for o in orders if o.esim)
    assert effects.activated == len(orders)
    assert effects.whmcs_orders == effects.whmcs_accepted == len(orders)
    assert effects.esim_confirmed == esims
    assert effects.distinct_message_ids == len(orders)
    return {
        "orders": len(orders),
        "activated": effects.activated,
        "whmcs_orders": effects.whmcs_orders,
        "esim_profiles": f"{effects.esim_confirmed} of {esims} eSIM Orders",
        "emails": f"{effects.emails} ({effects.distinct_message_ids} Message-IDs)",
    }


def _processes(stack: Stack) -> dict[str, Any]:
    workers, listener = stack.log_events("w"), stack.log_events("listener")
    # A node's death is a lost connection for whoever was on it: they fail over, none exits.
    assert not stack.restarts, "\n\n".join(stack.deaths)
    return {
        "worker_connections_lost": workers["celery: Connection to broker lost"],
        "step_retries": workers["step_retry"],
        "duplicates_ignored": workers["duplicate_event_ignored"],
        # A worker back on another node before the cluster forgot its old remote-control queue.
        "remote_control_waits": workers["remote_control_queue_locked"],
        "listener_outages": listener["listener_outage"],
        "process_restarts": sum(stack.restarts.values()),
    }


def test_300_orders_through_the_death_of_the_node_leading_the_queue_each_activated_with_every_effect_once(
    cluster: RabbitCluster, stack: Stack
) -> None:
    orders = stack.seed(ORDERS, seed=11)
    _start(stack)
    stack.publish_in_background(orders, PUBLISH_SPREAD_S)
    stack.wait_activated(ORDERS // 3, PROGRESS_TIMEOUT_S)

    queue = stack.settings.celery_queue
    leader = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S)
    activated_at_kill = stack.activated()
    killed_at = _kill(leader)
    new_leader = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S, other_than=leader)
    leader_s = round(time.monotonic() - killed_at, 1)
    flowing_s = _flowing_again(stack, killed_at)
    # Two nodes of three finish the work; the third comes back and rejoins from its own data.
    settle_s = stack.settle(orders, SETTLE_TIMEOUT_S)
    leader.start()
    info = cluster.queue_info(queue)
    assert info is not None
    assert sorted(info["online"]) == sorted(n.node_name for n in cluster.nodes)  # type: ignore[arg-type]

    report = {
        "killed": leader.node_name,
        "new_leader": new_leader.node_name,
        "activated_at_kill": activated_at_kill,
        "kill_to_new_leader_s": leader_s,
        "kill_to_orders_flowing_s": flowing_s,
        "settle_s": round(settle_s, 1),
        **_effects(stack, orders),
        **_processes(stack),
    }
    print("rabbitmq cluster, the leader's node killed:", report)


def _republish_until_confirmed(stack: Stack, runs: list[RunId], timeout_s: float) -> int:
    """What a caller does with runs whose publish was refused: send them again. Attempts it took."""
    app = make_publisher(stack.settings)
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        try:
            publish_runs(app, runs)
            return attempts
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_a_second_node_down_leaves_no_quorum_publishing_is_refused_and_with_both_back_every_order_is_once(
    cluster: RabbitCluster, stack: Stack
) -> None:
    orders = stack.seed(ORDERS, seed=12)
    # These Orders' runs are published by the test itself, during the outage (no event for them).
    held, orders = orders[-10:], orders[:-10]
    _start(stack)
    stack.publish_in_background(orders, PUBLISH_SPREAD_S)
    stack.wait_activated(ORDERS // 4, PROGRESS_TIMEOUT_S)

    queue = stack.settings.celery_queue
    first = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S)
    first_killed_at = _kill(first)
    second = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S, other_than=first)
    first_flowing_s = _flowing_again(stack, first_killed_at)

    # The second node dies while the first is still down: the last one has no quorum and pauses.
    activated_at_second_kill = stack.activated()
    second_killed_at = _kill(second)
    app = make_publisher(stack.settings)
    runs = [RunId.parse(o.run_id) for o in held]
    refusal: BaseException | None = None
    try:
        publish_runs(app, runs)
    except Exception as exc:
        refusal = exc
    refused_after_s = round(time.monotonic() - second_killed_at, 1)
    # Never a confirm for a publish the cluster cannot keep: refused (an error or a nack) instead.
    assert refusal is not None, "a publish was confirmed by one node of three"
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - second_killed_at)))

    back_at = time.monotonic()
    RabbitCluster.start_nodes([first, second])
    cluster.wait_for_leader(queue, LEADER_TIMEOUT_S)
    back_s = round(time.monotonic() - back_at, 1)
    attempts = _republish_until_confirmed(stack, runs, PROGRESS_TIMEOUT_S)
    back_to_flowing_s = _flowing_again(stack, back_at)
    settle_s = stack.settle(orders + held, SETTLE_TIMEOUT_S)

    report = {
        "killed": [first.node_name, second.node_name],
        "kill_to_orders_flowing_with_two_nodes_s": first_flowing_s,
        "activated_at_second_kill": activated_at_second_kill,
        "refusal": f"{type(refusal).__name__}: {refusal}"[:160],
        "refused_after_s": refused_after_s,
        "outage_s": round(back_at - second_killed_at, 1),
        "restart_of_both_s": back_s,
        "republish_attempts": attempts,
        "restart_to_orders_flowing_s": back_to_flowing_s,
        "settle_s": round(settle_s, 1),
        **_effects(stack, orders + held),
        **_processes(stack),
    }
    print("rabbitmq cluster, two nodes down:", report)


@dataclass
class Batches:
    """What ``publish_runs`` said about each batch: returned (confirmed) or raised (refused)."""

    confirmed: list[list[RunId]] = field(default_factory=list)
    refused: list[list[RunId]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # When each batch's publish began (time.monotonic()), and how long it took to return or raise.
    began: list[float] = field(default_factory=list)
    took: list[float] = field(default_factory=list)


@pytest.mark.parametrize("publisher_on", ["a follower", "the leader"])
def test_batches_published_while_the_leader_dies_are_each_confirmed_and_done_or_refused_and_sent_again(
    cluster: RabbitCluster, stack: Stack, publisher_on: str
) -> None:
    orders = stack.seed(ORDERS, seed=13)
    # No listener, so no reconciler: a confirmed run that the cluster lost would stay undone.
    _start(stack, listener=False)
    queue = stack.settings.celery_queue
    leader = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S)
    # On a follower, the leader's death reaches the publisher through the queue (its confirms); on
    # the leader's node, as its connection lost in the middle of a batch.
    first = leader if publisher_on == "the leader" else next(n for n in cluster.nodes if n is not leader)
    app = make_publisher(stack.settings.model_copy(update={"celery_broker_url": cluster.url_from(first)}))
    runs = [RunId.parse(o.run_id) for o in orders]
    batches = Batches()
    started = threading.Event()

    def publish_all() -> None:
        for at in range(0, len(runs), BATCH):
            batch = runs[at : at + BATCH]
            batches.began.append(time.monotonic())
            try:
                publish_runs(app, batch)
            except Exception as exc:
                batches.refused.append(batch)
                batches.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            else:
                batches.confirmed.append(batch)
            batches.took.append(time.monotonic() - batches.began[-1])
            if len(batches.confirmed) == 3:
                started.set()
            time.sleep(BATCH_PAUSE_S)

    publisher = threading.Thread(target=publish_all, name="publisher")
    publisher.start()
    assert started.wait(PROGRESS_TIMEOUT_S)
    killed_at = _kill(leader)
    new_leader = cluster.wait_for_leader(queue, LEADER_TIMEOUT_S, other_than=leader)
    leader_s = round(time.monotonic() - killed_at, 1)
    publisher.join(PROGRESS_TIMEOUT_S)
    assert not publisher.is_alive()
    published = [str(r) for b in batches.confirmed + batches.refused for r in b]
    assert sorted(published) == sorted(map(str, runs))
    # Batches were sent while the queue had no leader and after it had a new one.
    elected_at = killed_at + leader_s
    assert any(killed_at <= t < elected_at for t in batches.began), (leader_s, batches.began[-1] - killed_at)
    # The caller sends the refused batches again (the listener does, before it checkpoints).
    for batch in batches.refused:
        _republish_until_confirmed(stack, batch, PROGRESS_TIMEOUT_S)
    settle_s = stack.settle(orders, SETTLE_TIMEOUT_S)
    leader.start()

    report = {
        "killed": leader.node_name,
        "new_leader": new_leader.node_name,
        "kill_to_new_leader_s": leader_s,
        "publisher_on": publisher_on,
        "batches_after_the_kill": sum(1 for t in batches.began if t >= killed_at),
        "longest_batch_s": round(max(batches.took), 2),
        "batches_confirmed": len(batches.confirmed),
        "batches_refused": len(batches.refused),
        "refusals": dict(batches.errors),
        "settle_s": round(settle_s, 1),
        **_effects(stack, orders),
        **_processes(stack),
    }
    print("rabbitmq cluster, batches through a leader's death:", report)
