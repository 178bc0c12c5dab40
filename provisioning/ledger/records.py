"""What the ledger holds, as Python sees it: runs, the Orders' provisionings, step records.

Step names are whatever the step table calls its steps: the ledger stores and
reads records under the names it is given, and knows no step itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.lock import Lock

from provisioning.core.run_id import RunId

# Where a run that has not begun begins (reading the Order): the failed step of a run that failed
# there, from which a requeue starts it again.
BEGIN = "provision_order"


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    JOINED = "joined"
    SUPERSEDED = "superseded"
    # The Order was cancelled (runs/cancellation.py): the run's next claim ended it, before any further
    # effect; the cancellation's compensations undo what the Order got.
    CANCELLED = "cancelled"

    @property
    def unfinished(self) -> bool:
        return self in (RunState.QUEUED, RunState.RUNNING)


class Origin(StrEnum):
    """Who started a run."""

    EVENT = "event"
    RECONCILER = "reconciler"
    OPERATOR = "operator"


class ClaimStatus(StrEnum):
    """What a step's claim found."""

    ENDED = "ended"  # the run ended (failed, joined, superseded, skipped, cancelled): stop
    DONE = "done"  # the step is done: go on
    BUSY = "busy"  # another worker holds the Order's lease: wait
    GO = "go"  # the lease is ours: act


@dataclass
class StepRecord:
    result: dict[str, Any] | None = None
    at: float | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def done(self) -> bool:
        return self.at is not None


@dataclass(frozen=True)
class Cancel:
    """A cancellation of the Order, as recorded once (the first request wins; a repeat changes nothing)."""

    at: float
    reason: str
    by: str


@dataclass
class Provisioning:
    """What the Order got: recorded once per Order, whichever run made it."""

    order_id: str
    gen: int = 1
    active: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)
    email_error: str | None = None
    # The Order's cancellation, once requested (``Orders.request_cancel``): every later forward claim
    # ends its run; the cancellation's own steps undo the effects.
    cancel: Cancel | None = None

    @property
    def effect_key(self) -> str:
        """What every idempotency key of the Order's effects derives from (ICCID claim, WHMCS note,
        matchingId, Message-ID): the Order id, plus the generation after a deliberate reprovision."""
        return self.order_id if self.gen == 1 else f"{self.order_id}#{self.gen}"

    def step(self, name: str) -> StepRecord:
        return self.steps.get(name) or StepRecord()


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

    @property
    def never_began(self) -> bool:
        """Queued, or failed before it began (reading the Order): it starts from the beginning."""
        return self.state is RunState.QUEUED or (self.state is RunState.FAILED and self.failed_step == BEGIN)


@dataclass
class StepClaim:
    """What a step's claim found: why the step does not run, or the lease and the records."""

    status: ClaimStatus
    state: RunState | None = None  # None: the ledger has no run of this id
    result: dict[str, Any] | None = None  # DONE: the recorded result
    attempts: int = 0
    run: RunRecord | None = None
    provisioning: Provisioning | None = None
    snapshot: dict[str, Any] | None = None
    lease: Lock | None = None


@dataclass(frozen=True)
class Recorded:
    """A step's result to record (with another step's end): under its name, by the run or the Order."""

    step: str
    owned_by_order: bool
    result: dict[str, Any]


class NotRequeueable(Exception):
    """The run cannot be requeued (it did not fail); the message says why."""


# -- decoding ------------------------------------------------------------------------------------


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs(flat: list[Any]) -> dict[str, str]:
    """A hash as HGETALL answers it inside a script (a flat list), as text."""
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def hash_text(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


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


def decode_run(run_id: RunId, data: dict[str, str]) -> RunRecord:
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


def decode_provisioning(order_id: str, data: dict[str, str]) -> Provisioning:
    steps, markers = _steps_and_markers(data)
    return Provisioning(
        order_id=order_id,
        gen=int(data.get("gen", "1")),
        active=data.get("active"),
        steps=steps,
        markers=markers,
        email_error=data.get("email_error"),
        cancel=Cancel(float(data["cancel_at"]), data.get("cancel_reason", ""), data.get("cancel_by", ""))
        if "cancel_at" in data
        else None,
    )


def step_record_json(result: dict[str, Any], at: float, run_id: RunId) -> str:
    """How a step's result is stored: with when, and which run recorded it."""
    return json.dumps({"result": result, "at": at, "run": str(run_id)})
