"""Fixtures of the Salesforce package's tests: an RSA key pair, the transport fake, log capture."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.events import EARLIEST, Batch, Event, EventSource, ReplayId, ReplayStart
from provisioning.salesforce.reconnect import ReconnectPolicy
from provisioning.salesforce.streaming import StreamingClient

from .fake import API_VERSION, CHANNEL, CLIENT_ID, LOGIN_URL, USERNAME, FakeSalesforce

# The transports' waits, short enough for a test: a few ms between tries, 50 ms at most.
FAST_RECONNECT = ReconnectPolicy(base_s=0.01, cap_s=0.05, delivery_limit_wait_s=0.05)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def key_file(rsa_key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sf-key") / "server.key"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.fixture
def fake(rsa_key: rsa.RSAPrivateKey) -> Iterator[FakeSalesforce]:
    adapter = FakeSalesforce(rsa_key.public_key())
    yield adapter
    if adapter.hold is not None:
        adapter.hold.set()


@pytest.fixture
def session(fake: FakeSalesforce) -> requests.Session:
    s = requests.Session()
    s.mount("https://", fake)
    return s


@pytest.fixture
def auth(session: requests.Session, key_file: Path) -> JWTBearerAuth:
    return JWTBearerAuth(
        login_url=LOGIN_URL,
        client_id=CLIENT_ID,
        username=USERNAME,
        private_key_file=key_file,
        session=session,
    )


@pytest.fixture
def stream(auth: JWTBearerAuth, session: requests.Session) -> StreamingClient:
    return StreamingClient(
        auth=auth,
        session=session,
        api_version=API_VERSION,
        channel=CHANNEL,
        replay_fallback=EARLIEST,
        reconnect=FAST_RECONNECT,
    )


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        pause.wait(0.01)
    raise AssertionError("condition not met in time")


def int_ids(events: list[Event]) -> list[int]:
    """CometD replay ids as the integers the server used (tests only: callers treat them as opaque)."""
    return [e.replay_id.number for e in events]


def rid(replay_id: int) -> ReplayId:
    """A CometD replay id as the seam has it."""
    return ReplayId.cometd(replay_id)


class Consumer:
    """Iterates an EventSource in a thread, acking each batch's position unless told otherwise."""

    def __init__(self, stream: EventSource, start: ReplayStart, *, ack: bool = True) -> None:
        self.stream = stream
        self.start = start
        self.ack = ack
        self.events: list[Event] = []
        self.batches: list[Batch] = []
        self.error: BaseException | None = None
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for batch in self.stream.batches(self.start):
                with self.arrived:
                    self.batches.append(batch)
                    self.events.extend(batch.events)
                    self.arrived.notify_all()
                if self.ack and batch.position is not None:
                    self.stream.ack(batch.position)
        except BaseException as exc:  # reported by the test
            self.error = exc
            with self.arrived:
                self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        with self.arrived:
            ok = self.arrived.wait_for(lambda: len(self.events) >= count or self.error is not None, timeout)
        if self.error is not None:
            raise self.error
        assert ok, f"got {len(self.events)} events, expected {count}"
        return list(self.events)

    def stop(self, timeout: float = 5.0) -> None:
        self.stream.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the iterator did not end after stop()"


@pytest.fixture
def consume() -> Iterator[Any]:
    started: list[Consumer] = []

    def start(stream: EventSource, start: ReplayStart, *, ack: bool = True) -> Consumer:
        consumer = Consumer(stream, start, ack=ack)
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        consumer.stream.stop()
        consumer.thread.join(5)
