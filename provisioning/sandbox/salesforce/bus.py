"""The event bus: per-channel retention buffers, replay positions and long-poll wake-ups."""

from __future__ import annotations

import asyncio
import base64
import bisect
import datetime as dt
import hashlib
import heapq
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

REPLAY_NEW = -1
REPLAY_ALL = -2


@dataclass
class BusEvent:
    channel: str
    replay_id: int
    created_at: float  # monotonic, for retention
    message: dict[str, Any]
    # The event schema version current when it was published (the Pub/Sub server's schema change).
    schema_version: int = 0


@dataclass
class ChannelLog:
    """Retained events of one channel, oldest first; ``ids`` mirrors their replay ids for bisect."""

    events: list[BusEvent] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    published: int = 0

    def trim(self, count: int) -> None:
        del self.events[:count]
        del self.ids[:count]


class InvalidReplayId(Exception):
    """A replay position that is unknown or older than the retention window."""


class EventBus:
    """Every published event, kept for ``retention_s``; replay ids grow by 1 to 3, never contiguous.

    ``topics`` are the Platform Events the org has (their channels, ``/event/<Name>__e``): a
    subscription to any other is refused, as Salesforce refuses one to an event never deployed.
    Publishing is not checked here (the admin route publishes anywhere; the REST route knows its
    one event).
    """

    def __init__(
        self, rng: random.Random, retention_s: float, created_by: str, topics: Iterable[str] = ()
    ) -> None:
        self.retention_s = retention_s
        self.created_by = created_by
        self.topics = frozenset(topics)
        self.published = 0
        self._rng = rng
        self._last_replay_id = rng.randint(1_000, 9_999)
        self._channels: dict[str, ChannelLog] = {}
        self._wake = asyncio.Event()
        self.schema_version = 0
        # Positions handed out that are not an event of the channel (the Pub/Sub keepalive's
        # latest_replay_id of a subscription that has seen no event yet): channel -> id -> when.
        self._anchors: dict[str, dict[int, float]] = {}

    def has_topic(self, channel: str) -> bool:
        """Whether the org has this Platform Event (may it be subscribed to)."""
        return channel in self.topics

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, channel: str, fields: dict[str, Any], *, notify: bool = True) -> BusEvent:
        """Append one event carrying ``fields`` after CreatedDate and CreatedById."""
        self._last_replay_id += self._rng.randint(1, 3)
        now = dt.datetime.now(dt.UTC)
        payload: dict[str, Any] = {
            "CreatedDate": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
            "CreatedById": self.created_by,
            **fields,
        }
        message = {
            "channel": channel,
            "data": {
                "schema": schema_id(channel),
                "payload": payload,
                "event": {"replayId": self._last_replay_id, "EventUuid": str(uuid.uuid4())},
            },
        }
        event = BusEvent(channel, self._last_replay_id, time.monotonic(), message, self.schema_version)
        log = self._channels.setdefault(channel, ChannelLog())
        log.events.append(event)
        log.ids.append(event.replay_id)
        log.published += 1
        self.published += 1
        if notify:
            self.notify()
        return event

    def notify(self) -> None:
        """Wake every held long poll; each re-checks its own state."""
        self._wake.set()
        self._wake = asyncio.Event()

    @property
    def waiter(self) -> asyncio.Event:
        """The event the next :meth:`notify` sets; take it after checking, then wait."""
        return self._wake

    # -- retention ----------------------------------------------------------------------------

    def remember_position(self, channel: str, replay_id: int) -> None:
        """Accept ``replay_id`` as a start position of ``channel`` for the retention window."""
        log = self._channels.get(channel)
        if log is None or not log.ids or log.ids[-1] != replay_id:
            self._anchors.setdefault(channel, {})[replay_id] = time.monotonic()

    def purge(self) -> None:
        cutoff = time.monotonic() - self.retention_s
        for anchors in self._anchors.values():
            for replay_id in [r for r, at in anchors.items() if at < cutoff]:
                del anchors[replay_id]
        for log in self._channels.values():
            count = 0
            while count < len(log.events) and log.events[count].created_at < cutoff:
                count += 1
            if count:
                log.trim(count)

    def expire_all(self) -> int:
        """Drop every retained event, as if the window had passed over them; returns how many."""
        dropped = 0
        for log in self._channels.values():
            dropped += len(log.events)
            log.trim(len(log.events))
        self._anchors.clear()
        return dropped

    def clear(self) -> None:
        self._channels.clear()
        self._anchors.clear()

    # -- replay -------------------------------------------------------------------------------

    def start_position(self, channel: str, replay: int) -> int:
        """The replay id a new subscription delivers after; raises InvalidReplayId."""
        self.purge()
        if replay == REPLAY_NEW:
            return self._last_replay_id
        if replay == REPLAY_ALL:
            return 0
        if replay in self._anchors.get(channel, {}):
            return replay
        log = self._channels.get(channel)
        if replay < 0 or log is None:
            raise InvalidReplayId(replay)
        index = bisect.bisect_left(log.ids, replay)
        if index == len(log.ids) or log.ids[index] != replay:
            raise InvalidReplayId(replay)
        return replay

    def pending(self, positions: dict[str, int], limit: int) -> list[BusEvent]:
        """Up to ``limit`` events after each channel's position, in replay order."""
        self.purge()
        lists: list[Iterable[BusEvent]] = []
        for channel, after in positions.items():
            log = self._channels.get(channel)
            if log is None:
                continue
            start = bisect.bisect_right(log.ids, after)
            if start < len(log.ids):
                lists.append(log.events[start : start + limit])
        if not lists:
            return []
        if len(lists) == 1:
            return list(lists[0])
        return list(heapq.merge(*lists, key=lambda e: e.replay_id))[:limit]

    # -- reading ------------------------------------------------------------------------------

    def channels(self) -> dict[str, dict[str, Any]]:
        self.purge()
        return {
            name: {
                "retained": len(log.events),
                "published": log.published,
                "oldest_replay_id": log.ids[0] if log.ids else None,
                "latest_replay_id": log.ids[-1] if log.ids else None,
            }
            for name, log in self._channels.items()
        }

    def events(self, channel: str | None = None, after: int | None = None) -> list[dict[str, Any]]:
        self.purge()
        found: list[BusEvent] = []
        for name, log in self._channels.items():
            if channel is None or name == channel:
                start = 0 if after is None else bisect.bisect_right(log.ids, after)
                found.extend(log.events[start:])
        found.sort(key=lambda e: e.replay_id)
        return [e.message for e in found]


def schema_id(channel: str) -> str:
    """A stable 22-character schema id per channel, shaped like Salesforce's."""
    digest = hashlib.sha256(channel.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
