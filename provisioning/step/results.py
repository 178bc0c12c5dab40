"""What each step records and hands on: ids only, typed, the same shape in the ledger and in Flower.

Shared by the domains (the Salesforce step writes the WHMCS order id and the
ICCID back; the e-mail quotes them), hence one module they all import.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class StepResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class PaymentChecked(StepResult):
    whmcs_client_id: int | None = None
    pay_methods: int | None = None
    adopted: bool | None = None  # found on the Order (the ledger had forgotten it)


class EsimActivated(StepResult):
    iccid: str | None = None
    sim: Literal["physical"] | None = None


class WhmcsOrderCreated(StepResult):
    whmcs_order_id: int


class OrderWrittenBack(StepResult):
    activated_at: str


class WelcomeEmail(StepResult):
    message_id: str | None = None
    delivery: str | None = None  # "unknown", "refused", "not resent (adopted)"; None: sent


# -- the cancellation's compensations (provisioning/runs/cancellation.py) ------------------------------
# ``outcome``: "undone" (the effect was undone now or by an earlier try), "nothing" (there was no
# effect to undo), "manual" (it could not be undone automatically: ``reason`` says what a person does).


class EsimCancelled(StepResult):
    outcome: Literal["undone", "nothing", "manual"]
    iccid: str | None = None
    # The ICCID went back to our free stock (the SM-DP+ made the profile Available again).
    returned_to_stock: bool | None = None
    reason: str | None = None


class WhmcsCancelled(StepResult):
    outcome: Literal["undone", "nothing", "manual"]
    whmcs_order_id: int | None = None
    # "cancelled" (CancelOrder of a Pending order), "terminated" (ModuleTerminate of its services)
    action: str | None = None
    terminated_service_ids: list[int] | None = None
    reason: str | None = None


class OrderCancelled(StepResult):
    # "undone": the Order says Cancelled; "manual": Salesforce refused the write for good (``reason``).
    outcome: Literal["undone", "manual"]
    cancelled_at: str
    # What the Order was told was undone, and what is left to a person (the write's own text).
    summary: str
    reason: str | None = None
