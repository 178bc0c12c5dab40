"""The listener as Redis holds it, for the console and the exporter: checkpoints in their own form."""

from __future__ import annotations

import pytest

from provisioning.ledger.listener import read_listener_state
from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

CHANNEL = "/event/OrderProvisionRequested__e"


@pytest.fixture
def services(settings):
    svc = Services(settings)
    yield svc
    svc.redis.close()


def test_each_checkpoint_reads_as_replay_from_takes_it_cometd_the_integer_pubsub_the_hex(
    services: Services,
) -> None:
    ledger = services.ledger
    services.redis.set(ledger.listener_key(CHANNEL, "checkpoint:cometd"), b"8230")
    services.redis.set(ledger.listener_key(CHANNEL, "checkpoint:pubsub"), bytes.fromhex("00000000000018af"))
    state = read_listener_state(ledger, CHANNEL)
    # Not "38323330", the hex of CometD's ASCII digits, which --replay-from would misread.
    assert state.checkpoints == {"pubsub": "00000000000018af", "cometd": "8230"}


def test_a_checkpoint_that_is_not_one_of_its_transport_says_so_with_the_bytes(services: Services) -> None:
    services.redis.set(services.ledger.listener_key(CHANNEL, "checkpoint:cometd"), b"\x00\x18")
    state = read_listener_state(services.ledger, CHANNEL)
    assert state.checkpoints == {"cometd": "unreadable: 0018"}


def test_no_checkpoint_is_no_entry(services: Services) -> None:
    assert read_listener_state(services.ledger, CHANNEL).checkpoints == {}
