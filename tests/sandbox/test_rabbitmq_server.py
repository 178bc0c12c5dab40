"""The private RabbitMQ node: its own ports and data; a quorum queue's messages survive its restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from provisioning.sandbox.rabbitmq_server import RabbitServer

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
