"""The listener as Redis holds it, for the console and the exporter: checkpoints in their own form."""

from __future__ import annotations

import pytest

from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

CHANNEL = "/event/OrderProvisionRequested__e"


def _save(store, transport: str, position: bytes) -> None:
    """What the listener does after a batch (without the replica's confirmation)."""
    pipe = store._redis.pipeline()
    store.queue_checkpoint(pipe, CHANNEL, transport, position)
    pipe.execute()


@pytest.fixture
def services(settings):
    svc = Services(settings)
    yield svc
    svc.redis.close()


def test_each_checkpoint_reads_as_replay_from_takes_it_cometd_the_integer_pubsub_the_hex(
    services: Services,
) -> None:
    store = services.ledger.listener
    _save(store, "cometd", b"8230")
    _save(store, "pubsub", bytes.fromhex("00000000000018af"))
    state = store.state(CHANNEL)
    # Not "38323330", the hex of CometD's ASCII digits, which --replay-from would misread.
    assert state.checkpoints == {"pubsub": "00000000000018af", "cometd": "8230"}


def test_a_checkpoint_that_is_not_one_of_its_transport_says_so_with_the_bytes(services: Services) -> None:
    _save(services.ledger.listener, "cometd", b"\x00\x18")
    state = services.ledger.listener.state(CHANNEL)
    assert state.checkpoints == {"cometd": "unreadable: 0018"}


def test_no_checkpoint_is_no_entry(services: Services) -> None:
    assert services.ledger.listener.state(CHANNEL).checkpoints == {}
    assert services.ledger.listener.checkpoints(CHANNEL) == {}


def test_the_checkpoints_are_read_back_as_they_were_written_per_transport(services: Services) -> None:
    store = services.ledger.listener
    _save(store, "pubsub", bytes.fromhex("00000000000018af"))
    assert store.checkpoint(CHANNEL, "pubsub") == bytes.fromhex("00000000000018af")
    assert store.checkpoint(CHANNEL, "cometd") is None
    assert store.checkpoints(CHANNEL) == {"pubsub": bytes.fromhex("00000000000018af")}
