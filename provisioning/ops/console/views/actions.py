"""The operators' actions, requeue, resend and cancel, each on one path: a dry run, then the confirmation of
exactly what it showed.

An :class:`Action` says what differs between the two (the form field, how an item is
read, the operation, the words); :func:`dry_run` and :func:`confirm` are the one
path both take: the operator role, the items, the operation run with
``dry_run=True``, a signed confirmation of the items found actionable (for this
user, valid :data:`DRY_RUN_VALID_S`), then the same items, the confirmation
checked, and the operation for real. Every step is logged with the user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, Response, request, url_for
from itsdangerous import BadSignature

from provisioning.core.logs import get_logger
from provisioning.ops.actions import Outcome, cancel, requeue, resend_email
from provisioning.ops.console.state import ConsoleState, console
from provisioning.ops.console.web import Refused, actor, page, require_operator, user
from provisioning.salesforce.ids import normalize_id

log = get_logger(__name__)

bp = Blueprint("actions", __name__)

# A dry run's confirmation is valid this long; after it, run the dry run again.
DRY_RUN_VALID_S = 600
# At most this many items in one requeue or resend.
MAX_ITEMS_PER_ACTION = 500

# The operation: (the console, the items, dry_run, the actor) -> one outcome per item.
Operation = Callable[[ConsoleState, list[str], bool, str], list[Outcome]]


@dataclass(frozen=True)
class Action:
    name: str  # in the confirmation and the log: "requeue", "resend"
    needs: str  # what a viewer is told they cannot do
    field: str  # the form's field holding the items
    read_item: Callable[[str], str]
    operate: Operation
    actionable: str  # the dry run's outcome the confirmation covers
    title: str
    list_endpoint: str  # where "cancel" goes
    confirm_endpoint: str
    confirm_label: Callable[[int], str]


def _requeue(state: ConsoleState, items: list[str], dry_run: bool, by: str) -> list[Outcome]:
    return requeue(state.services, state.publisher(), items, dry_run=dry_run, user=by)


def _resend(state: ConsoleState, items: list[str], dry_run: bool, by: str) -> list[Outcome]:
    return resend_email(state.services, items, dry_run=dry_run, user=by)


def _order_id(text: str) -> str:
    try:
        return normalize_id(text)
    except ValueError as exc:
        raise Refused(f"{text!r} is not a Salesforce Order Id: {exc}. Nothing was changed.") from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


REQUEUE = Action(
    name="requeue",
    needs="requeue runs",
    field="run_id",
    read_item=str,
    operate=_requeue,
    actionable="would requeue",
    title="Requeue",
    list_endpoint="pages.failed",
    confirm_endpoint="actions.requeue_runs",
    confirm_label=lambda n: f"Requeue {_plural(n, 'run')}",
)
RESEND = Action(
    name="resend",
    needs="resend e-mails",
    field="order_id",
    read_item=_order_id,
    operate=_resend,
    actionable="would send",
    title="Resend welcome e-mails",
    list_endpoint="pages.emails",
    confirm_endpoint="actions.resend_emails",
    confirm_label=lambda n: f"Send {_plural(n, 'e-mail')} again",
)


@bp.post("/failed/dry-run")
def requeue_dry_run() -> Response:
    return dry_run(REQUEUE)


@bp.post("/failed/requeue")
def requeue_runs() -> Response:
    return confirm(REQUEUE)


@bp.post("/emails/dry-run")
def resend_dry_run() -> Response:
    return dry_run(RESEND)


@bp.post("/emails/resend")
def resend_emails() -> Response:
    return confirm(RESEND)


# -- cancelling an Order: one Order, a reason, the same dry run and signed confirmation ---------------

# The longest reason the form takes (the Order's field is 255 characters with what was undone).
CANCEL_REASON_MAX_CHARS = 200


def _cancel_input(order_id: str) -> tuple[str, str]:
    oid = _order_id(order_id)
    reason = request.form.get("reason", "").strip()
    if not reason:
        raise Refused("A cancellation needs a reason. Nothing was changed.")
    if len(reason) > CANCEL_REASON_MAX_CHARS:
        raise Refused(f"The reason is longer than {CANCEL_REASON_MAX_CHARS} characters. Nothing was changed.")
    return oid, reason


def _cancel_confirmed(oid: str, reason: str) -> dict[str, object]:
    return {"action": "cancel", "items": [oid], "reason": reason, "user": user().name}


@bp.post("/orders/<order_id>/cancel/dry-run")
def cancel_dry_run(order_id: str) -> Response:
    """What cancelling the Order would stop and undo, changing nothing, and the signed confirmation."""
    require_operator("cancel Orders")
    oid, reason = _cancel_input(order_id)
    state = console()
    outcome = cancel(state.services, state.publisher(), oid, reason=reason, dry_run=True, user=actor())
    _log("cancel dry run", [oid], [outcome])
    ready = [oid] if outcome.action == "would cancel" else []
    return page(
        "dry_run.html",
        title=f"Cancel Order {oid}: dry run",
        outcomes=[outcome],
        ready=ready,
        field="order_id",
        extra={"reason": reason},
        confirm_url=url_for("actions.cancel_order", order_id=oid),
        cancel_url=url_for("pages.order", order_id=oid),
        confirm_label="Cancel the Order and undo what it got",
        confirmation=state.confirmations.dumps(_cancel_confirmed(oid, reason)) if ready else None,
    )


@bp.post("/orders/<order_id>/cancel")
def cancel_order(order_id: str) -> Response:
    """The cancellation for real, as exactly the dry run by this user showed it (the Order, the reason)."""
    require_operator("cancel Orders")
    oid, reason = _cancel_input(order_id)
    try:
        data = console().confirmations.loads(request.form.get("confirmation", ""), max_age=DRY_RUN_VALID_S)
    except BadSignature:
        data = None
    if data != _cancel_confirmed(oid, reason):
        raise Refused(
            "This confirmation does not match a dry run of this cancellation by you in the last "
            f"{DRY_RUN_VALID_S // 60} minutes: run the dry run again. Nothing was changed."
        )
    state = console()
    outcome = cancel(state.services, state.publisher(), oid, reason=reason, dry_run=False, user=actor())
    _log("cancel", [oid], [outcome])
    return page("done.html", title=f"Cancel Order {oid}", outcomes=[outcome])


def dry_run(action: Action) -> Response:
    """What the action would do to each item, changing nothing, and the confirmation of the rest."""
    require_operator(action.needs)
    items = _items(action)
    outcomes = action.operate(console(), items, True, actor())
    _log(f"{action.name} dry run", items, outcomes)
    ready = [o.target for o in outcomes if o.action == action.actionable]
    return page(
        "dry_run.html",
        title=f"{action.title}: dry run",
        outcomes=outcomes,
        ready=ready,
        field=action.field,
        confirm_url=url_for(action.confirm_endpoint),
        cancel_url=url_for(action.list_endpoint),
        confirm_label=action.confirm_label(len(ready)),
        confirmation=_confirmation(action, ready) if ready else None,
    )


def confirm(action: Action) -> Response:
    """The action for real, on exactly the items a dry run by this user confirmed."""
    require_operator(action.needs)
    items = _items(action)
    _check_confirmation(action, items)
    outcomes = action.operate(console(), items, False, actor())
    _log(action.name, items, outcomes)
    return page("done.html", title=action.title, outcomes=outcomes)


def _items(action: Action) -> list[str]:
    raw = [v.strip() for v in request.form.getlist(action.field) if v.strip()]
    if not raw:
        raise Refused("Nothing was selected: tick at least one row. Nothing was changed.")
    if len(raw) > MAX_ITEMS_PER_ACTION:
        raise Refused(f"At most {MAX_ITEMS_PER_ACTION} at a time. Nothing was changed.")
    return list(dict.fromkeys(action.read_item(v) for v in raw))


def _confirmed(action: Action, items: list[str]) -> dict[str, object]:
    return {"action": action.name, "items": sorted(items), "user": user().name}


def _confirmation(action: Action, items: list[str]) -> str:
    return console().confirmations.dumps(_confirmed(action, items))


def _check_confirmation(action: Action, items: list[str]) -> None:
    token = request.form.get("confirmation", "")
    try:
        data = console().confirmations.loads(token, max_age=DRY_RUN_VALID_S)
    except BadSignature:
        data = None
    if data != _confirmed(action, items):
        raise Refused(
            "This confirmation does not match a dry run of these items by you in the last "
            f"{DRY_RUN_VALID_S // 60} minutes: run the dry run again. Nothing was changed."
        )


def _log(what: str, items: list[str], outcomes: list[Outcome]) -> None:
    principal = user()
    log.warning(
        "console_action",
        user=principal.name,
        via=principal.via,
        action=what,
        items=items,
        outcomes=[f"{o.target}: {o.action}" for o in outcomes],
    )
