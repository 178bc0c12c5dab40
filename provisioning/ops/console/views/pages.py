"""The reading pages: runs, an Order with its runs' timelines, failed runs, refused e-mails,
quarantined events, eSIM stock, the listener. Each reads through the functions the CLI uses."""

from __future__ import annotations

from flask import Blueprint, Response, redirect, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from provisioning.core.run_id import RunId
from provisioning.ledger import BEGIN, RunState
from provisioning.ops.console.formatting import mask_emails
from provisioning.ops.console.state import console
from provisioning.ops.console.timeline import timeline
from provisioning.ops.console.web import Refused, page
from provisioning.ops.status import (
    RunFilter,
    describe_effects,
    describe_esim,
    describe_run,
    list_runs,
    order_status,
    parse_duration_s,
    started_by,
)
from provisioning.runs.chain import CHAIN
from provisioning.salesforce.ids import normalize_id
from provisioning.step.spec import System

bp = Blueprint("pages", __name__)

# Rows on the runs page.
RUNS_PAGE_ROWS = 200
QUARANTINE_PAGE_ROWS = 200
# The Order page reloads itself this often while a run of the Order is in flight.
ORDER_REFRESH_S = 3
FILTERS = ("state", "step", "older_than", "newer_than", "order")


@bp.get("/")
def index() -> BaseResponse:
    return redirect(url_for("pages.runs"))


@bp.get("/runs")
def runs() -> Response:
    chosen = {k: request.args.get(k, "").strip() for k in FILTERS}
    try:
        flt = run_filter(chosen)
    except ValueError as exc:
        return page("runs.html", 400, rows=[], chosen=chosen, message=str(exc))
    rows = list_runs(console().services.ledger, flt, limit=RUNS_PAGE_ROWS)
    return page("runs.html", rows=rows, chosen=chosen, limit=RUNS_PAGE_ROWS)


@bp.get("/orders/<order_id>")
def order(order_id: str) -> Response:
    ledger = console().services.ledger
    try:
        oid = normalize_id(order_id)
    except ValueError as exc:
        raise Refused(f"{order_id!r} is not a Salesforce Order Id: {exc}", 404) from None
    state = order_status(ledger, oid)
    if not state.runs:
        raise Refused(f"The ledger holds no run of Order {oid} (unknown, or past the retention period).", 404)
    try:
        email = ledger.orders.snapshot(oid).get("email")
    except LookupError:
        email = None
    in_flight = any(r.state.unfinished for r in state.runs)
    return page(
        "order.html",
        order_id=oid,
        effects=describe_effects(state.provisioning),
        esim=describe_esim(state.esim),
        email=mask_emails(email) if email else None,
        runs=[
            {
                "run": r,
                "outcome": describe_run(r, state.provisioning),
                "started_by": started_by(r),
                "timeline": timeline(r, state.provisioning),
            }
            for r in reversed(state.runs)
        ],
        refresh_s=ORDER_REFRESH_S if in_flight else None,
    )


@bp.get("/runs/<path:run_id>")
def run(run_id: str) -> BaseResponse:
    try:
        rid = RunId.parse(run_id)
    except ValueError as exc:
        raise Refused(f"{run_id!r} is not a run id (OrderId:IdemKey): {exc}", 404) from None
    if console().services.ledger.runs.get(rid) is None:
        raise Refused(f"Run {rid} is not in the ledger (unknown, or past the retention period).", 404)
    return redirect(url_for("pages.order", order_id=rid.order_id, _anchor=f"run-{rid}"))


@bp.get("/failed")
def failed() -> Response:
    return page("failed.html", runs=console().services.ledger.registries.failed())


@bp.get("/emails")
def emails() -> Response:
    ledger = console().services.ledger
    found = [
        (oid, at, ledger.orders.provisioning(oid).email_error) for oid, at in ledger.registries.undelivered()
    ]
    return page("emails.html", found=found)


@bp.get("/quarantine")
def quarantine() -> Response:
    return page(
        "quarantine.html", entries=console().services.ledger.registries.quarantined(QUARANTINE_PAGE_ROWS)
    )


@bp.get("/esim")
def esim() -> Response:
    state = console()
    threshold = state.settings.esim_stock_warn_threshold
    stock = state.services.inventory.stock()
    return page("esim.html", stock=stock, threshold=threshold, low=stock.free < threshold)


@bp.get("/listener")
def listener() -> Response:
    state = console()
    settings = state.settings
    ledger = state.services.ledger
    listener_state = ledger.listener.state(settings.sf_provision_event_channel)
    breakers = ledger.limits.breakers([s.value for s in System])
    rates = {s.value: state.services.protection.rate(s) for s in System}
    return page(
        "listener.html",
        state=listener_state,
        lock_ttl_s=settings.listener_lock_ttl_s,
        breakers=breakers,
        rates=rates,
        api_usage=ledger.limits.api_usage(),
    )


def run_filter(chosen: dict[str, str]) -> RunFilter:
    state = chosen["state"]
    step = chosen["step"]
    if state and state not in {s.value for s in RunState}:
        raise ValueError(f"unknown state {state!r}: choose one of the list")
    if step and step not in {BEGIN, *CHAIN.names}:
        raise ValueError(f"unknown step {step!r}: choose one of the list")
    order_id = None
    if chosen["order"]:
        try:
            order_id = normalize_id(chosen["order"].partition(":")[0])
        except ValueError as exc:
            raise ValueError(f"Order: {chosen['order']!r} is not a Salesforce Order Id: {exc}") from None
    return RunFilter(
        states=frozenset({RunState(state)}) if state else frozenset(),
        step=step or None,
        older_than_s=parse_duration_s(chosen["older_than"]) if chosen["older_than"] else None,
        newer_than_s=parse_duration_s(chosen["newer_than"]) if chosen["newer_than"] else None,
        order_id=order_id,
    )
