"""What became of a run, and what an Order got, in words an operator understands.

Shared by ``provisioning status``, ``provisioning runs`` and the console.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from provisioning.email.steps import OUTBOX_MARKER
from provisioning.ledger import BEGIN, Ledger, Provisioning, RunRecord, RunState
from provisioning.ledger.esim_status import ProfileStatus
from provisioning.runs.cancellation import CANCELLATION, is_cancellation
from provisioning.runs.chain import CHAIN, Chain
from provisioning.step.results import EsimActivated, WhmcsOrderCreated

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``; ValueError saying what is expected otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r}: expected a number and a unit, like 30m, 12h or 7d")
    return int(match.group(1)) * _UNITS_S[match.group(2)]


_ORIGIN_WORDS = {"event": "an event", "reconciler": "the reconciler", "operator": "an operator"}


def table_of(run: RunRecord) -> Chain:
    """The steps a run goes through: the step table's, or the cancellation's (runs/cancellation.py)."""
    return CANCELLATION if is_cancellation(run.run_id) else CHAIN


def describe_run(run: RunRecord, provisioning: Provisioning) -> str:
    """One sentence: the run's outcome (done, joined, superseded, skipped, cancelled, failed) or where it is."""
    if run.state is RunState.FAILED:
        return f"failed at {run.failed_step}: {run.error}"
    if run.state is RunState.QUEUED:
        return "queued: waiting for a worker"
    if run.state is RunState.RUNNING:
        step = table_of(run).first_unfinished(run, provisioning)
        return f"running: at {step.name}" if step else "running: ending"
    if run.state is RunState.DONE and is_cancellation(run.run_id):
        return "done: the Order's effects are undone (or left to a person) and it is written Cancelled"
    if run.note:
        return run.note
    if run.state is RunState.DONE:
        return "done: the Order is provisioned and written back Activated"
    return run.state.value


def started_by(run: RunRecord) -> str:
    who = _ORIGIN_WORDS.get(run.origin.value, run.origin.value)
    return f"{who} ({run.reason})" if run.reason else who


def describe_effects(provisioning: Provisioning) -> dict[str, str]:
    """The Order's effects, by name: what exists (ids) and the e-mail's state."""
    esim = provisioning.step(CHAIN.recording(EsimActivated).name).result or {}
    whmcs = provisioning.step(CHAIN.recording(WhmcsOrderCreated).name).result or {}
    outbox = provisioning.markers.get(OUTBOX_MARKER)
    email = {"sent": "sent", "refused": f"refused: {provisioning.email_error}", "sending": "being sent"}.get(
        outbox or "", outbox or "not sent"
    )
    effects = {
        "provisioning": str(provisioning.gen),
        "whmcs_order_id": str(whmcs.get("whmcs_order_id", "-")),
        "iccid": str(esim.get("iccid") or ("physical SIM" if esim.get("sim") == "physical" else "-")),
        "email": email,
    }
    if provisioning.cancel is not None:
        cancel = provisioning.cancel
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(cancel.at))
        effects["cancelled"] = f"{when} UTC by {cancel.by}: {cancel.reason}"
    return effects


def describe_esim(status: ProfileStatus | None) -> str:
    """The eSIM's state after its release, in words (the SM-DP+'s notifications)."""
    if status is None:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(status.changed_at))
    text = f"{status.state.value} since {when} UTC"
    return f"{text}: {status.reason}" if status.reason else text


@dataclass
class OrderStatus:
    order_id: str
    provisioning: Provisioning
    runs: list[RunRecord]
    esim: ProfileStatus | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "effects": describe_effects(self.provisioning),
            "esim": {
                "iccid": self.esim.iccid,
                "state": self.esim.state.value,
                "changed_at": self.esim.changed_at,
                "reason": self.esim.reason,
                "notifications": [list(n) for n in self.esim.notifications],
            }
            if self.esim
            else None,
            "runs": [
                {
                    **run_json(r, self.provisioning),
                    "outcome": describe_run(r, self.provisioning),
                    "started_by": started_by(r),
                }
                for r in self.runs
            ],
        }


def run_json(run: RunRecord, provisioning: Provisioning) -> dict[str, Any]:
    """A run as ``provisioning status --json`` and the console show it: its record and each step's."""
    return {
        "run_id": str(run.run_id),
        "order_id": run.order_id,
        "state": run.state.value,
        "origin": run.origin.value,
        "reason": run.reason,
        "note": run.note,
        "joined": run.joined,
        "superseded_by": run.superseded_by,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "finished_at": run.finished_at,
        "failed_step": run.failed_step,
        "error": run.error,
        "steps": {
            spec.name: {
                "done": rec.done,
                "at": rec.at,
                "result": rec.result,
                "attempts": rec.attempts,
                "last_error": rec.last_error,
            }
            for spec, rec in ((spec, table_of(run).record(run, provisioning, spec)) for spec in table_of(run))
        },
    }


def order_status(ledger: Ledger, order_id: str) -> OrderStatus:
    runs = ledger.runs.get_many(ledger.orders.runs(order_id))
    provisioning = ledger.orders.provisioning(order_id)
    iccid = (provisioning.step(CHAIN.recording(EsimActivated).name).result or {}).get("iccid")
    esim = ledger.esim_status.get(iccid) if iccid else None
    return OrderStatus(order_id, provisioning, runs, esim)


# -- lists of runs ---------------------------------------------------------------------------------

# How many of the most recent runs a list looks through (newest first) before filtering.
LIST_SCAN_MAX_RUNS = 5000
# Runs read per round trip.
LIST_READ_CHUNK = 500


@dataclass(frozen=True)
class RunFilter:
    """Which runs a list shows; every field that is set must match."""

    states: frozenset[RunState] = frozenset()
    # The step a running run is at, or a failed run failed at.
    step: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None
    order_id: str | None = None


@dataclass
class RunRow:
    run: RunRecord
    step: str | None
    outcome: str
    started_by: str

    def to_json(self) -> dict[str, Any]:
        r = self.run
        return {
            "run_id": str(r.run_id),
            "order_id": r.order_id,
            "state": r.state.value,
            "step": self.step,
            "started_by": self.started_by,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "outcome": self.outcome,
        }


def current_step(run: RunRecord, provisioning: Provisioning) -> str | None:
    """Where the run is (running), or where it failed; None once it ended otherwise."""
    if run.state is RunState.FAILED:
        return run.failed_step
    if run.state is RunState.RUNNING:
        step = CHAIN.first_unfinished(run, provisioning)
        return (step or CHAIN.specs[-1]).name
    if run.state is RunState.QUEUED:
        return BEGIN
    return None


def list_runs(ledger: Ledger, flt: RunFilter, *, limit: int, now: float | None = None) -> list[RunRow]:
    """Runs matching ``flt``, newest first: the CLI's ``provisioning runs`` and the console's list.

    Without an Order, it looks through the ``LIST_SCAN_MAX_RUNS`` most recent runs (and every
    unfinished or failed one); with one, through every run of that Order.
    """
    now = time.time() if now is None else now
    if flt.order_id:
        ids = [str(r) for r in reversed(ledger.orders.runs(flt.order_id))]
    else:
        since = now - flt.newer_than_s if flt.newer_than_s is not None else None
        ids = ledger.registries.recent(since=since, limit=LIST_SCAN_MAX_RUNS)
    rows: list[RunRow] = []
    for start in range(0, len(ids), LIST_READ_CHUNK):
        runs = [
            r for r in ledger.runs.get_many(ids[start : start + LIST_READ_CHUNK]) if _matches(r, flt, now)
        ]
        provisionings = {
            oid: ledger.orders.provisioning(oid)
            for oid in {r.order_id for r in runs if r.state is RunState.RUNNING}
        }
        for run in runs:
            prov = provisionings.get(run.order_id) or Provisioning(run.order_id)
            step = current_step(run, prov)
            if flt.step and step != flt.step:
                continue
            rows.append(RunRow(run, step, describe_run(run, prov), started_by(run)))
    rows.sort(key=lambda row: row.run.created_at, reverse=True)
    return rows[:limit]


def _matches(run: RunRecord, flt: RunFilter, now: float) -> bool:
    if flt.states and run.state not in flt.states:
        return False
    if flt.older_than_s is not None and run.created_at > now - flt.older_than_s:
        return False
    return flt.newer_than_s is None or run.created_at >= now - flt.newer_than_s
