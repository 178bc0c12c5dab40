"""A run's life as the Order page shows it, in the chain's order, from the ledger's records."""

from __future__ import annotations

from dataclasses import dataclass

from provisioning.ledger import Provisioning, RunRecord, RunState
from provisioning.ops.status import describe_run, started_by, table_of


@dataclass
class TimelineEntry:
    at: float | None
    what: str
    detail: str = ""
    kind: str = "info"  # info, step, error, end
    # Free text that may quote an address (errors, notes) is masked; ids (results) are shown as they are.
    free_text: bool = True


def timeline(run: RunRecord, provisioning: Provisioning) -> list[TimelineEntry]:
    """A run's life in the chain's order: created (by whom), each step (its last error, then when it was
    done, with the result ids and this run's attempts), a requeue (by whom, from which failure), the end."""
    entries = [TimelineEntry(run.created_at, f"created by {started_by(run)}")]
    steps = table_of(run)  # the step table's, or the cancellation's
    for spec in steps:
        rec = steps.record(run, provisioning, spec)
        if rec.last_error:
            entries.append(TimelineEntry(None, f"{spec.name}: error", rec.last_error, "error"))
        if rec.done:
            ids = ", ".join(f"{k}={v}" for k, v in (rec.result or {}).items())
            attempts = (
                f"{rec.attempts} attempt{'s' if rec.attempts != 1 else ''} by this run"
                if rec.attempts
                else ""
            )
            detail = "; ".join(x for x in (ids, attempts) if x) or "done by an earlier run of the Order"
            entries.append(TimelineEntry(rec.at, f"{spec.name} done", detail, "step", free_text=False))
        elif rec.attempts:
            entries.append(
                TimelineEntry(None, f"{spec.name} not done yet", f"{rec.attempts} attempts", "step")
            )
    if run.state is RunState.FAILED:
        entries.append(
            TimelineEntry(run.updated_at, f"failed at {run.failed_step}", run.error or "", "error")
        )
    elif run.finished_at:
        entries.append(
            TimelineEntry(run.finished_at, run.state.value, describe_run(run, provisioning), "end")
        )
    requeued_at = run.markers.get("requeued_at")
    if requeued_at:
        by = run.markers.get("requeued_by") or "an operator"
        at = float(requeued_at)
        entry = TimelineEntry(at, f"requeued by {by}", run.markers.get("requeued_from", ""), "info")
        # Before the first thing this run did after the requeue.
        later = next((i for i, e in enumerate(entries) if e.at is not None and e.at > at), len(entries))
        entries.insert(later, entry)
    return entries
