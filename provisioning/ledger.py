"""The Redis step ledger: run state, per-step results, run leases and the failed-runs registry.

Every key lives under the ``LEDGER_PREFIX`` namespace (``p`` below); this is the
one place they are defined:

==============================  ======  =================================================
key                             type    holds
==============================  ======  =================================================
``p:run:{run_id}``              hash    state, timestamps, per step: result, time,
                                        attempts, last error; markers (intents, outbox)
``p:run:{run_id}:order``        string  JSON snapshot of the Order the steps need
                                        (personal data: deleted when the run is done)
``p:lease:{run_id}``            string  the lease holder's token, with expiry
``p:active``                    zset    unfinished runs, scored by last update (reconciler)
``p:failed``                    zset    failed runs, scored by failure time
``p:writeback``                 zset    failed runs whose Order may not show Failed yet (the
                                        reconciler writes it), scored by failure time
``p:order:{order_id}``          set     run ids of one Order (``provisioning status``)
``p:quarantine``                list    JSON of events the listener rejected (newest first)
``p:listener:{channel}:*``      —       the listener's checkpoint and leader lock
``p:esim:*``                    —       the eSIM inventory (``provisioning.esim.inventory``)
==============================  ======  =================================================

The listener records a run as ``queued`` (and in ``p:active``) before it publishes
the entry task, so that a task lost on its way (on a Redis broker, a worker killed
between its BRPOP and its unacked record loses the message) is republished by the
reconciler like any other stale run.

A done or skipped run expires after the retention period (default 30 days, far
beyond the 72 h replay window of the event bus, so a replayed event still finds
its run); a failed run stays until it is requeued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from redis.lock import Lock

STEPS: tuple[str, ...] = (
    "validate_payment",
    "activate_esim",
    "create_whmcs_order",
    "update_salesforce",
    "send_email",
)

# KEYS: run, the Order's runs, active. ARGV: run id, now. A known run is left alone; 2: it is still queued.
_ENQUEUE = """
if redis.call('HSETNX', KEYS[1], 'state', 'queued') == 0 then
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# Quarantined events kept for operators.
QUARANTINE_MAX = 10_000
# The longest error text kept per step (the Order's field is short anyway).
ERROR_MAX_CHARS = 500


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


UNFINISHED = (RunState.QUEUED, RunState.RUNNING)


def parse_run_id(run_id: str) -> tuple[str, str]:
    """Split ``{OrderId}:{IdemKey}`` into its parts."""
    order_id, sep, idem_key = run_id.partition(":")
    if not sep or len(order_id) != 18 or not idem_key:
        raise ValueError(f"not a run id (expected '<18-char OrderId>:<IdemKey>'): {run_id!r}")
    return order_id, idem_key


def make_run_id(order_id: str, idem_key: str | None) -> str:
    return f"{order_id}:{idem_key or 'default'}"


@dataclass
class StepRecord:
    result: dict[str, Any] | None = None
    at: float | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def done(self) -> bool:
        return self.at is not None


@dataclass
class RunRecord:
    run_id: str
    state: RunState
    created_at: float
    updated_at: float
    failed_step: str | None = None
    error: str | None = None
    finished_at: float | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def order_id(self) -> str:
        return self.run_id.split(":", 1)[0]

    def step(self, name: str) -> StepRecord:
        return self.steps.get(name) or StepRecord()

    def first_unfinished_step(self) -> str | None:
        for name in STEPS:
            if not self.step(name).done:
                return name
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "order_id": self.order_id,
            "state": self.state.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "failed_step": self.failed_step,
            "error": self.error,
            "steps": {
                name: {
                    "done": rec.done,
                    "at": rec.at,
                    "result": rec.result,
                    "attempts": rec.attempts,
                    "last_error": rec.last_error,
                }
                for name, rec in ((n, self.step(n)) for n in STEPS)
            },
        }


class NotRequeueable(Exception):
    """The run cannot be requeued (it did not fail); the message says why."""


class Ledger:
    """Run records in Redis. Thread-safe: it holds only a redis-py client (a connection pool)."""

    def __init__(self, *, redis: redis.Redis, prefix: str, retention_s: int, lease_ttl_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention_s = retention_s
        self.lease_ttl_s = lease_ttl_s

    # -- keys ------------------------------------------------------------------------------
    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def order_snapshot_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:order"

    def lease_key(self, run_id: str) -> str:
        return f"{self.prefix}:lease:{run_id}"

    def order_runs_key(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:active"

    @property
    def failed_key(self) -> str:
        return f"{self.prefix}:failed"

    @property
    def writeback_key(self) -> str:
        return f"{self.prefix}:writeback"

    @property
    def quarantine_key(self) -> str:
        return f"{self.prefix}:quarantine"

    def listener_key(self, channel: str, what: str) -> str:
        return f"{self.prefix}:listener:{channel}:{what}"

    # -- reading ---------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        raw = self.redis.hgetall(self.run_key(run_id))
        return _decode_run(run_id, {_str(k): _str(v) for k, v in raw.items()}) if raw else None

    def runs_for_order(self, order_id: str) -> list[str]:
        return sorted(_str(m) for m in self.redis.smembers(self.order_runs_key(order_id)))

    def load_order(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.get(self.order_snapshot_key(run_id))
        if raw is None:
            raise LookupError(f"run {run_id} has no Order snapshot (it never started, or it is done)")
        data: dict[str, Any] = json.loads(raw)
        return data

    def marker(self, run_id: str, name: str) -> str | None:
        raw = self.redis.hget(self.run_key(run_id), f"x:{name}")
        return _str(raw) if raw is not None else None

    def step_result(self, run_id: str, step: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.run_key(run_id), f"s:{step}")
        if raw is None:
            return None
        result: dict[str, Any] = json.loads(raw)["result"]
        return result

    # -- writing ---------------------------------------------------------------------------
    def enqueue(self, run_id: str) -> bool:
        """Record a new run as queued, before its entry task is published.

        True: publish the entry task (a new run, or one still queued, whose task may never have
        been sent); False: the run started already (or ended), so the event is a duplicate.
        """
        now = repr(time.time())
        keys = [self.run_key(run_id), self.order_runs_key(run_id.split(":", 1)[0]), self.active_key]
        return bool(self.redis.eval(_ENQUEUE, 3, *keys, run_id, now))

    def start(self, run_id: str, order_snapshot: dict[str, Any]) -> None:
        """Record a run as running with its Order snapshot (called once per run, under its lease)."""
        now = time.time()
        order_id = run_id.split(":", 1)[0]
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", repr(now))
        pipe.hset(key, mapping={"state": RunState.RUNNING.value, "updated_at": repr(now)})
        pipe.set(self.order_snapshot_key(run_id), json.dumps(order_snapshot))
        pipe.sadd(self.order_runs_key(order_id), run_id)
        pipe.zadd(self.active_key, {run_id: now})
        pipe.execute()

    def skip(self, run_id: str, reason: str) -> None:
        """Record a run that was not started (e.g. the Order is not Activating)."""
        now = time.time()
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", repr(now))
        pipe.hset(
            key,
            mapping={
                "state": RunState.SKIPPED.value,
                "updated_at": repr(now),
                "error": reason[:ERROR_MAX_CHARS],
            },
        )
        pipe.sadd(self.order_runs_key(run_id.split(":", 1)[0]), run_id)
        pipe.zrem(self.active_key, run_id)
        pipe.expire(key, self.retention_s)
        pipe.execute()

    def set_marker(self, run_id: str, name: str, value: str) -> None:
        self.redis.hset(self.run_key(run_id), mapping={f"x:{name}": value, "updated_at": repr(time.time())})

    def incr_marker(self, run_id: str, name: str) -> int:
        return int(self.redis.hincrby(self.run_key(run_id), f"x:{name}", 1))

    def record_attempt(self, run_id: str, step: str) -> int:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.run_key(run_id), f"a:{step}", 1)
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        pipe.zadd(self.active_key, {run_id: now}, xx=True)
        attempts, _, _ = pipe.execute()
        return int(attempts)

    def record_step(self, run_id: str, step: str, result: dict[str, Any]) -> None:
        now = time.time()
        self.redis.hset(
            self.run_key(run_id),
            mapping={f"s:{step}": json.dumps({"result": result, "at": now}), "updated_at": repr(now)},
        )

    def record_error(self, run_id: str, step: str, error: str) -> None:
        self.redis.hset(self.run_key(run_id), f"e:{step}", error[:ERROR_MAX_CHARS])

    def finish(self, run_id: str) -> None:
        """Done: drop the personal data, leave the ids, expire after the retention period."""
        now = time.time()
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key, mapping={"state": RunState.DONE.value, "updated_at": repr(now), "finished_at": repr(now)}
        )
        pipe.hdel(key, "failed_step", "error")
        pipe.delete(self.order_snapshot_key(run_id))
        pipe.zrem(self.active_key, run_id)
        pipe.zrem(self.failed_key, run_id)
        pipe.zrem(self.writeback_key, run_id)
        pipe.expire(key, self.retention_s)
        pipe.expire(self.order_runs_key(run_id.split(":", 1)[0]), self.retention_s)
        pipe.execute()

    def fail(self, run_id: str, step: str, reason: str) -> None:
        """Terminal failure: the run joins the failed registry and stays until requeued."""
        now = time.time()
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "state": RunState.FAILED.value,
                "failed_step": step,
                "error": reason[:ERROR_MAX_CHARS],
                "updated_at": repr(now),
                f"e:{step}": reason[:ERROR_MAX_CHARS],
            },
        )
        pipe.persist(key)
        pipe.persist(self.order_snapshot_key(run_id))
        pipe.zrem(self.active_key, run_id)
        pipe.zadd(self.failed_key, {run_id: now})
        # Until the Order shows Failed: the write-back can fail, or its worker die, after this.
        pipe.zadd(self.writeback_key, {run_id: now})
        pipe.execute()

    def reopen(self, run_id: str) -> str:
        """Move a failed run back to running for a requeue; returns the step it resumes at."""
        run = self.get(run_id)
        if run is None:
            raise NotRequeueable(f"run {run_id} is not in the ledger (unknown, or expired after retention)")
        if run.state is not RunState.FAILED:
            raise NotRequeueable(f"run {run_id} is {run.state.value}, not failed: nothing to requeue")
        step = run.failed_step or run.first_unfinished_step() or STEPS[-1]
        now = time.time()
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": RunState.RUNNING.value, "updated_at": repr(now)})
        pipe.hdel(key, "failed_step", "error", *(f"a:{s}" for s in STEPS))
        pipe.zrem(self.failed_key, run_id)
        pipe.zrem(self.writeback_key, run_id)
        pipe.zadd(self.active_key, {run_id: now})
        pipe.execute()
        return step

    def writeback_done(self, run_id: str) -> None:
        """The Order shows the run's failure (or no longer needs to)."""
        self.redis.zrem(self.writeback_key, run_id)

    def pending_writebacks(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Failed runs whose Order may still not show Failed, failed at least ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        return [
            _str(i) for i in self.redis.zrangebyscore(self.writeback_key, "-inf", cutoff, start=0, num=limit)
        ]

    def touch(self, run_id: str) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        pipe.zadd(self.active_key, {run_id: now}, xx=True)
        pipe.execute()

    # -- registries ------------------------------------------------------------------------
    def failed_runs(self, since: float | None = None) -> list[RunRecord]:
        ids = self.redis.zrangebyscore(self.failed_key, since if since is not None else "-inf", "+inf")
        runs = [self.get(_str(i)) for i in ids]
        return [r for r in runs if r is not None]

    def stale_runs(self, idle_s: float, limit: int = 500) -> list[str]:
        """Unfinished runs not updated for ``idle_s`` and not leased: candidates to resume."""
        cutoff = time.time() - idle_s
        ids = [_str(i) for i in self.redis.zrangebyscore(self.active_key, "-inf", cutoff, start=0, num=limit)]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.exists(self.lease_key(run_id))
        leased = pipe.execute()
        return [run_id for run_id, held in zip(ids, leased, strict=True) if not held]

    def quarantine(self, entry: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.quarantine_key, json.dumps(entry))
        pipe.ltrim(self.quarantine_key, 0, QUARANTINE_MAX - 1)
        pipe.execute()

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(self.quarantine_key, 0, limit - 1)]

    # -- leases ----------------------------------------------------------------------------
    def lease(self, run_id: str) -> Lock:
        """The run's lease (SET NX with expiry): one worker at a time acts on a run."""
        lock: Lock = self.redis.lock(
            self.lease_key(run_id), timeout=self.lease_ttl_s, blocking=False, thread_local=False
        )
        return lock

    @contextmanager
    def holding(self, run_id: str) -> Iterator[Lock | None]:
        """Yield the acquired lease, or None when another worker holds it."""
        lock = self.lease(run_id)
        if not lock.acquire(blocking=False):
            yield None
            return
        try:
            yield lock
        finally:
            # It may have expired while we worked; then someone else may hold it, and it is theirs.
            with suppress(redis.exceptions.LockError):
                lock.release()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_run(run_id: str, data: dict[str, str]) -> RunRecord:
    steps: dict[str, StepRecord] = {}
    markers: dict[str, str] = {}
    for key, value in data.items():
        kind, _, name = key.partition(":")
        if not name:
            continue
        if kind == "x":
            markers[name] = value
            continue
        rec = steps.setdefault(name, StepRecord())
        if kind == "s":
            payload = json.loads(value)
            rec.result, rec.at = payload["result"], payload["at"]
        elif kind == "a":
            rec.attempts = int(value)
        elif kind == "e":
            rec.last_error = value
    return RunRecord(
        run_id=run_id,
        state=RunState(data.get("state", RunState.QUEUED.value)),
        created_at=float(data.get("created_at", 0.0)),
        updated_at=float(data.get("updated_at", 0.0)),
        failed_step=data.get("failed_step"),
        error=data.get("error"),
        finished_at=float(data["finished_at"]) if "finished_at" in data else None,
        steps=steps,
        markers=markers,
    )
