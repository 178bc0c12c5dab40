"""The chain's steps, defined once: their names, their order, and whose record holds each result.

Effects belong to the Order, not to the run: the steps that act on the world
(payment check, eSIM, WHMCS order, e-mail) record their results on the Order's
provisioning, so any later run of the same Order finds them done and reuses
them. Writing the Order back is the one step every run does itself: a run
exists because the Order says ``Activating``, and the run ends by saying
``Activated`` again, with the same ids.
"""

from __future__ import annotations

from enum import StrEnum


class Step(StrEnum):
    VALIDATE_PAYMENT = "validate_payment"
    ACTIVATE_ESIM = "activate_esim"
    CREATE_WHMCS_ORDER = "create_whmcs_order"
    UPDATE_SALESFORCE = "update_salesforce"
    SEND_EMAIL = "send_email"

    @property
    def task_name(self) -> str:
        return f"provisioning.{self.value}"

    @property
    def next(self) -> Step | None:
        """The step after this one (None after the last)."""
        steps = tuple(Step)
        index = steps.index(self)
        return steps[index + 1] if index + 1 < len(steps) else None

    @property
    def belongs_to_order(self) -> bool:
        """True: recorded once per Order (per provisioning); False: every run does it."""
        return self is not Step.UPDATE_SALESFORCE


STEPS: tuple[Step, ...] = tuple(Step)
# The failed_step of a run that failed before it began (reading the Order), and where it resumes.
ENTRY_STEP = "provision_order"
