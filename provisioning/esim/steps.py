"""The eSIM step: claim an ICCID from our inventory, then downloadOrder and confirmOrder, each once.

``downloadOrder`` with only a profile type reserves a new ICCID on every call and
ES2+ cannot look a lost one up, so the Order first claims an ICCID from the
operator's inventory (atomically, in Redis) and orders exactly that one: a
repeat then answers 8.2.1/3.3, which for our own claimed ICCID means done. The
claim and the matchingId derive from the Order's effect key, so every run of
the Order gets the same profile, and a repeated ``confirmOrder`` answering
8.2.1/3.5 is ours too.
"""

from __future__ import annotations

from provisioning.core.logs import get_logger
from provisioning.core.repeating import RepeatingFailure
from provisioning.esim.client import activation_code, matching_id_for, smdp_address_from_settings
from provisioning.esim.errors import Es2PlusFunctionFailed
from provisioning.ledger.esim_status import EsimState
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import EsimActivated, EsimCancelled
from provisioning.step.spec import Adoption

log = get_logger(__name__)

# Below ESIM_STOCK_WARN_THRESHOLD every claim would say so, thousands of lines a day: the first claim
# below it logs ``esim_stock_low``, then at most one ``esim_stock_low_repeated`` per this many seconds
# per worker process (with the claims since), and the first claim above it again (stock loaded)
# ``esim_stock_low_recovered``. The alert on provisioning_esim_stock is the page; these are the trail.
STOCK_LOW_SUMMARY_S = 300.0
_stock_low = RepeatingFailure(log, "esim_stock_low", interval_s=STOCK_LOW_SUMMARY_S)

# The ICCID downloadOrder ordered (a repeat then means done), and the activation code the e-mail quotes.
DOWNLOADED_MARKER = "esim_downloaded"
ACTIVATION_CODE_MARKER = "activation_code"


def is_esim(sim_type: str | None) -> bool:
    return (sim_type or "").strip().lower() == "esim"


def nothing_to_do(order: Order) -> EsimActivated | None:
    """A physical SIM has no eSIM to activate: the step's result, recorded without running it."""
    return None if is_esim(order.sim_type) else EsimActivated(sim="physical")


def adopt(order: Order) -> Adoption:
    """The ICCID the Order shows (an eSIM), or the physical SIM, from before the ledger forgot it."""
    return Adoption(
        EsimActivated(iccid=order.esim_iccid) if is_esim(order.sim_type) else EsimActivated(sim="physical")
    )


def activate_esim(ctx: StepContext) -> EsimActivated:
    order = ctx.order()
    physical = nothing_to_do(order)
    if physical is not None:
        return physical
    inventory = ctx.services.inventory
    iccid, free = inventory.claim_counting(ctx.effect_key)
    threshold = ctx.settings.esim_stock_warn_threshold
    if free < threshold:
        _stock_low.failed("below_threshold", level="warning", free=free, threshold=threshold)
    else:
        _stock_low.recovered(free=free, threshold=threshold)
    es2 = ctx.services.es2plus
    statuses = ctx.services.ledger.esim_status

    if ctx.marker(DOWNLOADED_MARKER) is None:
        # The ICCID's Order, before the SM-DP+ knows the profile is ours: its notifications find it.
        statuses.register(iccid, ctx.order_id, ctx.effect_key)
        ctx.renew()
        try:
            es2.download_order(iccid=iccid, eid=order.eid or None)
        except Es2PlusFunctionFailed as exc:
            if not exc.is_iccid_in_use:
                raise
            log.info("esim_download_repeat", iccid=iccid)
        # With the step's end: a retry orders the same claimed ICCID again, and 8.2.1/3.3 means done.
        ctx.record_marker(DOWNLOADED_MARKER, iccid)

    matching_id = matching_id_for(ctx.effect_key)
    smdp_address = None
    ctx.renew()
    try:
        confirmed = es2.confirm_order(
            iccid=iccid, matching_id=matching_id, eid=order.eid or None, release=True
        )
        smdp_address = confirmed.smdp_address
    except Es2PlusFunctionFailed as exc:
        if not exc.is_invalid_transition:
            raise
        log.info("esim_confirm_repeat", iccid=iccid)
    if smdp_address or ctx.marker(ACTIVATION_CODE_MARKER) is None:
        # The code lets anyone download the profile: it stays in the ledger for the e-mail,
        # and only the ICCID goes on (task results and Flower show results).
        address = smdp_address or smdp_address_from_settings(ctx.settings)
        # With the step's end: a retry confirms again ("invalid transition") and derives the same code.
        ctx.record_marker(ACTIVATION_CODE_MARKER, activation_code(address, matching_id))
    # With the step's end, before its result: until then the ICCID stays claimed by this Order.
    ctx.write_with_end(lambda pipe: inventory.queue_mark_used(pipe, iccid))
    # The profile's state begins (released); the SM-DP+'s notifications move it on (once: a repeat keeps it).
    ctx.write_with_end(lambda pipe: statuses.queue_released(pipe, iccid, ctx.order_id, ctx.effect_key))
    return EsimActivated(iccid=iccid)


# -- the Order's cancellation ----------------------------------------------------------------------

# The SM-DP+ made the Order's profile Available again (cancelOrder): set before the ICCID goes back to
# our stock, so a retry never cancels that ICCID again (another Order may have claimed it by then).
CANCELLED_MARKER = "esim_cancelled"


def cancel_esim(ctx: StepContext) -> EsimCancelled:
    """Undo the Order's eSIM: cancelOrder (Available) while it is not downloaded, then its ICCID back to
    our free stock; a downloaded or installed profile is left as it is and reported for a person."""
    inventory = ctx.services.inventory
    iccid = inventory.claimed_by(ctx.effect_key)
    done_before = ctx.marker(CANCELLED_MARKER)
    if iccid is None:
        # No claim: a physical SIM or no eSIM step yet, or an earlier try returned it already.
        if done_before is not None:
            return EsimCancelled(outcome="undone", iccid=done_before, returned_to_stock=True)
        return EsimCancelled(outcome="nothing")
    if done_before is None:
        status = ctx.services.ledger.esim_status.get(iccid)
        if status is not None and status.state in (EsimState.DOWNLOADED, EsimState.INSTALLED):
            return _downloaded(iccid, f"the SM-DP+ reported it {status.state.value}")
        ctx.renew()
        try:
            ctx.services.es2plus.cancel_order(iccid=iccid, final_status="Available")
        except Es2PlusFunctionFailed as exc:
            if exc.is_iccid_in_use:
                return _downloaded(iccid, f"cancelOrder answered {exc.subject_code}/{exc.reason_code}")
            if not exc.is_invalid_transition:
                raise
            # 8.2.1/3.5: not ordered (never ordered by the eSIM step, or cancelled by an earlier try).
            log.info("esim_cancel_not_ordered", iccid=iccid)
        ctx.guard_marker(CANCELLED_MARKER, iccid)
    inventory.return_to_stock(ctx.effect_key)
    ctx.services.ledger.esim_status.cancelled(iccid)
    log.info("esim_cancelled", iccid=iccid)
    return EsimCancelled(outcome="undone", iccid=iccid, returned_to_stock=True)


def _downloaded(iccid: str, why: str) -> EsimCancelled:
    reason = (
        f"eSIM {iccid} was downloaded ({why}): cancelOrder cannot undo it; ask the SM-DP+ vendor to "
        "delete the profile (or the customer to remove it), then `provisioning esim` to retire the ICCID"
    )
    log.warning("esim_cancel_manual", iccid=iccid, reason=reason)
    return EsimCancelled(outcome="manual", iccid=iccid, returned_to_stock=False, reason=reason)
