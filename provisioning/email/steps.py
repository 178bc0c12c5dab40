"""The e-mail step: SMTP has no idempotency, so an outbox record and a deterministic Message-ID.

The outbox (on the Order's provisioning) goes ``sending`` then ``sent``. An
Order found in ``sending`` (the worker died mid-send, or the connection dropped
after the message was handed over) follows ``EMAIL_RESEND_POLICY``: ``resend``
(the default, at-least-once: the same Message-ID, so a duplicate is
recognisable and counted) or ``skip`` (at-most-once: record the delivery as
unknown and send nothing). A refusal that proves nothing was delivered (a 4xx
or 5xx reply, no connection) puts the outbox back to ``pending``, so a retry is
not counted as a resend; a refusal for good leaves it ``refused`` for the
operators' ``provisioning resend-email``. With replicas, ``sending`` is on a
replica before the send (:mod:`provisioning.core.replication`); unconfirmed, the outbox
goes back to what it was and the step retries without sending.
"""

from __future__ import annotations

from provisioning.core.logs import get_logger
from provisioning.core.replication import ReplicaUnconfirmed
from provisioning.email.errors import EmailDeliveryUnknownError, EmailError
from provisioning.email.message import build_activation_email, message_id_for
from provisioning.step.context import StepContext
from provisioning.step.order import Order
from provisioning.step.results import EsimActivated, WelcomeEmail, WhmcsOrderCreated
from provisioning.step.spec import Adoption

log = get_logger(__name__)

# The outbox: pending, sending, sent, unknown (skipped after an unknown outcome), refused.
OUTBOX_MARKER = "outbox"
RESENDS_MARKER = "email_resends"


def adopt(order: Order) -> Adoption:
    """An Order provisioned before the ledger forgot it: its welcome e-mail is not sent again."""
    return Adoption(WelcomeEmail(delivery="not resent (adopted)"), {OUTBOX_MARKER: "sent"})


def send_email(ctx: StepContext) -> WelcomeEmail:
    return deliver(ctx, ctx.order())


def deliver(ctx: StepContext, order: Order) -> WelcomeEmail:
    """Send the Order's welcome e-mail unless it went out already (the step, and the operators' resend)."""
    settings = ctx.settings
    message_id = message_id_for(ctx.effect_key, settings.email_message_id_domain)
    outbox = ctx.marker(OUTBOX_MARKER)
    if outbox == "sent":
        return WelcomeEmail(message_id=message_id)
    if outbox == "sending":
        if settings.email_resend_policy == "skip":
            log.warning("email_delivery_unknown_not_resent", message_id=message_id)
            ctx.set_marker(OUTBOX_MARKER, "unknown")
            return WelcomeEmail(message_id=message_id, delivery="unknown")
        resends = ctx.incr_marker(RESENDS_MARKER)
        log.warning("email_resent_after_unknown_outcome", message_id=message_id, resends=resends)

    esim = ctx.result(EsimActivated)
    whmcs = ctx.result(WhmcsOrderCreated)
    iccid = esim.iccid if esim else None
    message = build_activation_email(
        key=ctx.effect_key,
        to_address=order.email or "",
        first_name=order.first_name,
        order_number=order.order_number or order.id,
        whmcs_order_id=str(whmcs.whmcs_order_id) if whmcs else "",
        iccid=iccid,
        activation_code=ctx.marker("activation_code") if iccid else None,
        sender=settings.email_sender,
        message_id_domain=settings.email_message_id_domain,
    )
    try:
        # On a replica before the send: after a failover the Order must still say "sending".
        ctx.guard_marker(OUTBOX_MARKER, "sending")
    except ReplicaUnconfirmed:
        # Nothing left our hands: a retry must not count this attempt as a resend.
        ctx.set_marker(OUTBOX_MARKER, outbox or "pending")
        raise
    ctx.renew()
    try:
        ctx.services.email.send(message)
    except EmailDeliveryUnknownError:
        raise
    except EmailError:
        # Refused outright (4xx, 5xx, no connection): nothing left our hands.
        ctx.set_marker(OUTBOX_MARKER, "pending")
        raise
    # With the step's end: a worker dying before it leaves "sending", as one dying mid-send does.
    ctx.record_marker(OUTBOX_MARKER, "sent")
    return WelcomeEmail(message_id=message_id)
