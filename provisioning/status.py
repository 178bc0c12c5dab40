"""What became of a run, and what an Order got, in words an operator understands.

Shared by ``provisioning status`` and any other front end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from provisioning.chain import Step
from provisioning.ledger import Ledger, Provisioning, RunRecord, RunState

_ORIGIN_WORDS = {"event": "an event", "reconciler": "the reconciler", "operator": "an operator"}


def describe_run(run: RunRecord, provisioning: Provisioning) -> str:
    """One sentence: the run's outcome (done, joined, superseded, skipped, failed) or where it is."""
    if run.state is RunState.FAILED:
        return f"failed at {run.failed_step}: {run.error}"
    if run.state is RunState.QUEUED:
        return "queued: waiting for a worker"
    if run.state is RunState.RUNNING:
        step = run.first_unfinished_step(provisioning)
        return f"running: at {step.value}" if step else "running: ending"
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
    esim = provisioning.step(Step.ACTIVATE_ESIM).result or {}
    whmcs = provisioning.step(Step.CREATE_WHMCS_ORDER).result or {}
    outbox = provisioning.markers.get("outbox")
    email = {"sent": "sent", "refused": f"refused: {provisioning.email_error}", "sending": "being sent"}.get(
        outbox or "", outbox or "not sent"
    )
    return {
        "provisioning": str(provisioning.gen),
        "whmcs_order_id": str(whmcs.get("whmcs_order_id", "-")),
        "iccid": str(esim.get("iccid") or ("physical SIM" if esim.get("sim") == "physical" else "-")),
        "email": email,
    }


@dataclass
class OrderStatus:
    order_id: str
    provisioning: Provisioning
    runs: list[RunRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "effects": describe_effects(self.provisioning),
            "runs": [
                {
                    **r.to_json(self.provisioning),
                    "outcome": describe_run(r, self.provisioning),
                    "started_by": started_by(r),
                }
                for r in self.runs
            ],
        }


def order_status(ledger: Ledger, order_id: str) -> OrderStatus:
    runs = [r for r in (ledger.get(i) for i in ledger.runs_for_order(order_id)) if r is not None]
    return OrderStatus(order_id, ledger.provisioning(order_id), runs)
