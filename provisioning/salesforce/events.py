"""The event-source seam: what the listener consumes, whichever transport delivers the events.

Two transports implement :class:`EventSource`: the Pub/Sub API (gRPC, Avro;
:class:`provisioning.salesforce.pubsub.PubSubClient`, ``transport == "pubsub"``) and the
Streaming API (CometD; :class:`provisioning.salesforce.streaming.StreamingClient`,
``transport == "cometd"``). The listener builds the one ``SF_EVENTS_TRANSPORT`` names
(:func:`provisioning.listener.sources.make_event_source`)::

    for batch in source.batches(start):          # start: LATEST, EARLIEST or a stored ReplayId
        for event in batch.events:
            handle(event)                         # validate, record, publish the task
        if batch.position is not None:
            store_checkpoint(batch.position)      # after the broker accepted every task
            source.ack(batch.position)            # every re-subscription starts after it

Delivery is pull-based: the next batch is fetched from the server only when the caller asks
for it, so at most one batch is in the caller's hands. ``stop()`` (from any thread) ends the
iteration within about half a second.

This module is the seam and nothing else: models and the protocol, importing no transport
(import-linter keeps it so). Replay ids are :class:`~provisioning.core.replay_id.ReplayId`:
a transport's opaque bytes with the transport's name on them, never handed to the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from provisioning.core.replay_id import (
    EARLIEST,
    LATEST,
    ReplayId,
    ReplayPreset,
    ReplayStart,
    Transport,
    describe_start,
)

__all__ = [
    "EARLIEST",
    "LATEST",
    "Batch",
    "Event",
    "EventSource",
    "ReplayId",
    "ReplayPreset",
    "ReplayStart",
    "Transport",
    "describe_start",
]


@dataclass(frozen=True)
class Event:
    """One delivered event.

    ``payload`` is None exactly when it could not be decoded; ``decode_error`` then says why,
    and the event is still delivered so that the caller can quarantine it and move past it.
    ``created_at`` is the payload's ``CreatedDate`` in epoch seconds, when known.
    """

    replay_id: ReplayId
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
    position: ReplayId | None

    def __len__(self) -> int:
        """The number of events (so an empty keepalive batch is falsy: test ``position`` too)."""
        return len(self.events)


@runtime_checkable
class EventSource(Protocol):
    """A subscription to one Platform Event channel, with replay and recovery built in."""

    @property
    def transport(self) -> Transport:
        """``pubsub`` or ``cometd``: the transport of every replay id this source hands out and takes."""
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
        stall) is handled inside. A refusal only a person can fix (an event the org does not
        have, no read permission on it, a refused login) is raised, a
        :class:`~provisioning.salesforce.errors.SalesforcePermanentError` whose ``remedy`` says
        what to fix; the caller decides when to try again.
        """
        ...

    def ack(self, position: ReplayId) -> None:
        """Everything up to ``position`` is processed: every later (re)subscription starts after it."""
        ...

    def stop(self) -> None:
        """End the iteration in progress (or the next one) soon; never blocks; any thread."""
        ...

    def counters(self) -> dict[str, int]:
        """Monotonic counts for /metrics: events, reconnects, replay_fallbacks, auth_renewals, ..."""
        ...
