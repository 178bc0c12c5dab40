"""The e-mail step: SMTP has no idempotency, so an outbox record and a deterministic Message-ID.

The ledger's outbox goes ``sending`` then ``sent``. A run found in ``sending``
(the worker died mid-send, or the connection dropped after the message was
handed over) follows ``EMAIL_RESEND_POLICY``: ``resend`` (the default,
at-least-once: the same Message-ID, so a duplicate is recognisable and counted)
or ``skip`` (at-most-once: record the delivery as unknown and send nothing).
An SMTP refusal that proves nothing was delivered (a 4xx reply, no connection)
puts the outbox back to ``pending``, so the retry is not counted as a resend.
"""

from __future__ import annotations

from typing import Any

from provisioning.email.errors import EmailDeliveryUnknownError, EmailError
from provisioning.email.message import build_activation_email, message_id_for
from provisioning.esim.steps import activation_code_for
from provisioning.logs import get_logger
from provisioning.runs import StepContext

log = get_logger(__name__)


def send_email(ctx: StepContext) -> dict[str, Any]:
    settings = ctx.settings
    message_id = message_id_for(ctx.run_id, settings.email_message_id_domain)
    outbox = ctx.marker("outbox")
    if outbox == "sent":
        return {"message_id": message_id}
    if outbox == "sending":
        if settings.email_resend_policy == "skip":
            log.warning("email_delivery_unknown_not_resent", message_id=message_id)
            ctx.set_marker("outbox", "unknown")
            return {"message_id": message_id, "delivery": "unknown"}
        resends = ctx.services.ledger.incr_marker(ctx.run_id, "email_resends")
        log.warning("email_resent_after_unknown_outcome", message_id=message_id, resends=resends)

    order = ctx.order()
    run = ctx.services.ledger.get(ctx.run_id)
    assert run is not None
    esim = run.step("activate_esim").result or {}
    whmcs = run.step("create_whmcs_order").result or {}
    message = build_activation_email(
        run_id=ctx.run_id,
        to_address=order.email or "",
        first_name=order.first_name,
        order_number=order.order_number or order.id,
        whmcs_order_id=str(whmcs.get("whmcs_order_id", "")),
        iccid=esim.get("iccid"),
        activation_code=activation_code_for(ctx) if esim.get("iccid") else None,
        sender=settings.email_sender,
        message_id_domain=settings.email_message_id_domain,
    )
    ctx.set_marker("outbox", "sending")
    ctx.renew()
    try:
        ctx.services.email.send(message)
    except EmailDeliveryUnknownError:
        raise
    except EmailError:
        # Refused outright (4xx, 5xx, no connection): nothing left our hands.
        ctx.set_marker("outbox", "pending")
        raise
    ctx.set_marker("outbox", "sent")
    return {"message_id": message_id}
