"""The private RabbitMQ node and cluster: their own ports and data; a quorum queue's confirmed messages
survive a node's restart, and in the cluster its leader's death."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from provisioning.sandbox.rabbitmq_server import RabbitCluster, RabbitServer

pytestmark = pytest.mark.rabbitmq


def test_a_private_node_keeps_a_quorum_queues_confirmed_messages_across_a_restart(tmp_path: Path) -> None:
    node = RabbitServer(tmp_path / "rabbitmq").start()
    try:
        assert node.port != 5672
        assert node.node_name != "rabbit@localhost"
        queue = Queue(
            "q", Exchange("q", type="topic"), routing_key="q", queue_arguments={"x-queue-type": "quorum"}
        )
        with Connection(node.url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for n in range(3):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key="q", declare=[queue])
        assert node.stop() == 0
        assert not node.answers()
        node.start()
        with Connection(node.url) as conn:
            bound = queue(conn.default_channel)
            assert [bound.get(no_ack=True).payload for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        node.stop()
    assert not node.alive()


@pytest.mark.slow
def test_three_private_nodes_form_one_cluster_whose_quorum_queue_keeps_a_confirmed_message_past_its_leader(
    tmp_path: Path,
) -> None:
    cluster = RabbitCluster(tmp_path / "cluster").start()
    try:
        assert len({n.node_name for n in cluster.nodes}) == 3
        assert all(n.port != 5672 for n in cluster.nodes)
        queue = Queue(
            "q", Exchange("q", type="topic"), routing_key="q", queue_arguments={"x-queue-type": "quorum"}
        )
        with Connection(cluster.url, transport_options={"confirm_publish": True}) as conn:
            conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="q", declare=[queue])
        info = cluster.queue_info("q")
        assert info is not None
        assert sorted(info["members"]) == sorted(n.node_name for n in cluster.nodes)  # type: ignore[arg-type]
        leader = cluster.wait_for_leader("q", 30)
        leader.stop(signal.SIGKILL)
        # The two others elect a leader; a client given every node finds one of them.
        assert cluster.wait_for_leader("q", 60) is not leader
        with Connection(cluster.url) as conn:
            message = queue(conn.default_channel).get(no_ack=True)
            assert message is not None
            assert message.payload == {"n": 1}
        leader.start()
        assert set(cluster.queue_info("q")["online"]) == {n.node_name for n in cluster.nodes}  # type: ignore[arg-type, index]
    finally:
        cluster.stop()
    assert not any(n.alive() for n in cluster.nodes)
