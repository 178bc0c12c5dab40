"""The operators' registries: failed runs, pending failure write-backs, stale runs, undelivered
e-mails, the quarantine of rejected events, and the list of recent runs.

Runs enter and leave the run registries through their own records' scripts
(:mod:`provisioning.ledger.runs`); this module reads them, and takes what the
reconciler and the listener hand it (a write-back done, events quarantined).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from provisioning.core.run_id import RunId
from provisioning.ledger.keys import Keys
from provisioning.ledger.metrics import FailureWriteback, RunMetrics
from provisioning.ledger.records import RunRecord, text
from provisioning.ledger.runs import Runs

# Quarantined events kept for operators.
QUARANTINE_MAX = 10_000
# The oldest unfinished run is looked for among this many least recently updated ones.
OLDEST_SCAN_MAX_RUNS = 1000


@dataclass(frozen=True)
class Sizes:
    """How many runs or Orders each registry holds, and the oldest unfinished run's creation time."""

    unfinished: int
    failed: int
    writebacks: int
    undelivered: int
    quarantined: int
    oldest_unfinished_created: float | None


class Registries:
    def __init__(self, client: redis.Redis, keys: Keys, runs: Runs, metrics: RunMetrics) -> None:
        self._redis = client
        self._keys = keys
        self._runs = runs
        self._metrics = metrics

    # -- failed runs and their write-backs --------------------------------------------------------
    def failed(self, since: float | None = None) -> list[RunRecord]:
        ids = self._redis.zrangebyscore(self._keys.failed, since if since is not None else "-inf", "+inf")
        return self._runs.get_many([text(i) for i in ids])

    def pending_writebacks(self, older_than_s: float, limit: int = 100) -> list[RunId]:
        """Failed runs whose Order may still not show Failed, failed at least ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        members = self._redis.zrangebyscore(self._keys.writeback, "-inf", cutoff, start=0, num=limit)
        return [RunId.parse(text(i)) for i in members]

    def awaiting_writeback(self, run_id: RunId) -> bool:
        return self._redis.zscore(self._keys.writeback, str(run_id)) is not None

    def writeback_done(self, run_id: RunId, *, written: bool = False) -> None:
        """The Order shows the run's failure (or no longer needs to).

        ``written``: a worker just wrote it (counted as ``failure_writebacks{outcome="written"}``, in the
        same round trip); the reconciler counts its own.
        """
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self._keys.writeback, str(run_id))
        if written:
            self._metrics.failure_writeback(pipe, FailureWriteback.WRITTEN)
        pipe.execute()

    # -- unfinished runs ---------------------------------------------------------------------------
    def stale(self, idle_s: float, limit: int = 500) -> list[RunId]:
        """Unfinished runs not updated for ``idle_s`` whose Order nobody holds: candidates to resume."""
        cutoff = time.time() - idle_s
        members = self._redis.zrangebyscore(self._keys.active, "-inf", cutoff, start=0, num=limit)
        ids = [RunId.parse(text(i)) for i in members]
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.exists(self._keys.lease(run_id.order_id))
        leased = pipe.execute()
        return [run_id for run_id, held in zip(ids, leased, strict=True) if not held]

    def unfinished(self) -> int:
        """How many runs are queued or running."""
        return int(self._redis.zcard(self._keys.active))

    def recent(self, *, since: float | None = None, limit: int) -> list[str]:
        """The most recent runs, newest first: those that began or ended since ``since``, and every
        unfinished or failed run updated since then (a run still queued has not begun)."""
        low = since if since is not None else "-inf"
        pipe = self._redis.pipeline(transaction=False)
        for key in (self._keys.runs, self._keys.active, self._keys.failed):
            pipe.zrevrangebyscore(key, "+inf", low, start=0, num=limit, withscores=True)
        scored: dict[str, float] = {}
        for members in pipe.execute():
            for member, score in members:
                scored[text(member)] = max(scored.get(text(member), 0.0), float(score))
        return sorted(scored, key=lambda m: scored[m], reverse=True)[:limit]

    # -- e-mails and events ------------------------------------------------------------------------
    def undelivered(self) -> list[tuple[str, float]]:
        """Orders whose welcome e-mail was refused, oldest first, with when."""
        members = self._redis.zrange(self._keys.undelivered, 0, -1, withscores=True)
        return [(text(item[0]), float(item[1])) for item in members]

    def quarantine(self, entries: list[dict[str, Any]]) -> None:
        """Keep rejected events for operators (newest first, the oldest dropped past QUARANTINE_MAX)."""
        if not entries:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(self._keys.quarantine, *(json.dumps(e) for e in entries))
        pipe.ltrim(self._keys.quarantine, 0, QUARANTINE_MAX - 1)
        pipe.execute()

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self._redis.lrange(self._keys.quarantine, 0, limit - 1)]

    # -- sizes, for the metrics --------------------------------------------------------------------
    def queue_sizes(self, pipe: Any) -> int:
        """Queue the reads :meth:`sizes` takes the answers of; returns how many."""
        for key in (self._keys.active, self._keys.failed, self._keys.writeback, self._keys.undelivered):
            pipe.zcard(key)
        pipe.llen(self._keys.quarantine)
        pipe.zrange(self._keys.active, 0, OLDEST_SCAN_MAX_RUNS - 1)
        return 6

    def sizes(self, answers: list[Any]) -> Sizes:
        unfinished, failed, writebacks, undelivered, quarantined, active = answers
        oldest = None
        if active:
            reader = self._redis.pipeline(transaction=False)
            for member in active:
                reader.hget(self._keys.run(text(member)), "created_at")
            created = [float(v) for v in reader.execute() if v is not None]
            oldest = min(created) if created else None
        return Sizes(unfinished, failed, writebacks, undelivered, quarantined, oldest)
