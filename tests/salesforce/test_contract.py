"""One CometD conversation, two backends: the transport-level fake and the sandbox simulator.

Both stand in for Salesforce in other tests; running the same conversation
against both keeps them honest with each other (and our client with both).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from provisioning.core.http import make_session
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.events import EARLIEST, Event, ReplayStart
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.salesforce.streaming import StreamingClient

from .fake import API_VERSION, CHANNEL, CLIENT_ID, LOGIN_URL, USERNAME, FakeSalesforce
from .test_against_simulator import start_org

RECEIVE_TIMEOUT_S = 20.0
RECONNECT = ReconnectPolicy(base_s=0.05, cap_s=0.2)


@dataclass
class Backend:
    stream: StreamingClient
    publish: Callable[[list[str]], None]
    unknown_client_once: Callable[[], None]


@pytest.fixture(params=["fake", "simulator"])
def backend(request: pytest.FixtureRequest, rsa_key, key_file: Path, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "fake":
        fake = FakeSalesforce(rsa_key.public_key())
        session = requests.Session()
        session.mount("https://", fake)
        auth = JWTBearerAuth(
            login_url=LOGIN_URL,
            client_id=CLIENT_ID,
            username=USERNAME,
            private_key_file=key_file,
            session=session,
        )
        stream = StreamingClient(
            auth=auth,
            session=session,
            api_version=API_VERSION,
            channel=CHANNEL,
            replay_fallback=EARLIEST,
            reconnect=RECONNECT,
        )
        yield Backend(
            stream,
            lambda keys: _publish_to_fake(fake, keys),
            lambda: fake.faults["connect"].append("unknown_client"),
        )
        if fake.hold is not None:
            fake.hold.set()
    else:
        org = start_org(tmp_path, long_poll_s=1.0)
        auth = JWTBearerAuth.from_settings(org.settings)
        stream = StreamingClient(
            auth=auth,
            session=make_session(org.settings.tls_ca_bundle),
            api_version=org.settings.sf_api_version,
            channel=org.settings.sf_provision_event_channel,
            replay_fallback=EARLIEST,
            reconnect=RECONNECT,
        )
        yield Backend(stream, org.publish, lambda: org.streaming(unknown_client=1))
        org.server.stop()


def _publish_to_fake(fake: FakeSalesforce, keys: list[str]) -> None:
    for key in keys:
        fake.publish(1, IdemKey__c=key)


def _consume(stream: StreamingClient, start: ReplayStart, want: int) -> list[Event]:
    got: list[Event] = []
    done = threading.Event()

    def run() -> None:
        for batch in stream.batches(start):
            got.extend(batch.events)
            if batch.position is not None:
                stream.ack(batch.position)
            if len(got) >= want:
                break
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not done.wait(RECEIVE_TIMEOUT_S):
        stream.stop()
        thread.join(5)
    return got


def test_events_arrive_in_order_and_a_resubscription_starts_after_the_last_acked_one(backend: Backend):
    backend.publish(["a", "b", "c"])
    first = _consume(backend.stream, EARLIEST, 3)
    assert [e.payload["IdemKey__c"] for e in first if e.payload] == ["a", "b", "c"]
    ids = [e.replay_id.number for e in first]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3

    backend.publish(["d", "e"])
    later = _consume(backend.stream, first[-1].replay_id, 2)
    assert [e.payload["IdemKey__c"] for e in later if e.payload] == ["d", "e"]


def test_an_unknown_client_error_is_followed_by_a_new_handshake_without_loss_or_duplicates(backend: Backend):
    backend.publish(["a"])
    first = _consume(backend.stream, EARLIEST, 1)
    handshakes = backend.stream.counters.handshakes
    backend.unknown_client_once()
    backend.publish(["b", "c"])
    rest = _consume(backend.stream, first[-1].replay_id, 2)
    assert [e.payload["IdemKey__c"] for e in first + rest if e.payload] == ["a", "b", "c"]
    assert backend.stream.counters.handshakes > handshakes
