"""Runs: one attempt at one Order each, from queued through its steps to its one ending.

A run is recorded as queued before its first task is published (so a task lost
on its way is found by the reconciler like any stale run), begins under its
Order's lease in its first step, claims and ends each step in one round trip
each, and ends once, through ``end_run.lua``: done, skipped, joined, superseded
or failed. The metrics' counters ride in the same round trips.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.lock import Lock

from provisioning.core.run_id import RunId
from provisioning.ledger.keys import Keys
from provisioning.ledger.leases import Leases
from provisioning.ledger.metrics import FailureCause, RunMetrics, StepObservation
from provisioning.ledger.records import (
    ClaimStatus,
    NotRequeueable,
    Origin,
    Recorded,
    RunRecord,
    RunState,
    StepClaim,
    decode_provisioning,
    decode_run,
    hash_text,
    pairs,
    step_record_json,
    text,
)
from provisioning.ledger.scripts import Batch, Scripts

if TYPE_CHECKING:
    from provisioning.ledger.orders import Orders

# The longest error text kept per step (the Order's field is short anyway).
ERROR_MAX_CHARS = 500

# What claim_step.lua answers when the Order was cancelled (the claim ends the run: ClaimStatus.ENDED).
CANCELLED_REPLY = "cancelled"

# A write a step queues for its end's round trip (``StepContext.write_with_end``): it gets the pipeline.
Write = Any


class Runs:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        scripts: Scripts,
        metrics: RunMetrics,
        leases: Leases,
        orders: Orders,
        retention_s: int,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._scripts = scripts
        self._metrics = metrics
        self._leases = leases
        self._orders = orders
        self.retention_s = retention_s

    # -- reading -------------------------------------------------------------------------------
    def get(self, run_id: RunId | str) -> RunRecord | None:
        rid = run_id if isinstance(run_id, RunId) else RunId.parse(run_id)
        raw = self._redis.hgetall(self._keys.run(rid))
        return decode_run(rid, hash_text(raw)) if raw else None

    def get_many(self, run_ids: Sequence[RunId | str]) -> list[RunRecord]:
        """The runs the ledger still holds, in the order given: one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self._keys.run(run_id))
        found = []
        for run_id, raw in zip(run_ids, pipe.execute(), strict=True):
            if raw:
                rid = run_id if isinstance(run_id, RunId) else RunId.parse(run_id)
                found.append(decode_run(rid, hash_text(raw)))
        return found

    # -- queued ----------------------------------------------------------------------------------
    def enqueue(self, run_id: RunId | str, origin: Origin = Origin.EVENT, reason: str | None = None) -> bool:
        """Record a new run as queued, before its first task is published.

        True: publish it (a new run, or one still queued, whose task may never have been sent);
        False: the run began already (or ended), so the event is a duplicate.
        """
        rid = run_id if isinstance(run_id, RunId) else RunId.parse(run_id)
        return self.enqueue_many([rid], origin, reason)[0]

    def enqueue_many(
        self, run_ids: Sequence[RunId], origin: Origin = Origin.EVENT, reason: str | None = None
    ) -> list[bool]:
        """:meth:`enqueue` for a batch of runs, in one round trip."""
        now = repr(time.time())
        batch = Batch(self._redis, self._scripts)
        for run_id in run_ids:
            keys = [self._keys.run(run_id), self._keys.order_runs(run_id.order_id), self._keys.active]
            batch.script("enqueue", keys, [str(run_id), now, origin.value, reason or ""])
        return [bool(answer) for answer in batch.execute()]

    # -- a step ------------------------------------------------------------------------------------
    def claim(
        self,
        run_id: RunId,
        step: str,
        *,
        owned_by_order: bool,
        stamp: tuple[str, str] | None = None,
        cancellable: bool = True,
    ) -> StepClaim:
        """In one round trip: is the step to run, and if so the Order's lease and everything it reads.

        ``stamp`` (marker, value): set on the Order with the lease unless the Order has that marker
        already, so the step reads a value fixed at its Order's first try without a write of its own.

        ``cancellable`` (a forward step): an Order cancelled since (``Orders.request_cancel``) ends the
        run here, as ``cancelled``, before any further effect; the claim answers ENDED. A step of the
        cancellation itself claims with ``cancellable=False``.
        """
        order_id = run_id.order_id
        token = uuid.uuid4().hex
        keys = [
            self._keys.run(run_id),
            self._keys.order(order_id),
            self._keys.lease(order_id),
            self._keys.snapshot(order_id),
            self._keys.active,
        ]
        marker, value = stamp or ("", "")
        args = [
            step,
            "1" if owned_by_order else "0",
            token,
            str(self._leases.ttl_s * 1000),
            repr(time.time()),
            str(run_id),
            marker,
            value,
            "1" if cancellable else "0",
        ]
        reply = self._scripts["claim_step"](keys=keys, args=args)
        if text(reply[0]) == CANCELLED_REPLY:
            # A second round trip, idempotent: a worker dying before it leaves the run unfinished, and
            # its next claim (a redelivery, the reconciler) answers the same.
            self.cancel(run_id)
            return StepClaim(ClaimStatus.ENDED, state=RunState.CANCELLED)
        status = ClaimStatus(text(reply[0]))
        if status is ClaimStatus.ENDED:
            return StepClaim(status, state=RunState(text(reply[1])))
        if status is ClaimStatus.DONE:
            state = text(reply[2])
            return StepClaim(
                status, state=RunState(state) if state else None, result=json.loads(reply[1])["result"]
            )
        if status is ClaimStatus.BUSY:
            return StepClaim(status)
        state = text(reply[1])
        run_data = pairs(reply[3])
        return StepClaim(
            status,
            state=RunState(state) if state else None,
            attempts=int(reply[2]),
            run=decode_run(run_id, run_data) if "state" in run_data else None,
            provisioning=decode_provisioning(order_id, pairs(reply[4])),
            snapshot=json.loads(reply[5]) if reply[5] else None,
            lease=self._leases.held(order_id, token),
        )

    def end_step(
        self,
        run_id: RunId,
        done: Recorded,
        lease: Lock,
        *,
        finish: bool,
        observed: StepObservation | None = None,
        markers: Mapping[str, str] | None = None,
        writes: Sequence[Write] = (),
        also_done: Sequence[Recorded] = (),
    ) -> None:
        """Record the step's result (ending the run done after its last step) and give the lease back.

        One round trip: the step's ``markers`` and ``writes`` (before its result, so a result is
        never recorded without them), the results of the steps after it that have nothing to do for
        this Order (``also_done``: no task is sent for them), the script, the run's end, and the
        metrics' counters.
        """
        now = time.time()
        token = lease.local.token
        batch = Batch(self._redis, self._scripts)
        self._orders.queue_pending(batch.pipe, run_id.order_id, markers, writes)
        for skipped in also_done:
            batch.pipe.hset(
                self._holder(run_id, skipped),
                f"s:{skipped.step}",
                step_record_json(skipped.result, now, run_id),
            )
        batch.script(
            "end_step",
            [self._keys.run(run_id), self._holder(run_id, done), self._keys.lease(run_id.order_id)],
            [
                done.step,
                step_record_json(done.result, now, run_id),
                text(token) if token is not None else "",
                repr(now),
            ],
        )
        if observed is not None:
            self._metrics.step_done(batch.pipe, observed)
        if finish:
            self._queue_end(batch, run_id, RunState.DONE, now)
        batch.execute()
        lease.local.token = None

    def _holder(self, run_id: RunId, recorded: Recorded) -> str:
        return self._keys.order(run_id.order_id) if recorded.owned_by_order else self._keys.run(run_id)

    def record_attempt(self, run_id: RunId, step: str) -> int:
        """Count an attempt of ``step`` (or of the run's beginning, BEGIN); the count so far."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self._keys.run(run_id), f"a:{step}", 1)
        pipe.hset(self._keys.run(run_id), "updated_at", repr(now))
        pipe.zadd(self._keys.active, {str(run_id): now}, xx=True)
        attempts, _, _ = pipe.execute()
        return int(attempts)

    def record_error(
        self,
        run_id: RunId,
        step: str,
        error: str,
        *,
        markers: Mapping[str, str] | None = None,
        writes: Sequence[Write] = (),
    ) -> None:
        """The step's last error, and the markers and writes of what it did before it failed (one round trip)."""
        pipe = self._redis.pipeline(transaction=False)
        self._orders.queue_pending(pipe, run_id.order_id, markers, writes)
        pipe.hset(self._keys.run(run_id), f"e:{step}", error[:ERROR_MAX_CHARS])
        pipe.execute()

    def touch(self, run_id: RunId) -> None:
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._keys.run(run_id), "updated_at", repr(now))
        pipe.zadd(self._keys.active, {str(run_id): now}, xx=True)
        pipe.execute()

    # -- its beginning -----------------------------------------------------------------------------
    def begin(
        self, run_id: RunId, snapshot: dict[str, Any], *, note: str | None = None, attempt: str | None = None
    ) -> tuple[RunRecord, int]:
        """The run acts on its Order now (called under the Order's lease).

        Returns the run as recorded and, with ``attempt``, that step's attempts counted so far
        (this one included, in the same round trip).
        """
        now = repr(time.time())
        key = self._keys.run(run_id)
        order_id = run_id.order_id
        order_key = self._keys.order(order_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"state": RunState.RUNNING.value, "updated_at": now, **_given(note=note)})
        pipe.hsetnx(order_key, "gen", "1")
        pipe.hset(order_key, "active", str(run_id))
        # In flight again (a re-approval within the retention): nothing of it may expire now.
        pipe.persist(order_key)
        pipe.set(self._keys.snapshot(order_id), json.dumps(snapshot))
        pipe.zadd(self._keys.order_runs(order_id), {str(run_id): float(now)}, nx=True)
        pipe.persist(self._keys.order_runs(order_id))
        pipe.zadd(self._keys.active, {str(run_id): float(now)})
        pipe.zadd(self._keys.runs, {str(run_id): float(now)}, nx=True)
        self._metrics.run_started(pipe)
        if attempt is not None:
            pipe.hincrby(key, f"a:{attempt}", 1)
        pipe.hgetall(key)
        replies = pipe.execute()
        attempts = int(replies[-2]) if attempt is not None else 0
        return decode_run(run_id, hash_text(replies[-1])), attempts

    # -- its ending: every one through end_run.lua -----------------------------------------------------
    def finish(self, run_id: RunId, *, note: str | None = None) -> None:
        """Done: the personal data goes, the ids stay, all of it expires after the retention period."""
        self._end(run_id, RunState.DONE, note=note)

    def skip(self, run_id: RunId, reason: str) -> None:
        """The run was not started (the Order is not Activating, or not found)."""
        self._end(run_id, RunState.SKIPPED, note=reason[:ERROR_MAX_CHARS])

    def join(self, run_id: RunId, other: RunId) -> None:
        """Another run of the Order is in flight: this one is absorbed by it and does nothing."""
        note = f"joined run {other}, which was already provisioning the Order"
        self._end(run_id, RunState.JOINED, note=note, joined=str(other))

    def cancel(self, run_id: RunId) -> None:
        """The Order was cancelled: the run stops where it is (from unfinished, or from failed)."""
        self._end(run_id, RunState.CANCELLED, note="cancelled: the Order was cancelled; no further effect")

    def start(self, run_id: RunId, *, attempt: str) -> tuple[RunRecord, int]:
        """A run that acts without beginning as a provisioning does (the cancellation's own run):
        running, in the unfinished runs and the operators' list; the Order's active run, snapshot and
        generation are left alone. Returns the run and ``attempt``'s attempts so far (this one counted)."""
        now = repr(time.time())
        key = self._keys.run(run_id)
        order_id = run_id.order_id
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"state": RunState.RUNNING.value, "updated_at": now})
        pipe.zadd(self._keys.order_runs(order_id), {str(run_id): float(now)}, nx=True)
        pipe.persist(self._keys.order_runs(order_id))
        pipe.zadd(self._keys.active, {str(run_id): float(now)})
        pipe.zadd(self._keys.runs, {str(run_id): float(now)}, nx=True)
        pipe.hincrby(key, f"a:{attempt}", 1)
        pipe.hgetall(key)
        replies = pipe.execute()
        return decode_run(run_id, hash_text(replies[-1])), int(replies[-2])

    def supersede(self, failed: RunId, by: RunId) -> None:
        """A failed run whose work a newer run of the same Order continues: no longer to requeue."""
        note = f"superseded by run {by}, which continued from its last finished step"
        self._end(failed, RunState.SUPERSEDED, note=note, superseded_by=str(by))

    def fail(
        self,
        run_id: RunId,
        step: str,
        reason: str,
        *,
        cause: FailureCause = FailureCause.PERMANENT,
        observed: StepObservation | None = None,
    ) -> None:
        """Terminal failure: the run joins the failed registry (and the write-backs) until requeued."""
        batch = Batch(self._redis, self._scripts)
        self._queue_end(
            batch, run_id, RunState.FAILED, time.time(), failed_step=step, error=reason[:ERROR_MAX_CHARS]
        )
        self._metrics.run_failed(batch.pipe, step, cause, observed)
        batch.execute()

    def _end(self, run_id: RunId, state: RunState, **fields: str | None) -> None:
        batch = Batch(self._redis, self._scripts)
        self._queue_end(batch, run_id, state, time.time(), **fields)
        batch.execute()

    def _queue_end(
        self, batch: Batch, run_id: RunId, state: RunState, now: float, **fields: str | None
    ) -> None:
        args = {
            "run_id": str(run_id),
            "state": state.value,
            "now": repr(now),
            "retention_s": self.retention_s,
            **_given(**fields),
        }
        batch.script("end_run", self._keys.end_run(run_id), [json.dumps(args)])
        if state is not RunState.FAILED:
            self._metrics.run_ended(batch.pipe, state.value)

    # -- a requeue -------------------------------------------------------------------------------------
    def reopen(self, run_id: RunId, *, by: str | None = None) -> RunRecord:
        """Move a failed run back for a requeue: queued if it never began, else running; returns the
        run as it was (its failure).

        The last requeue is kept on the run (markers ``requeued_at``, ``requeued_by``, ``requeued_from``:
        the failure it ended), for the operators' timeline.
        """
        run = self.get(run_id)
        if run is None:
            raise NotRequeueable(f"run {run_id} is not in the ledger (unknown, or expired after retention)")
        if run.state is not RunState.FAILED:
            raise NotRequeueable(f"run {run_id} is {run.state.value}, not failed: nothing to requeue")
        now = time.time()
        key = self._keys.run(run_id)
        state = RunState.QUEUED if run.never_began else RunState.RUNNING
        attempts = [f"a:{name}" for name, step in run.own_steps.items() if step.attempts]
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": state.value, "updated_at": repr(now)})
        requeued: dict[Any, Any] = {
            "x:requeued_at": repr(now),
            "x:requeued_from": f"{run.failed_step}: {run.error}",
            **_given(**{"x:requeued_by": by}),
        }
        pipe.hset(key, mapping=requeued)
        pipe.hdel(key, "failed_step", "error", *attempts)
        pipe.zrem(self._keys.failed, str(run_id))
        pipe.zrem(self._keys.writeback, str(run_id))
        pipe.zadd(self._keys.active, {str(run_id): now})
        self._metrics.run_requeued(pipe)
        pipe.execute()
        return run


def _given(**values: str | None) -> dict[Any, Any]:
    return {k: v for k, v in values.items() if v is not None}
