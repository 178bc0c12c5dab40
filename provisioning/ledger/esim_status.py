"""The eSIM profiles after their release: what the SM-DP+ told us of each (ES2+ handleDownloadProgressInfo).

Today's knowledge of an eSIM used to end at confirmOrder; this store keeps what
follows, per ICCID: released (the eSIM step's end), downloaded, installed, or
error with the reason, and cancelled (the Order's cancellation cancelled the
profile). Each notification is recorded once (dedupe on ICCID + notification
point + timestamp) and moves the state in one script, ``lua/esim_notify.lua``,
whose header states the state machine. A change queues the Order's write-back
(``ESIM_Status__c`` and its time, one PATCH of absolute values: the notification
server's writer sends it under the Order's lease).

Keys (in :mod:`provisioning.ledger.keys`): ``p:esim:status:{iccid}`` (hash),
``p:esim:pending`` (released, not installed, by release time: the stale stock and
the install alert), ``p:esim:writeback`` (ICCIDs whose Order does not show their
state yet), ``p:esim:states`` (profiles per state, for the metrics). Memory: about
300 bytes per profile plus about 40 per notification; they expire with nothing
(profiles are few next to runs, and the stock is operator-managed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from provisioning.ledger.keys import Keys
from provisioning.ledger.metrics import ESIM_NOTIFICATIONS
from provisioning.ledger.records import hash_text, text
from provisioning.ledger.scripts import Scripts, source


class EsimState(StrEnum):
    RELEASED = "released"
    DOWNLOADED = "downloaded"
    INSTALLED = "installed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def label(self) -> str:
        """As the Order's field shows it (``ESIM_Status__c``'s picklist values)."""
        return self.value.capitalize()


class NotificationOutcome(StrEnum):
    UNKNOWN = "unknown"  # no Order of ours released this ICCID
    DUPLICATE = "duplicate"  # this (ICCID, point, timestamp) was recorded before
    RECORDED = "recorded"  # recorded; the state did not change (older, or a point that moves nothing)
    CHANGED = "changed"  # recorded, and the state changed


@dataclass(frozen=True)
class Noted:
    """What recording one notification did."""

    outcome: NotificationOutcome
    state: EsimState | None = None
    order_id: str | None = None


@dataclass(frozen=True)
class ProfileStatus:
    iccid: str
    order_id: str
    key: str  # the Order's effect key (its inventory claim)
    state: EsimState
    changed_at: float
    released_at: float
    reason: str | None = None
    # Every notification recorded: (point, timestamp in ms, its status), oldest first.
    notifications: tuple[tuple[int, int, str], ...] = ()


class EsimStatuses:
    """The eSIM profiles' states, one hash per ICCID."""

    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts) -> None:
        self._redis = client
        self._keys = keys
        self._scripts = scripts

    def _status_keys(self, iccid: str) -> list[str]:
        k = self._keys
        return [k.esim_status(iccid), k.esim_pending, k.esim_writeback, k.esim_states]

    # -- the eSIM step: its owner before downloadOrder, released at its end ---------------------------
    def register(self, iccid: str, order_id: str, key: str) -> None:
        """Before downloadOrder: the ICCID's Order, so that a notification that comes before the step's
        end (an eligibility or confirmation failure) finds it."""
        self._released(self._redis, iccid, order_id, key, "register")

    def queue_released(self, pipe: Any, iccid: str, order_id: str, key: str) -> None:
        """Queued on the eSIM step's end (``ctx.write_with_end``): the profile's state begins, once."""
        self._released(pipe, iccid, order_id, key, "release")

    def _released(self, writer: Any, iccid: str, order_id: str, key: str, what: str) -> None:
        k = self._keys
        keys = [k.esim_status(iccid), k.esim_pending, k.esim_states]
        writer.eval(source("esim_released"), len(keys), *keys, iccid, order_id, key, repr(time.time()), what)

    # -- notifications ----------------------------------------------------------------------------
    def note(
        self,
        iccid: str,
        point: int,
        timestamp_ms: int,
        point_status: str,
        wanted: EsimState | None,
        reason: str,
    ) -> Noted:
        """Record one notification once and move the state (one round trip, ``esim_notify.lua``)."""
        keys = [*self._status_keys(iccid), self._keys.metrics_counters]
        args = [
            str(point),
            str(timestamp_ms),
            point_status,
            wanted.value if wanted else "",
            reason,
            repr(time.time()),
            f"{ESIM_NOTIFICATIONS}|outcome=",
        ]
        reply = self._scripts["esim_notify"](keys=keys, args=args)
        kind = text(reply[0])
        if kind == "unknown":
            return Noted(NotificationOutcome.UNKNOWN)
        if kind == "duplicate":
            return Noted(NotificationOutcome.DUPLICATE, EsimState(text(reply[1])))
        changed = int(reply[1]) == 1
        return Noted(
            NotificationOutcome.CHANGED if changed else NotificationOutcome.RECORDED,
            EsimState(text(reply[2])),
            text(reply[3]) or None,
        )

    def cancelled(self, iccid: str) -> bool:
        """The profile was cancelled on the SM-DP+ (final); False when it was already, or never released."""
        keys = self._status_keys(iccid)
        return bool(self._scripts["esim_cancelled"](keys=keys, args=[iccid, repr(time.time())]))

    # -- reading ------------------------------------------------------------------------------------
    def get(self, iccid: str) -> ProfileStatus | None:
        data = hash_text(self._redis.hgetall(self._keys.esim_status(iccid)))
        return _decode(iccid, data) if "key" in data else None

    def get_many(self, iccids: Sequence[str]) -> list[ProfileStatus]:
        pipe = self._redis.pipeline(transaction=False)
        for iccid in iccids:
            pipe.hgetall(self._keys.esim_status(iccid))
        found = []
        for iccid, raw in zip(iccids, pipe.execute(), strict=True):
            data = hash_text(raw)
            if "key" in data:
                found.append(_decode(iccid, data))
        return found

    def pending(self, *, released_before: float, limit: int = 1000) -> list[ProfileStatus]:
        """Profiles released before ``released_before`` and not installed (nor cancelled), oldest first."""
        members = self._redis.zrangebyscore(
            self._keys.esim_pending, "-inf", released_before, start=0, num=limit
        )
        return self.get_many([text(m) for m in members])

    def counts(self) -> dict[str, int]:
        """Profiles per state (released, downloaded, installed, error, cancelled)."""
        raw = hash_text(self._redis.hgetall(self._keys.esim_states))
        return {state.value: int(raw.get(state.value, "0")) for state in EsimState}

    def count_pending(self, *, released_before: float) -> int:
        return int(self._redis.zcount(self._keys.esim_pending, "-inf", released_before))

    # -- the Orders' write-backs ------------------------------------------------------------------------
    def writebacks(self, limit: int = 100) -> list[tuple[str, float]]:
        """ICCIDs whose Order does not show their state yet, with the change's score, oldest first."""
        pairs: list[tuple[Any, float]] = self._redis.zrange(  # type: ignore[assignment]
            self._keys.esim_writeback, 0, limit - 1, withscores=True
        )
        return [(text(member), float(score)) for member, score in pairs]

    def written(self, iccid: str, score: float) -> bool:
        """The write-back of the change scored ``score`` is done (False: a newer change waits)."""
        reply = self._scripts["esim_written"](keys=[self._keys.esim_writeback], args=[iccid, repr(score)])
        return bool(reply)


def _decode(iccid: str, data: dict[str, str]) -> ProfileStatus:
    notes = []
    for field, value in data.items():
        if field.startswith("n:"):
            parts = field.split(":")
            notes.append((int(parts[1]), int(parts[2]), value))
    notes.sort(key=lambda n: (n[1], n[0]))
    return ProfileStatus(
        iccid=iccid,
        order_id=data.get("order_id", ""),
        key=data["key"],
        state=EsimState(data.get("state", EsimState.RELEASED.value)),
        changed_at=float(data.get("changed_at") or data.get("released_at") or "0"),
        released_at=float(data.get("released_at", "0")),
        reason=data.get("reason"),
        notifications=tuple(notes),
    )
