"""The event-source seam: what the listener consumes, whichever transport delivers the events.

Two transports implement :class:`EventSource`: the Pub/Sub API (gRPC, Avro;
:class:`provisioning.salesforce.pubsub.PubSubClient`, ``transport == "pubsub"``) and the
Streaming API (CometD; :class:`provisioning.salesforce.streaming.StreamingClient`,
``transport == "cometd"``)::

    source = make_event_source(settings)
    for batch in source.batches(start):          # start: LATEST, EARLIEST or a stored replay id
        for event in batch.events:
            handle(event)                         # validate, record, publish the task
        if batch.position is not None:
            store_checkpoint(batch.position)      # after the broker accepted every task
            source.ack(batch.position)            # every re-subscription starts after it

Delivery is pull-based: the next batch is fetched from the server only when the caller asks
for it, so at most one batch is in the caller's hands. ``stop()`` (from any thread) ends the
iteration within about half a second.

Replay ids are opaque ``bytes`` outside a transport: store them, compare them for equality,
never compute with them, and never hand one transport's id to the other (a CometD id is the
ASCII decimal of its integer; a Pub/Sub id is the server's bytes unchanged).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from provisioning.core.settings import Settings
    from provisioning.salesforce.auth import JWTBearerAuth


class ReplayPreset(enum.Enum):
    """A start position that is not a stored replay id."""

    LATEST = "LATEST"  # only events published after subscribing
    EARLIEST = "EARLIEST"  # every event still retained (72 h for high-volume platform events)


LATEST = ReplayPreset.LATEST
EARLIEST = ReplayPreset.EARLIEST

ReplayStart: TypeAlias = ReplayPreset | bytes
"""Where a subscription starts: a preset, or after a stored (opaque) replay id."""


def replay_start_from(settings: Settings) -> ReplayStart:
    """SF_EVENTS_REPLAY for the transport in use: a preset, or the replay id's opaque bytes.

    CometD ids are the ASCII decimal of the integer; Pub/Sub ids are the bytes the hex names.
    """
    value = settings.sf_events_replay
    if value in ("LATEST", "-1"):
        return LATEST
    if value in ("EARLIEST", "-2"):
        return EARLIEST
    if settings.sf_events_transport == "cometd":
        return value.encode("ascii")
    return bytes.fromhex(value.removeprefix("0x"))


def replay_fallback_from(settings: Settings) -> ReplayPreset:
    """SF_EVENTS_REPLAY_FALLBACK as a preset."""
    return ReplayPreset(settings.sf_events_replay_fallback)


def parse_start(text: str, transport: str) -> ReplayStart:
    """A start position typed by an operator (``--replay-from``): LATEST, EARLIEST or a replay id.

    ``ValueError`` naming the form the transport expects.
    """
    value = text.strip()
    if value.upper() in ("LATEST", "-1"):
        return LATEST
    if value.upper() in ("EARLIEST", "-2"):
        return EARLIEST
    if transport == "cometd":
        if not value.isdigit():
            raise ValueError("a CometD replay id is an integer (or LATEST, EARLIEST)")
        return value.encode("ascii")
    hexed = value.removeprefix("0x")
    try:
        return bytes.fromhex(hexed)
    except ValueError:
        raise ValueError("a Pub/Sub replay id is the hex of its bytes (or LATEST, EARLIEST)") from None


def describe_start(start: ReplayStart) -> str:
    """A log-friendly text for a start position: ``LATEST``, ``EARLIEST`` or the id in hex."""
    return start.value if isinstance(start, ReplayPreset) else f"0x{start.hex()}"


@dataclass(frozen=True)
class Event:
    """One delivered event.

    ``payload`` is None exactly when it could not be decoded; ``decode_error`` then says why,
    and the event is still delivered so that the caller can quarantine it and move past it.
    ``created_at`` is the payload's ``CreatedDate`` in epoch seconds, when known.
    """

    replay_id: bytes
    uuid: str | None
    payload: dict[str, Any] | None
    decode_error: str | None = None
    created_at: float | None = None
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Batch:
    """The events of one server response, in order, and where a checkpoint may then be set.

    ``position`` is valid once every event of the batch is handled (the last event's replay id,
    or, for an empty Pub/Sub keepalive, the server's ``latest_replay_id``); None: nothing to store.
    """

    events: tuple[Event, ...]
    position: bytes | None

    def __len__(self) -> int:
        """The number of events (so an empty keepalive batch is falsy: test ``position`` too)."""
        return len(self.events)


@runtime_checkable
class EventSource(Protocol):
    """A subscription to one Platform Event channel, with replay and recovery built in."""

    @property
    def transport(self) -> str:
        """``"pubsub"`` or ``"cometd"``."""
        ...

    @property
    def connected(self) -> bool:
        """Subscribed right now (a health signal)."""
        ...

    @property
    def stalled(self) -> bool:
        """The server went silent past its keepalive promise; cleared by the next response."""
        ...

    @property
    def last_response_at(self) -> float | None:
        """Wall-clock time of the server's last response (events or keepalive), if any."""
        ...

    def batches(self, start: ReplayStart) -> Iterator[Batch]:
        """Batches from ``start`` until :meth:`stop`; fetched only when the caller asks for the next.

        Recoverable trouble (network, expired token, unknown client, a replay id too old, a
        stall) is handled inside; an error that retrying cannot fix is raised.
        """
        ...

    def ack(self, position: bytes) -> None:
        """Everything up to ``position`` is processed: every later (re)subscription starts after it."""
        ...

    def stop(self) -> None:
        """End the iteration in progress (or the next one) soon; never blocks; any thread."""
        ...

    def counters(self) -> dict[str, int]:
        """Monotonic counts for /metrics: events, reconnects, replay_fallbacks, auth_renewals, ..."""
        ...


def make_event_source(settings: Settings, *, auth: JWTBearerAuth | None = None) -> EventSource:
    """The event source ``SF_EVENTS_TRANSPORT`` names, built from the settings (sharing ``auth``)."""
    if settings.sf_events_transport == "cometd":
        from provisioning.salesforce.streaming import StreamingClient

        return StreamingClient.from_settings(settings, auth=auth)
    from provisioning.salesforce.pubsub import PubSubClient

    return PubSubClient.from_settings(settings, auth=auth)
