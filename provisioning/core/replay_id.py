"""The replay id, parsed once: the position of one event on one transport's stream.

Salesforce's replay ids are opaque: store them, compare them, never compute with them. The
two transports number the same event differently, and neither understands the other's
(a CometD integer sent as a Pub/Sub replay id fails with ``…replayid.corrupted``):

- the Pub/Sub API hands out bytes, to be stored "as bytes without any conversion";
- the Streaming API (CometD) an integer, stored as its ASCII decimal (``b"8230"``).

So a :class:`ReplayId` carries its transport beside its opaque bytes, and a transport
refuses another's id instead of misreading it. Every text form goes through here, so what
a log line or the console shows is what ``--replay-from`` and ``SF_EVENTS_REPLAY`` take:

- :meth:`ReplayId.parse` / :func:`parse_start`: what an operator types: CometD the integer
  (``8230``), Pub/Sub the hex of the bytes (``00000000000018af``, ``0x`` allowed);
  ``LATEST``/``EARLIEST`` (or ``-1``/``-2``) on both;
- :meth:`ReplayId.from_stored`: a checkpoint's bytes as Redis holds them (the bytes above);
- ``str(replay_id)``: the operator's form again (never the hex of CometD's digits).
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass
from typing import TypeAlias


class Transport(enum.StrEnum):
    """How the listener receives events (``SF_EVENTS_TRANSPORT``)."""

    PUBSUB = "pubsub"  # the Pub/Sub API (gRPC, Avro)
    COMETD = "cometd"  # the Streaming API (CometD, Bayeux long polling)


class ReplayPreset(enum.Enum):
    """A start position that is not a stored replay id."""

    LATEST = "LATEST"  # only events published after subscribing
    EARLIEST = "EARLIEST"  # every event still retained (72 h for high-volume platform events)


LATEST = ReplayPreset.LATEST
EARLIEST = ReplayPreset.EARLIEST
# What operators may type for the presets (CometD's own numbers for them included).
_PRESET_WORDS = {"LATEST": LATEST, "-1": LATEST, "EARLIEST": EARLIEST, "-2": EARLIEST}


@dataclass(frozen=True)
class ReplayId:
    """One transport's opaque replay id: ``value`` is what the server gave and what is stored."""

    transport: Transport
    value: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "transport", Transport(self.transport))
        object.__setattr__(self, "value", bytes(self.value))
        if not self.value:
            raise ValueError("a replay id has at least one byte")
        if self.transport is Transport.COMETD and not _is_decimal(self.value):
            raise ValueError(
                f"{self.value[:32]!r} is not a CometD replay id (the ASCII decimal of an integer); "
                "a Pub/Sub replay id cannot start a CometD subscription"
            )

    @classmethod
    def cometd(cls, number: int) -> ReplayId:
        """The id of a CometD event (``data.event.replayId``)."""
        if number < 0:
            raise ValueError(f"a CometD replay id is not negative (got {number}; -1, -2 are presets)")
        return cls(Transport.COMETD, str(number).encode("ascii"))

    @classmethod
    def parse(cls, text: str, transport: Transport | str) -> ReplayId:
        """An id as an operator types it; ``ValueError`` naming the form ``transport`` expects."""
        kind = Transport(transport)
        value = str(text).strip()
        if kind is Transport.COMETD:
            if not value.isascii() or not value.isdigit():
                raise ValueError("a CometD replay id is an integer (or LATEST, EARLIEST)")
            return cls.cometd(int(value))
        hexed = value.lower().removeprefix("0x")
        if not hexed or len(hexed) % 2 or not set(hexed) <= set(string.hexdigits):
            raise ValueError(
                "a Pub/Sub replay id is the hex of its bytes, an even number of hex digits "
                "(or LATEST, EARLIEST)"
            )
        return cls(kind, bytes.fromhex(hexed))

    @classmethod
    def from_stored(cls, raw: bytes, transport: Transport | str) -> ReplayId:
        """A checkpoint as stored (``value``); ``ValueError`` when it is not one of ``transport``."""
        return cls(Transport(transport), bytes(raw))

    @property
    def number(self) -> int:
        """CometD only: the integer the Streaming API sends and takes."""
        if self.transport is not Transport.COMETD:
            raise ValueError("a Pub/Sub replay id has no number: it is opaque bytes")
        return int(self.value)

    def __str__(self) -> str:
        """The operator's form: CometD the integer, Pub/Sub the hex of the bytes."""
        return self.value.decode("ascii") if self.transport is Transport.COMETD else self.value.hex()

    def __repr__(self) -> str:
        return f"ReplayId({self.transport.value}, {self})"


ReplayStart: TypeAlias = ReplayPreset | ReplayId
"""Where a subscription starts: a preset, or after a stored replay id."""


def parse_start(text: str, transport: Transport | str) -> ReplayStart:
    """A start position as an operator types it (``--replay-from``, ``SF_EVENTS_REPLAY``).

    ``ValueError`` naming the form the transport expects.
    """
    preset = _PRESET_WORDS.get(str(text).strip().upper())
    return preset if preset is not None else ReplayId.parse(text, transport)


def parse_preset(text: str) -> ReplayPreset:
    """``LATEST`` or ``EARLIEST`` (any case); ``ValueError`` otherwise."""
    try:
        return ReplayPreset[str(text).strip().upper()]
    except KeyError:
        raise ValueError("expected LATEST or EARLIEST") from None


def describe_start(start: ReplayStart) -> str:
    """The text :func:`parse_start` takes back: ``LATEST``, ``EARLIEST`` or the id in its transport's form."""
    return start.value if isinstance(start, ReplayPreset) else str(start)


def _is_decimal(value: bytes) -> bool:
    return value.isdigit() and value.isascii()
