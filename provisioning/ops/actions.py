"""The operators' actions: requeue failed runs, reprovision an Order on purpose, resend a refused e-mail,
cancel an Order.

The CLI (``provisioning requeue | reprovision | resend-email | cancel``) and any other
front end call these, never a copy of them. Each returns one :class:`Outcome`
per item, supports a dry run, and logs what it did with the user who asked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery

from provisioning.core.logs import get_logger
from provisioning.core.run_id import RunId
from provisioning.email.errors import EmailError
from provisioning.email.steps import OUTBOX_MARKER, deliver
from provisioning.esim.errors import Es2PlusFunctionFailed
from provisioning.ledger import NotRequeueable, Origin, RunState
from provisioning.ledger.esim_status import EsimState, ProfileStatus
from provisioning.runs.lifecycle import write_order
from provisioning.runs.publishing import publish_run, resume
from provisioning.runs.services import Services
from provisioning.step.context import StepContext

log = get_logger(__name__)

REPROVISION_KEY_PREFIX = "reprovision-"


@dataclass
class Outcome:
    target: str  # a run id or an Order id
    action: str  # what happened: "requeued", "would requeue", "sent", "skipped", ...
    step: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def requeue(
    services: Services, app: Celery, run_ids: list[str], *, dry_run: bool, user: str
) -> list[Outcome]:
    """Resume failed runs where they stopped; completed steps (and the Order's effects) are not repeated."""
    ledger = services.ledger
    fields = services.salesforce.field_names
    outcomes: list[Outcome] = []
    for text in run_ids:
        try:
            run_id = RunId.parse(text)
        except ValueError as exc:
            outcomes.append(Outcome(text, "skipped", None, str(exc)))
            continue
        run = ledger.runs.get(run_id)
        if run is None or run.state is not RunState.FAILED:
            why = "it is not in the ledger" if run is None else f"it is {run.state.value}, not failed"
            if run is not None and run.superseded_by:
                why += f" (run {run.superseded_by} continued its work)"
            outcomes.append(Outcome(text, "skipped", None, f"nothing to requeue: {why}"))
            continue
        others = [r for r in ledger.orders.in_flight(run_id.order_id) if r != run_id]
        if others:
            detail = f"nothing to requeue: run {others[0]} of the same Order is in flight"
            outcomes.append(Outcome(text, "skipped", None, detail))
            continue
        step = services.chain.resume_point(run, ledger.orders.provisioning(run_id.order_id))
        if dry_run:
            outcomes.append(Outcome(text, "would requeue", step, f"would resume at {step}: {run.error}"))
            continue
        try:
            ledger.runs.reopen(run_id, by=user)
        except NotRequeueable as exc:
            outcomes.append(Outcome(text, "skipped", None, str(exc)))
            continue
        # The Order goes back to Activating before the run resumes, so the write-back of a
        # second failure or of the success is the last word on the Order.
        write_order(
            services,
            run_id.order_id,
            fields.patch(activation_status="Activating", activation_error=None),
            what="requeue",
        )
        resume(app, run_id, step)
        outcomes.append(Outcome(text, "requeued", step, f"resumed at {step}"))
        log.warning("run_requeued", run_id=text, order_id=run_id.order_id, step=step, user=user)
    return outcomes


def reprovision(
    services: Services, app: Celery, order_id: str, *, reason: str, dry_run: bool, user: str
) -> Outcome:
    """Provision an Order a second time on purpose (a replacement eSIM, say): new effects, kept apart.

    The Order's current provisioning is archived; a new run, started by the
    operator with ``reason``, makes a new WHMCS order, eSIM profile and e-mail.
    """
    ledger = services.ledger
    reason = reason.strip()
    if not reason:
        return Outcome(order_id, "skipped", None, "a reprovision needs a reason (--reason)")
    in_flight = ledger.orders.in_flight(order_id)
    if in_flight:
        return Outcome(
            order_id, "skipped", None, f"run {in_flight[0]} of this Order is in flight; wait for it"
        )
    current = ledger.orders.provisioning(order_id)
    if current.active is None:
        return Outcome(
            order_id,
            "skipped",
            None,
            "the ledger holds no provisioning of this Order to replace (never provisioned here, or "
            "past the retention period)",
        )
    run_id = RunId(order_id, f"{REPROVISION_KEY_PREFIX}{current.gen + 1}")
    if dry_run:
        return Outcome(
            order_id,
            "would reprovision",
            None,
            f"would archive provisioning {current.gen} (run {current.active}) and start run {run_id}",
        )
    with ledger.leases.holding(order_id) as lease:
        if lease is None:
            return Outcome(order_id, "skipped", None, "a worker holds the Order's lease; try again shortly")
        gen = ledger.orders.new_generation(order_id)
        run_id = RunId(order_id, f"{REPROVISION_KEY_PREFIX}{gen}")
        ledger.runs.enqueue(run_id, Origin.OPERATOR, reason=f"{reason} (by {user})")
    fields = services.salesforce.field_names.patch(activation_status="Activating", activation_error=None)
    write_order(services, order_id, fields, what="reprovision")
    publish_run(app, run_id)
    log.warning("order_reprovisioned", order_id=order_id, run_id=str(run_id), reason=reason, user=user)
    return Outcome(order_id, "reprovisioning", None, f"run {run_id} makes provisioning {gen}: {reason}")


def resend_email(services: Services, order_ids: list[str], *, dry_run: bool, user: str) -> list[Outcome]:
    """Send the welcome e-mail of Orders whose e-mail was refused, to the address the Order has now."""
    ledger = services.ledger
    outcomes = []
    for order_id in order_ids:
        provisioning = ledger.orders.provisioning(order_id)
        state = provisioning.markers.get(OUTBOX_MARKER)
        if state != "refused" or provisioning.active is None:
            detail = f"its welcome e-mail is {state or 'not sent yet'}, not refused: nothing to resend"
            outcomes.append(Outcome(order_id, "skipped", None, detail))
            continue
        if dry_run:
            detail = f"would send it again (refused before: {provisioning.email_error})"
            outcomes.append(Outcome(order_id, "would send", None, detail))
            continue
        with ledger.leases.holding(order_id) as lease:
            if lease is None:
                outcomes.append(
                    Outcome(order_id, "skipped", None, "a worker holds the Order's lease; try again")
                )
                continue
            # Read again: the address was fixed in Salesforce, which is why the operator resends.
            order = services.salesforce.fetch_order(order_id)
            ctx = StepContext(services, RunId.parse(provisioning.active), provisioning, lease)
            try:
                result = deliver(ctx, order)
            except EmailError as exc:
                ledger.orders.email_refused(order_id, str(exc), {OUTBOX_MARKER: "refused"})
                outcomes.append(Outcome(order_id, "refused", None, str(exc)))
                log.warning("email_resend_refused", order_id=order_id, error=str(exc), user=user)
                continue
        ledger.orders.email_delivered(order_id, ctx.pending_markers)
        write_order(
            services,
            order_id,
            services.salesforce.field_names.patch(activation_error=None),
            what="e-mail sent",
        )
        outcomes.append(Outcome(order_id, "sent", None, f"delivered, Message-ID {result.message_id}"))
        log.warning("email_resent", order_id=order_id, message_id=result.message_id, user=user)
    return outcomes


def cancel(
    services: Services, app: Celery, order_id: str, *, reason: str, dry_run: bool, user: str
) -> Outcome:
    """Cancel the Order (:mod:`provisioning.runs.cancellation`): the dry run says what would be stopped
    and undone; the real one records the cancellation once and starts its compensations once."""
    from provisioning.runs.cancellation import plan, request_cancel

    reason = reason.strip()
    if not reason:
        return Outcome(order_id, "skipped", None, "a cancellation needs a reason (--reason)")
    seen = plan(services, order_id)
    if dry_run:
        action = "already cancelled" if seen.cancel is not None else "would cancel"
        return Outcome(order_id, action, None, "\n".join(seen.lines()))
    requested = request_cancel(services, app, order_id, reason, by=user, origin=Origin.OPERATOR)
    if not requested.new:
        return Outcome(order_id, "already cancelled", None, "\n".join(seen.lines()))
    detail = "\n".join([*seen.lines(), f"cancellation run {requested.run_id} started"])
    log.warning("order_cancelled_by_operator", order_id=order_id, user=user, reason=reason)
    return Outcome(order_id, "cancelled", None, detail)


def stale_esims(services: Services, *, now: float | None = None) -> list[ProfileStatus]:
    """Profiles released more than ESIM_RECLAIM_AFTER_DAYS before ``now`` and never downloaded (released,
    or a download that failed), oldest first."""
    before = (time.time() if now is None else now) - services.settings.esim_reclaim_after_days * 86400
    pending = services.ledger.esim_status.pending(released_before=before)
    return [p for p in pending if p.state in (EsimState.RELEASED, EsimState.ERROR)]


def reclaim_esims(services: Services, iccids: list[str], *, user: str) -> list[Outcome]:
    """Cancel stale profiles on the SM-DP+ (Available) and return their ICCIDs to our stock, each under
    its Order's lease; a profile downloaded meanwhile (8.2.1/3.3) is left alone."""
    ledger = services.ledger
    outcomes = []
    for iccid in iccids:
        status = ledger.esim_status.get(iccid)
        if status is None or status.state not in (EsimState.RELEASED, EsimState.ERROR):
            state = status.state.value if status else "not released by an Order of ours"
            outcomes.append(Outcome(iccid, "skipped", None, f"not stale: {state}"))
            continue
        with ledger.leases.holding(status.order_id) as lease:
            if lease is None:
                outcomes.append(Outcome(iccid, "skipped", None, "a step acts on its Order now; try again"))
                continue
            try:
                services.es2plus.cancel_order(iccid=iccid, final_status="Available")
            except Es2PlusFunctionFailed as exc:
                if exc.is_iccid_in_use:
                    outcomes.append(Outcome(iccid, "skipped", None, "downloaded meanwhile: left as it is"))
                    continue
                if not exc.is_invalid_transition:
                    outcomes.append(Outcome(iccid, "skipped", None, str(exc)))
                    continue
            ledger.inventory.return_to_stock(status.key)
            ledger.esim_status.cancelled(iccid)
        log.warning("esim_reclaimed", iccid=iccid, order_id=status.order_id, user=user)
        outcomes.append(Outcome(iccid, "reclaimed", None, f"Order {status.order_id}: back in stock"))
    return outcomes
