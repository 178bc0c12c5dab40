"""The Redis ledger: runs, the Orders' provisionings, leases and the operators' registries.

A *run* is one attempt at one Order (one event, one reconciler pass, one operator
action). A *provisioning* is what the Order got: its payment check, eSIM, WHMCS
order and e-mail, recorded once per Order (see :mod:`provisioning.step.chain`), so a
second run of the same Order reuses them instead of making them again. At most
one run of an Order acts at a time: the lease is the Order's, and a run that
finds another run of its Order in flight joins it.

Every key lives under the ``LEDGER_PREFIX`` namespace (``p`` below); this is the
one place they are defined:

==============================  ======  =================================================
key                             type    holds
==============================  ======  =================================================
``p:run:{run_id}``              hash    state, origin, timestamps, outcome; per step:
                                        attempts, last error; the run's own step results
``p:order:{order_id}``          hash    the Order's provisioning: generation, the run
                                        acting on it, step results, effect markers
                                        (intents, ICCID, outbox), the e-mail error
``p:order:{order_id}:runs``     zset    every run of the Order, scored by creation time
``p:order:{order_id}:snapshot`` string  JSON of the Order fields the steps need
                                        (personal data: deleted when the run is done)
``p:order:{order_id}:g{n}``     hash    provisioning ``n`` after ``provisioning reprovision``
``p:lease:{order_id}``          string  the lease holder's token, with expiry
``p:active``                    zset    unfinished runs, scored by last update (reconciler)
``p:failed``                    zset    failed runs, scored by failure time
``p:writeback``                 zset    failed runs whose Order may not show Failed yet (the
                                        reconciler writes it), scored by failure time
``p:undelivered``               zset    Orders whose welcome e-mail was refused, by time
``p:quarantine``                list    JSON of events the listener rejected (newest first)
``p:runs``                      zset    every run that began or ended, scored by when (the
                                        operators' list of runs; trimmed after the retention)
``p:metrics:*``                 —       run metrics (``provisioning.ledger.metrics``)
``p:listener:{channel}:*``      —       the listener's checkpoint, leader lock and leader
                                        (host, pid, since: ``...:leader``)
``p:esim:*``                    —       the eSIM inventory (``provisioning.esim.inventory``)
==============================  ======  =================================================

The listener records a run as ``queued`` (and in ``p:active``) before it publishes
the entry task, so that a task lost on its way (on a Redis broker, a worker killed
between its BRPOP and its unacked record loses the message) is republished by the
reconciler like any other stale run.

Finished runs and provisionings expire after the retention period (default 30
days, far beyond the 72 h replay window of the event bus, so a replayed event
still finds its run); failed ones stay until requeued or superseded. Beyond the
retention the Order itself is the record: a run that reads ``WHMCS_Order_ID__c``
on an Order the ledger forgot adopts those effects instead of making new ones.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script
from redis.lock import Lock

from provisioning.core.redis_client import execute_scripted, queue_script
from provisioning.core.run_id import RunId
from provisioning.ledger.metrics import FailureCause, RunMetrics, StepObservation
from provisioning.step.chain import ENTRY_STEP, STEPS, Step

if TYPE_CHECKING:  # high availability: what confirms a guarded write (guard_marker)
    from provisioning.core.replication import ReplicaWait

# KEYS: run, the Order's runs, active. ARGV: run id, now, origin, reason.
# A known run is left alone (0); 2: it is still queued (its task may never have been sent).
_ENQUEUE = """
if redis.call('HSETNX', KEYS[1], 'state', 'queued') == 0 then
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'updated_at', ARGV[2], 'origin', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# A step's start, in one round trip. KEYS: run, the Order's provisioning, the Order's lease, the
# Order's snapshot, active. ARGV: step, '1' when the Order records the step, lease token, lease ttl
# in ms, now, run id, a marker to set unless the Order has it ('' for none), its value. Returns {'ended', state} | {'done', result, state} (a run that has begun) | {'busy'} |
# {'go', state, attempts, run hash, provisioning hash, snapshot or false}.
_CLAIM_STEP = """
local state = redis.call('HGET', KEYS[1], 'state') or ''
if state == 'failed' or state == 'joined' or state == 'superseded' or state == 'skipped' then
  return {'ended', state}
end
local holder = KEYS[1]
if ARGV[2] == '1' then holder = KEYS[2] end
local done = redis.call('HGET', holder, 's:' .. ARGV[1])
-- A run that has not begun takes the lease even for a step the Order has done: it begins first.
if done and state ~= '' and state ~= 'queued' then return {'done', done, state} end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return {'busy'} end
-- A run that has not begun counts the step's attempt once it has (its beginning may not get that far).
local attempts = 0
if state ~= '' and state ~= 'queued' then
  attempts = redis.call('HINCRBY', KEYS[1], 'a:' .. ARGV[1], 1)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
  redis.call('ZADD', KEYS[5], 'XX', ARGV[5], ARGV[6])
end
if ARGV[7] ~= '' then redis.call('HSETNX', KEYS[2], 'x:' .. ARGV[7], ARGV[8]) end
return {'go', state, attempts, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('GET', KEYS[4])}
"""

# A step's end, in one round trip: its result recorded, the run finished after the last step, the
# lease released if still ours. KEYS: run, provisioning, lease, snapshot, active, failed, writeback,
# the Order's runs. ARGV: step, '1' when the Order records it, result JSON, lease token, now, run id,
# '1' to finish the run, retention in s.
_END_STEP = """
local holder = KEYS[1]
if ARGV[2] == '1' then holder = KEYS[2] end
redis.call('HSET', holder, 's:' .. ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished_at', ARGV[5])
  redis.call('HDEL', KEYS[1], 'failed_step', 'error')
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[6])
  redis.call('ZREM', KEYS[6], ARGV[6])
  redis.call('ZREM', KEYS[7], ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
  redis.call('EXPIRE', KEYS[8], ARGV[8])
end
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
return 1
"""

# A write a step queues for its end's round trip (``StepContext.write_with_end``): it gets the pipeline.
Write = Callable[[Any], object]

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
    JOINED = "joined"
    SUPERSEDED = "superseded"

    @property
    def unfinished(self) -> bool:
        return self in (RunState.QUEUED, RunState.RUNNING)


class Origin(StrEnum):
    """Who started a run."""

    EVENT = "event"
    RECONCILER = "reconciler"
    OPERATOR = "operator"


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
class Provisioning:
    """What the Order got: recorded once per Order, whichever run made it."""

    order_id: str
    gen: int = 1
    active: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)
    email_error: str | None = None

    @property
    def effect_key(self) -> str:
        """What every idempotency key of the Order's effects derives from (ICCID claim, WHMCS note,
        matchingId, Message-ID): the Order id, plus the generation after a deliberate reprovision."""
        return self.order_id if self.gen == 1 else f"{self.order_id}#{self.gen}"

    def step(self, step: Step) -> StepRecord:
        return self.steps.get(step.value) or StepRecord()

    @property
    def has_effects(self) -> bool:
        """An external effect exists, or may exist (an intent was recorded before a call)."""
        return any(self.step(s).done for s in (Step.ACTIVATE_ESIM, Step.CREATE_WHMCS_ORDER)) or any(
            name in self.markers for name in ("whmcs_intent", "esim_downloaded", "outbox")
        )


@dataclass
class RunRecord:
    run_id: RunId
    state: RunState
    created_at: float
    updated_at: float
    origin: Origin = Origin.EVENT
    reason: str | None = None
    note: str | None = None
    joined: str | None = None
    superseded_by: str | None = None
    failed_step: str | None = None
    error: str | None = None
    finished_at: float | None = None
    own_steps: dict[str, StepRecord] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def order_id(self) -> str:
        return self.run_id.order_id

    def step(self, step: Step, provisioning: Provisioning) -> StepRecord:
        """The step as this run sees it: the result from whoever holds it, this run's attempts."""
        mine = self.own_steps.get(step.value) or StepRecord()
        source = provisioning.step(step) if step.belongs_to_order else mine
        return StepRecord(
            result=source.result, at=source.at, attempts=mine.attempts, last_error=mine.last_error
        )

    def first_unfinished_step(self, provisioning: Provisioning) -> Step | None:
        return next((s for s in STEPS if not self.step(s, provisioning).done), None)

    def to_json(self, provisioning: Provisioning) -> dict[str, Any]:
        return {
            "run_id": str(self.run_id),
            "order_id": self.order_id,
            "state": self.state.value,
            "origin": self.origin.value,
            "reason": self.reason,
            "note": self.note,
            "joined": self.joined,
            "superseded_by": self.superseded_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "failed_step": self.failed_step,
            "error": self.error,
            "steps": {
                s.value: {
                    "done": rec.done,
                    "at": rec.at,
                    "result": rec.result,
                    "attempts": rec.attempts,
                    "last_error": rec.last_error,
                }
                for s, rec in ((s, self.step(s, provisioning)) for s in STEPS)
            },
        }


@dataclass
class StepClaim:
    """What :meth:`Ledger.claim_step` found: why the step does not run, or the lease and the records."""

    status: str  # "ended", "done", "busy" or "go"
    state: RunState | None = None  # None: the ledger has no run of this id
    result: dict[str, Any] | None = None  # "done": the recorded result
    attempts: int = 0
    run: RunRecord | None = None
    provisioning: Provisioning | None = None
    snapshot: dict[str, Any] | None = None
    lease: Lock | None = None


class NotRequeueable(Exception):
    """The run cannot be requeued (it did not fail); the message says why."""


class Ledger:
    """Run and provisioning records in Redis. Thread-safe: it holds only a redis-py client (a pool)."""

    def __init__(self, *, redis: redis.Redis, prefix: str, retention_s: int, lease_ttl_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention_s = retention_s
        self.lease_ttl_s = lease_ttl_s
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim_step = redis.register_script(_CLAIM_STEP)
        self._end_step = redis.register_script(_END_STEP)
        self.metrics = RunMetrics(prefix)

    # -- keys ------------------------------------------------------------------------------
    def run_key(self, run_id: RunId | str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def order_key(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}"

    def order_runs_key(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}:runs"

    def snapshot_key(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}:snapshot"

    def archive_key(self, order_id: str, gen: int) -> str:
        return f"{self.prefix}:order:{order_id}:g{gen}"

    def lease_key(self, order_id: str) -> str:
        return f"{self.prefix}:lease:{order_id}"

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
    def undelivered_key(self) -> str:
        return f"{self.prefix}:undelivered"

    @property
    def quarantine_key(self) -> str:
        return f"{self.prefix}:quarantine"

    @property
    def runs_key(self) -> str:
        return f"{self.prefix}:runs"

    def listener_key(self, channel: str, what: str) -> str:
        return f"{self.prefix}:listener:{channel}:{what}"

    # -- reading ---------------------------------------------------------------------------
    def get(self, run_id: RunId | str) -> RunRecord | None:
        rid = run_id if isinstance(run_id, RunId) else RunId.parse(run_id)
        raw = self.redis.hgetall(self.run_key(rid))
        return _decode_run(rid, {_str(k): _str(v) for k, v in raw.items()}) if raw else None

    def get_many(self, run_ids: list[str]) -> list[RunRecord]:
        """The runs the ledger still holds, in the order given: one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self.run_key(run_id))
        found = []
        for run_id, raw in zip(run_ids, pipe.execute(), strict=True):
            if raw:
                found.append(_decode_run(RunId.parse(run_id), {_str(k): _str(v) for k, v in raw.items()}))
        return found

    def run_ids(self, *, since: float | None = None, limit: int) -> list[str]:
        """The most recent runs, newest first: those that began or ended since ``since``, and every
        unfinished or failed run updated since then (a run still queued has not begun)."""
        low = since if since is not None else "-inf"
        pipe = self.redis.pipeline(transaction=False)
        for key in (self.runs_key, self.active_key, self.failed_key):
            pipe.zrevrangebyscore(key, "+inf", low, start=0, num=limit, withscores=True)
        scored: dict[str, float] = {}
        for members in pipe.execute():
            for member, score in members:
                scored[_str(member)] = max(scored.get(_str(member), 0.0), float(score))
        return sorted(scored, key=lambda m: scored[m], reverse=True)[:limit]

    def provisioning(self, order_id: str) -> Provisioning:
        """The Order's provisioning (empty when the ledger holds none)."""
        raw = self.redis.hgetall(self.order_key(order_id))
        return _decode_provisioning(order_id, {_str(k): _str(v) for k, v in raw.items()})

    def runs_for_order(self, order_id: str) -> list[RunId]:
        """Every run of the Order, oldest first."""
        return [RunId.parse(_str(m)) for m in self.redis.zrange(self.order_runs_key(order_id), 0, -1)]

    def runs_in_flight(self, order_id: str) -> list[RunId]:
        """The Order's runs that are queued or running."""
        members = [_str(m) for m in self.redis.zrange(self.order_runs_key(order_id), 0, -1)]
        if not members:
            return []
        scores = self.redis.zmscore(self.active_key, members)
        return [RunId.parse(m) for m, s in zip(members, scores, strict=True) if s is not None]

    def load_order(self, order_id: str) -> dict[str, Any]:
        raw = self.redis.get(self.snapshot_key(order_id))
        if raw is None:
            raise LookupError(f"Order {order_id} has no snapshot (no run of it is in flight)")
        data: dict[str, Any] = json.loads(raw)
        return data

    def marker(self, order_id: str, name: str) -> str | None:
        raw = self.redis.hget(self.order_key(order_id), f"x:{name}")
        return _str(raw) if raw is not None else None

    # -- a run's life ------------------------------------------------------------------------
    def enqueue(self, run_id: RunId | str, origin: Origin = Origin.EVENT, reason: str | None = None) -> bool:
        """Record a new run as queued, before its entry task is published.

        True: publish the entry task (a new run, or one still queued, whose task may never have
        been sent); False: the run started already (or ended), so the event is a duplicate.
        """
        run_id = run_id if isinstance(run_id, RunId) else RunId.parse(run_id)
        keys = [self.run_key(run_id), self.order_runs_key(run_id.order_id), self.active_key]
        return bool(
            self._enqueue(keys=keys, args=[str(run_id), repr(time.time()), origin.value, reason or ""])
        )

    def enqueue_many(self, run_ids: list[RunId], origin: Origin = Origin.EVENT) -> list[bool]:
        """:meth:`enqueue` for a batch of runs, in one pipeline (one round trip)."""
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=False)
        scripts: dict[int, tuple[Script, Sequence[str], Sequence[Any]]] = {}
        for index, run_id in enumerate(run_ids):
            keys = [self.run_key(run_id), self.order_runs_key(run_id.order_id), self.active_key]
            args = [str(run_id), now, origin.value, ""]
            queue_script(pipe, self._enqueue, keys, args)
            scripts[index] = (self._enqueue, keys, args)
        return [bool(answer) for answer in execute_scripted(pipe, scripts)]

    def start(
        self,
        run_id: RunId,
        order_snapshot: dict[str, Any],
        *,
        note: str | None = None,
        attempt: Step | None = None,
    ) -> tuple[RunRecord, int]:
        """The run acts on its Order now (called under the Order's lease).

        Returns the run as recorded and, with ``attempt``, that step's attempts counted so far
        (this one included: :meth:`record_attempt` in the same round trip).
        """
        now = repr(time.time())
        key = self.run_key(run_id)
        order_key = self.order_key(run_id.order_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"state": RunState.RUNNING.value, "updated_at": now, **_opt(note=note)})
        pipe.hsetnx(order_key, "gen", "1")
        pipe.hset(order_key, "active", str(run_id))
        # In flight again (a re-approval within the retention): nothing of it may expire now.
        pipe.persist(order_key)
        pipe.set(self.snapshot_key(run_id.order_id), json.dumps(order_snapshot))
        pipe.zadd(self.order_runs_key(run_id.order_id), {str(run_id): float(now)}, nx=True)
        pipe.persist(self.order_runs_key(run_id.order_id))
        pipe.zadd(self.active_key, {str(run_id): float(now)})
        pipe.zadd(self.runs_key, {str(run_id): float(now)}, nx=True)
        self.metrics.run_started(pipe)
        if attempt is not None:
            pipe.hincrby(key, f"a:{attempt}", 1)
        pipe.hgetall(key)
        replies = pipe.execute()
        attempts = int(replies[-2]) if attempt is not None else 0
        run = _decode_run(run_id, {_str(k): _str(v) for k, v in replies[-1].items()})
        return run, attempts

    def claim_step(self, run_id: RunId, step: Step, *, stamp: tuple[str, str] | None = None) -> StepClaim:
        """In one round trip: is the step to run, and if so the Order's lease and everything it reads.

        ``stamp`` (marker, value): set on the Order with the lease unless the Order has that marker
        already, so the step reads a value fixed at its Order's first try without a write of its own.
        """
        order_id = run_id.order_id
        token = uuid.uuid4().hex
        keys = self._step_keys(run_id)[:5]
        belongs = "1" if step.belongs_to_order else "0"
        now = repr(time.time())
        ttl_ms = str(self.lease_ttl_s * 1000)
        marker, value = stamp or ("", "")
        args = [step.value, belongs, token, ttl_ms, now, str(run_id), marker, value]
        reply = self._claim_step(keys=keys, args=args)
        status = _str(reply[0])
        if status == "ended":
            return StepClaim("ended", state=RunState(_str(reply[1])))
        if status == "done":
            state = _str(reply[2])
            return StepClaim(
                "done", state=RunState(state) if state else None, result=json.loads(reply[1])["result"]
            )
        if status == "busy":
            return StepClaim("busy")
        state = _str(reply[1])
        run_data = _pairs(reply[3])
        return StepClaim(
            "go",
            state=RunState(state) if state else None,
            attempts=int(reply[2]),
            run=_decode_run(run_id, run_data) if "state" in run_data else None,
            provisioning=_decode_provisioning(order_id, _pairs(reply[4])),
            snapshot=json.loads(reply[5]) if reply[5] else None,
            lease=self._held_lease(order_id, token),
        )

    def end_step(
        self,
        run_id: RunId,
        step: Step,
        result: dict[str, Any],
        lease: Lock,
        *,
        finish: bool,
        observed: StepObservation | None = None,
        markers: Mapping[str, str] | None = None,
        writes: Sequence[Write] = (),
        also_done: Mapping[Step, dict[str, Any]] | None = None,
    ) -> None:
        """Record the step's result (finishing the run after its last step) and give the lease back.

        One round trip: the step's ``markers`` and ``writes`` (before its result, so a result is
        never recorded without them), the results of the steps after it that have nothing to do for
        this Order (``also_done``: no task is sent for them), the script, and the metrics' counters.
        """
        now = time.time()
        keys = self._step_keys(run_id)
        value = json.dumps({"result": result, "at": now, "run": str(run_id)})
        token = lease.local.token
        args = [
            step.value,
            "1" if step.belongs_to_order else "0",
            value,
            _str(token) if token is not None else "",
            repr(now),
            str(run_id),
            "1" if finish else "0",
            str(self.retention_s),
        ]
        pipe = self.redis.pipeline(transaction=False)
        self._queue_pending(pipe, run_id.order_id, markers, writes)
        for skipped, skipped_result in (also_done or {}).items():
            holder = self.order_key(run_id.order_id) if skipped.belongs_to_order else keys[0]
            record = {"result": skipped_result, "at": now, "run": str(run_id)}
            pipe.hset(holder, f"s:{skipped.value}", json.dumps(record))
        script_at = len(pipe.command_stack)
        queue_script(pipe, self._end_step, keys, args)
        if observed is not None:
            self.metrics.step_done(pipe, observed)
        if finish:
            self.metrics.run_ended(pipe, RunState.DONE.value)
            pipe.zadd(self.runs_key, {str(run_id): now})
            pipe.zremrangebyscore(self.runs_key, "-inf", now - self.retention_s)
        execute_scripted(pipe, {script_at: (self._end_step, keys, args)})
        lease.local.token = None

    def _step_keys(self, run_id: RunId) -> list[str]:
        """KEYS of the step scripts, in their order (the claim takes the first five)."""
        order_id = run_id.order_id
        return [
            self.run_key(run_id),
            self.order_key(order_id),
            self.lease_key(order_id),
            self.snapshot_key(order_id),
            self.active_key,
            self.failed_key,
            self.writeback_key,
            self.order_runs_key(order_id),
        ]

    def _held_lease(self, order_id: str, token: str) -> Lock:
        """A redis-py Lock for a lease our script took: renew and release work on it as usual."""
        lock = self.lease(order_id)
        lock.local.token = token.encode()
        return lock

    def _end(self, pipe: Any, run_id: RunId, state: RunState, fields: dict[Any, Any]) -> None:
        """A run that never acted (or no longer will) leaves every registry and expires in time."""
        now = repr(time.time())
        key = self.run_key(run_id)
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"state": state.value, "updated_at": now, "finished_at": now, **fields})
        pipe.zadd(self.order_runs_key(run_id.order_id), {str(run_id): float(now)}, nx=True)
        pipe.zrem(self.active_key, str(run_id))
        pipe.expire(key, self.retention_s)
        pipe.zadd(self.runs_key, {str(run_id): float(now)}, nx=True)
        self.metrics.run_ended(pipe, state.value)

    def skip(self, run_id: RunId, reason: str) -> None:
        """The run was not started (the Order is not Activating, or not found)."""
        pipe = self.redis.pipeline(transaction=True)
        self._end(pipe, run_id, RunState.SKIPPED, {"note": reason[:ERROR_MAX_CHARS]})
        pipe.execute()

    def join(self, run_id: RunId, other: RunId) -> None:
        """Another run of the Order is in flight: this one is absorbed by it and does nothing."""
        pipe = self.redis.pipeline(transaction=True)
        note = f"joined run {other}, which was already provisioning the Order"
        self._end(pipe, run_id, RunState.JOINED, {"joined": str(other), "note": note})
        pipe.execute()

    def supersede(self, failed: RunId, by: RunId) -> None:
        """A failed run whose work a newer run of the same Order continues: no longer to requeue."""
        pipe = self.redis.pipeline(transaction=True)
        note = f"superseded by run {by}, which continued from its last finished step"
        self._end(pipe, failed, RunState.SUPERSEDED, {"superseded_by": str(by), "note": note})
        pipe.zrem(self.failed_key, str(failed))
        pipe.zrem(self.writeback_key, str(failed))
        pipe.execute()

    def record_attempt(self, run_id: RunId, step: Step | str) -> int:
        """Count an attempt of ``step`` (or of the run's beginning, ENTRY_STEP); the count so far."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.run_key(run_id), f"a:{step}", 1)
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        pipe.zadd(self.active_key, {str(run_id): now}, xx=True)
        attempts, _, _ = pipe.execute()
        return int(attempts)

    def record_error(
        self,
        run_id: RunId,
        step: Step | str,
        error: str,
        *,
        markers: Mapping[str, str] | None = None,
        writes: Sequence[Write] = (),
    ) -> None:
        """The step's last error, and the markers and writes of what it did before it failed (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        self._queue_pending(pipe, run_id.order_id, markers, writes)
        pipe.hset(self.run_key(run_id), f"e:{step}", error[:ERROR_MAX_CHARS])
        pipe.execute()

    def finish(self, run_id: RunId, *, note: str | None = None) -> None:
        """Done: drop the personal data, leave the ids, expire after the retention period."""
        now = repr(time.time())
        key = self.run_key(run_id)
        order_id = run_id.order_id
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"state": RunState.DONE.value, "updated_at": now, "finished_at": now, **_opt(note=note)},
        )
        pipe.hdel(key, "failed_step", "error")
        pipe.delete(self.snapshot_key(order_id))
        pipe.zrem(self.active_key, str(run_id))
        pipe.zrem(self.failed_key, str(run_id))
        pipe.zrem(self.writeback_key, str(run_id))
        for k in (key, self.order_key(order_id), self.order_runs_key(order_id)):
            pipe.expire(k, self.retention_s)
        self.metrics.run_ended(pipe, RunState.DONE.value)
        pipe.zremrangebyscore(self.runs_key, "-inf", float(now) - self.retention_s)
        pipe.execute()

    def fail(
        self,
        run_id: RunId,
        step: str,
        reason: str,
        *,
        cause: FailureCause = FailureCause.PERMANENT,
        observed: StepObservation | None = None,
    ) -> None:
        """Terminal failure: the run joins the failed registry and stays until requeued."""
        now = time.time()
        key = self.run_key(run_id)
        order_id = run_id.order_id
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
        for k in (key, self.order_key(order_id), self.order_runs_key(order_id), self.snapshot_key(order_id)):
            pipe.persist(k)
        pipe.zrem(self.active_key, str(run_id))
        pipe.zadd(self.failed_key, {str(run_id): now})
        # Until the Order shows Failed: the write-back can fail, or its worker die, after this.
        pipe.zadd(self.writeback_key, {str(run_id): now})
        self.metrics.run_failed(pipe, step, cause, observed)
        pipe.execute()

    def reopen(self, run_id: RunId, *, by: str | None = None) -> str:
        """Move a failed run back to running for a requeue; returns the step it resumes at.

        The last requeue is kept on the run (markers ``requeued_at``, ``requeued_by``, ``requeued_from``:
        the failure it ended), for the operators' timeline.
        """
        run = self.get(run_id)
        if run is None:
            raise NotRequeueable(f"run {run_id} is not in the ledger (unknown, or expired after retention)")
        if run.state is not RunState.FAILED:
            raise NotRequeueable(f"run {run_id} is {run.state.value}, not failed: nothing to requeue")
        step = self.resume_step(run)
        now = time.time()
        key = self.run_key(run_id)
        # A run that failed before it began (reading the Order) begins again from the start.
        state = RunState.QUEUED if step == ENTRY_STEP else RunState.RUNNING
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": state.value, "updated_at": repr(now)})
        requeued: dict[Any, Any] = {
            "x:requeued_at": repr(now),
            "x:requeued_from": f"{run.failed_step}: {run.error}",
        }
        pipe.hset(key, mapping={**requeued, **_opt(**{"x:requeued_by": by})})
        pipe.hdel(key, "failed_step", "error", *(f"a:{s.value}" for s in STEPS))
        pipe.zrem(self.failed_key, str(run_id))
        pipe.zrem(self.writeback_key, str(run_id))
        pipe.zadd(self.active_key, {str(run_id): now})
        self.metrics.run_requeued(pipe)
        pipe.execute()
        return step

    def resume_step(self, run: RunRecord) -> str:
        """Where a run goes on: from the start if it never began, else its first unfinished step."""
        if run.state is RunState.QUEUED or (run.state is RunState.FAILED and run.failed_step == ENTRY_STEP):
            return ENTRY_STEP
        step = run.first_unfinished_step(self.provisioning(run.order_id))
        return (step or STEPS[-1]).value

    def touch(self, run_id: RunId) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        pipe.zadd(self.active_key, {str(run_id): now}, xx=True)
        pipe.execute()

    # -- the Order's provisioning -------------------------------------------------------------
    def set_marker(self, order_id: str, name: str, value: str) -> None:
        self.redis.hset(self.order_key(order_id), f"x:{name}", value)

    def set_markers(self, order_id: str, markers: Mapping[str, str], writes: Sequence[Write] = ()) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._queue_pending(pipe, order_id, markers, writes)
        if pipe.command_stack:
            pipe.execute()

    def _queue_pending(
        self, pipe: Any, order_id: str, markers: Mapping[str, str] | None, writes: Sequence[Write]
    ) -> None:
        """What a step did before its end or its error, queued first in that round trip."""
        if markers:
            self._queue_markers(pipe, order_id, markers)
        for write in writes:
            write(pipe)

    def _queue_markers(self, pipe: Any, order_id: str, markers: Mapping[str, str]) -> None:
        pipe.hset(self.order_key(order_id), mapping={f"x:{k}": v for k, v in markers.items()})

    def incr_marker(self, order_id: str, name: str) -> int:
        return int(self.redis.hincrby(self.order_key(order_id), f"x:{name}", 1))

    # High availability: a marker an external effect follows, on a replica before it returns.
    def guard_marker(self, order_id: str, name: str, value: str, replicas: ReplicaWait) -> None:
        """``set_marker`` confirmed by a replica when there are replicas (see provisioning.core.replication)."""
        replicas.write(lambda pipe: pipe.hset(self.order_key(order_id), f"x:{name}", value))

    def adopt(self, run_id: RunId, results: dict[Step, dict[str, Any]], markers: dict[str, str]) -> None:
        """Record effects found on the Order itself (the ledger forgot them after its retention)."""
        now = time.time()
        mapping: dict[Any, Any] = {
            f"s:{step.value}": json.dumps({"result": result, "at": now, "run": "adopted from the Order"})
            for step, result in results.items()
        }
        mapping.update({f"x:{k}": v for k, v in markers.items()})
        self.redis.hset(self.order_key(run_id.order_id), mapping=mapping)

    def new_generation(self, order_id: str) -> int:
        """Archive the Order's provisioning and open the next one (a deliberate reprovision)."""
        current = self.provisioning(order_id)
        pipe = self.redis.pipeline(transaction=True)
        if self.redis.exists(self.order_key(order_id)):
            archive = self.archive_key(order_id, current.gen)
            pipe.rename(self.order_key(order_id), archive)
            pipe.expire(archive, self.retention_s)
        pipe.hset(self.order_key(order_id), "gen", str(current.gen + 1))
        pipe.execute()
        return current.gen + 1

    def email_refused(self, order_id: str, error: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.order_key(order_id), mapping={"x:outbox": "refused", "email_error": error[:ERROR_MAX_CHARS]}
        )
        pipe.zadd(self.undelivered_key, {order_id: time.time()})
        pipe.execute()

    def email_delivered(self, order_id: str, markers: Mapping[str, str] | None = None) -> None:
        """An operator's resend went out; ``markers``: what the send recorded (its outbox)."""
        pipe = self.redis.pipeline(transaction=True)
        if markers:
            self._queue_markers(pipe, order_id, markers)
        pipe.hdel(self.order_key(order_id), "email_error")
        pipe.zrem(self.undelivered_key, order_id)
        pipe.execute()

    def undelivered(self) -> list[tuple[str, float]]:
        """Orders whose welcome e-mail was refused, oldest first, with when."""
        members = self.redis.zrange(self.undelivered_key, 0, -1, withscores=True)
        return [(_str(item[0]), float(item[1])) for item in members]

    # -- registries ------------------------------------------------------------------------
    def writeback_done(self, run_id: RunId) -> None:
        """The Order shows the run's failure (or no longer needs to)."""
        self.redis.zrem(self.writeback_key, str(run_id))

    def pending_writebacks(self, older_than_s: float, limit: int = 100) -> list[RunId]:
        """Failed runs whose Order may still not show Failed, failed at least ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        members = self.redis.zrangebyscore(self.writeback_key, "-inf", cutoff, start=0, num=limit)
        return [RunId.parse(_str(i)) for i in members]

    def failed_runs(self, since: float | None = None) -> list[RunRecord]:
        ids = self.redis.zrangebyscore(self.failed_key, since if since is not None else "-inf", "+inf")
        runs = [self.get(_str(i)) for i in ids]
        return [r for r in runs if r is not None]

    def stale_runs(self, idle_s: float, limit: int = 500) -> list[RunId]:
        """Unfinished runs not updated for ``idle_s`` whose Order nobody holds: candidates to resume."""
        cutoff = time.time() - idle_s
        members = self.redis.zrangebyscore(self.active_key, "-inf", cutoff, start=0, num=limit)
        ids = [RunId.parse(_str(i)) for i in members]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.exists(self.lease_key(run_id.order_id))
        leased = pipe.execute()
        return [run_id for run_id, held in zip(ids, leased, strict=True) if not held]

    def quarantine(self, entry: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.quarantine_key, json.dumps(entry))
        pipe.ltrim(self.quarantine_key, 0, QUARANTINE_MAX - 1)
        pipe.execute()

    def quarantine_many(self, entries: list[dict[str, Any]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.quarantine_key, *(json.dumps(e) for e in entries))
        pipe.ltrim(self.quarantine_key, 0, QUARANTINE_MAX - 1)
        pipe.execute()

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(self.quarantine_key, 0, limit - 1)]

    # -- leases ----------------------------------------------------------------------------
    def lease(self, order_id: str) -> Lock:
        """The Order's lease (SET NX with expiry): one worker at a time acts on an Order."""
        lock: Lock = self.redis.lock(
            self.lease_key(order_id), timeout=self.lease_ttl_s, blocking=False, thread_local=False
        )
        return lock

    @contextmanager
    def holding(self, order_id: str) -> Iterator[Lock | None]:
        """Yield the acquired lease, or None when another worker holds it."""
        lock = self.lease(order_id)
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


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A hash as HGETALL answers it inside a script (a flat list), as text."""
    return {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _opt(**values: str | None) -> dict[Any, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _steps_and_markers(data: dict[str, str]) -> tuple[dict[str, StepRecord], dict[str, str]]:
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
    return steps, markers


def _decode_run(run_id: RunId, data: dict[str, str]) -> RunRecord:
    steps, markers = _steps_and_markers(data)
    return RunRecord(
        run_id=run_id,
        state=RunState(data.get("state", RunState.QUEUED.value)),
        created_at=float(data.get("created_at", 0.0)),
        updated_at=float(data.get("updated_at", 0.0)),
        origin=Origin(data.get("origin", Origin.EVENT.value)),
        reason=data.get("reason"),
        note=data.get("note"),
        joined=data.get("joined"),
        superseded_by=data.get("superseded_by"),
        failed_step=data.get("failed_step"),
        error=data.get("error"),
        finished_at=float(data["finished_at"]) if "finished_at" in data else None,
        own_steps=steps,
        markers=markers,
    )


def _decode_provisioning(order_id: str, data: dict[str, str]) -> Provisioning:
    steps, markers = _steps_and_markers(data)
    return Provisioning(
        order_id=order_id,
        gen=int(data.get("gen", "1")),
        active=data.get("active"),
        steps=steps,
        markers=markers,
        email_error=data.get("email_error"),
    )
