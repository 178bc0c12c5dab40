"""The operators' commands: ``status``, ``runs``, ``failed``, ``requeue``, ``reprovision``, ``emails``,
``resend-email`` and ``quarantine``.

Flower shows tasks, not runs, and cannot resume a chain; these read the ledger,
which is the record of every run, and act on it.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provisioning.core.cli_context import Context, pass_ctx
from provisioning.ledger import BEGIN, RunRecord, RunState
from provisioning.ops.status import (
    RunFilter,
    describe_effects,
    describe_esim,
    describe_run,
    list_runs,
    order_status,
    parse_duration_s,
    started_by,
    table_of,
)
from provisioning.runs.chain import CHAIN
from provisioning.runs.services import Services
from provisioning.salesforce.ids import normalize_id


def parse_duration(text: str) -> float:
    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _console() -> Console:
    return Console(width=140, soft_wrap=False)


def _services(ctx: Context) -> Services:
    return Services(ctx.settings)


def _resolve_order_ids(key: str) -> tuple[str, str | None]:
    """(Order id, run id or None) from a run id or an Order id (15 or 18 characters)."""
    order_part, sep, idem = key.partition(":")
    try:
        order_id = normalize_id(order_part)
    except ValueError as exc:
        raise click.BadParameter(
            f"{key!r} is neither a run id (OrderId:IdemKey) nor an Order id: {exc}"
        ) from None
    return order_id, (f"{order_id}:{idem}" if sep else None)


@click.command()
@click.argument("run_or_order_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def status(ctx: Context, run_or_order_id: str, as_json: bool) -> None:
    """Show an Order (or a run's Order): its effects, and every run with what became of it."""
    services = _services(ctx)
    order_id, only_run = _resolve_order_ids(run_or_order_id)
    state = order_status(services.ledger, order_id)
    runs = [r for r in state.runs if only_run is None or str(r.run_id) == only_run]
    if not runs:
        click.echo(
            f"No run found for {run_or_order_id} (unknown, or expired after the retention period).", err=True
        )
        sys.exit(1)
    if as_json:
        data = state.to_json()
        data["runs"] = [r for r in data["runs"] if only_run is None or r["run_id"] == only_run]
        _emit_json(data)
        return
    console = _console()
    effects = describe_effects(state.provisioning)
    console.print(
        f"[bold]Order {order_id}[/bold]  provisioning {effects['provisioning']}:"
        f"  WHMCS order {effects['whmcs_order_id']}, ICCID {effects['iccid']}, e-mail {effects['email']}"
    )
    console.print(f"  eSIM: {describe_esim(state.esim)}")
    if "cancelled" in effects:
        console.print(f"  [bold]cancelled[/bold] {effects['cancelled']}")
    for run in runs:
        console.print(
            f"\n[bold]{run.run_id}[/bold]  {run.state.value}  started by {started_by(run)}"
            f"  created {_when(run.created_at)}  updated {_when(run.updated_at)}"
        )
        console.print(f"  {describe_run(run, state.provisioning)}")
        if run.state in (RunState.JOINED, RunState.SKIPPED):
            continue
        table = Table("step", "done at", "attempts", "result", "last error")
        steps = table_of(run)
        for spec in steps:
            rec = steps.record(run, state.provisioning, spec)
            result = ", ".join(f"{k}={v}" for k, v in (rec.result or {}).items())
            table.add_row(spec.name, _when(rec.at), str(rec.attempts or ""), result, rec.last_error or "")
        console.print(table)


# The most runs `provisioning runs` lists unless --limit says otherwise.
RUNS_LIST_DEFAULT = 100


@click.command()
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in RunState]),
    help="Only runs in this state (repeat for several).",
)
@click.option(
    "--step",
    type=click.Choice([BEGIN, *CHAIN.names]),
    help="Only runs at (running) or failed at this step.",
)
@click.option(
    "--older-than", metavar="DURATION", help="Only runs created longer ago than this, e.g. 30m, 12h."
)
@click.option(
    "--newer-than", metavar="DURATION", help="Only runs created within this long, e.g. 30m, 12h, 7d."
)
@click.option("--order", "order_id", metavar="ORDER_ID", help="Only the runs of this Order.")
@click.option("--limit", default=RUNS_LIST_DEFAULT, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def runs(
    ctx: Context,
    states: tuple[str, ...],
    step: str | None,
    older_than: str | None,
    newer_than: str | None,
    order_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs, newest first, by state, step, age or Order (the console's runs list)."""
    flt = RunFilter(
        states=frozenset(RunState(s) for s in states),
        step=step,
        older_than_s=parse_duration(older_than) if older_than else None,
        newer_than_s=parse_duration(newer_than) if newer_than else None,
        order_id=_resolve_order_ids(order_id)[0] if order_id else None,
    )
    rows = list_runs(_services(ctx).ledger, flt, limit=limit)
    if as_json:
        _emit_json([row.to_json() for row in rows])
        return
    if not rows:
        click.echo("No runs match.")
        return
    table = Table("run id", "state", "step", "started by", "created", "outcome")
    for row in rows:
        table.add_row(
            str(row.run.run_id),
            row.run.state.value,
            row.step or "-",
            row.started_by,
            _when(row.run.created_at),
            row.outcome,
        )
    _console().print(table)


def _failed_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    return [
        {
            "run_id": str(r.run_id),
            "order_id": r.order_id,
            "failed_at": r.updated_at,
            "step": r.failed_step,
            "reason": r.error,
        }
        for r in runs
    ]


@click.command()
@click.option(
    "--since", "since", metavar="DURATION", help="Only runs failed within this long, e.g. 30m, 12h, 7d."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def failed(ctx: Context, since: str | None, as_json: bool) -> None:
    """List failed runs with the step and the reason (the failed-runs registry)."""
    services = _services(ctx)
    cutoff = time.time() - parse_duration(since) if since else None
    rows = _failed_rows(services.ledger.registries.failed(cutoff))
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No failed runs.")
        return
    table = Table("run id", "failed at", "step", "reason")
    for row in rows:
        table.add_row(row["run_id"], _when(row["failed_at"]), row["step"] or "-", row["reason"] or "")
    _console().print(table)


@click.command()
@click.argument("run_ids", nargs=-1)
@click.option("--all", "all_failed", is_flag=True, help="Requeue every failed run.")
@click.option("--dry-run", is_flag=True, help="Say what would be requeued; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def requeue(ctx: Context, run_ids: tuple[str, ...], all_failed: bool, dry_run: bool, as_json: bool) -> None:
    """Resume failed runs at their failed step (the Order goes back to Activating).

    Completed steps are not repeated. A run that did not fail is left alone, with the reason.
    """
    from provisioning.ops.actions import requeue as do_requeue
    from provisioning.runs.publishing import make_publisher

    if bool(run_ids) == all_failed:
        raise click.UsageError("give RUN_ID... or --all (not both)")
    services = _services(ctx)
    ids = [str(r.run_id) for r in services.ledger.registries.failed()] if all_failed else list(run_ids)
    app = make_publisher(ctx.settings)
    outcomes = do_requeue(services, app, ids, dry_run=dry_run, user=_user())
    if as_json:
        _emit_json([o.to_json() for o in outcomes])
    elif not outcomes:
        click.echo("No failed runs to requeue.")
    else:
        _outcome_table("run id", outcomes)
    if any(o.action == "skipped" for o in outcomes) and not all_failed:
        sys.exit(1)


@click.command()
@click.argument("order_id")
@click.option(
    "--reason", required=True, help="Why (kept on the run and logged), e.g. 'replacement eSIM, ticket 4711'."
)
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def reprovision(ctx: Context, order_id: str, reason: str, dry_run: bool, as_json: bool) -> None:
    """Provision an Order a second time on purpose: a new WHMCS order, eSIM profile and e-mail.

    Events never do this (a second event of an Order reuses its effects); only this
    command does, with a reason. The Order's current provisioning is archived.
    """
    from provisioning.ops.actions import reprovision as do_reprovision
    from provisioning.runs.publishing import make_publisher

    services = _services(ctx)
    oid, _ = _resolve_order_ids(order_id)
    outcome = do_reprovision(
        services, make_publisher(ctx.settings), oid, reason=reason, dry_run=dry_run, user=_user()
    )
    if as_json:
        _emit_json(outcome.to_json())
    else:
        _outcome_table("Order", [outcome])
    if outcome.action == "skipped":
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def emails(ctx: Context, as_json: bool) -> None:
    """Orders whose welcome e-mail the SMTP server refused, with its reply (the Orders stay Activated)."""
    services = _services(ctx)
    found = [
        (oid, at, services.ledger.orders.provisioning(oid).email_error)
        for oid, at in services.ledger.registries.undelivered()
    ]
    if as_json:
        _emit_json([{"order_id": oid, "refused_at": at, "reply": reply} for oid, at, reply in found])
        return
    if not found:
        click.echo("No undelivered e-mails.")
        return
    table = Table("Order", "refused at", "SMTP reply")
    for oid, at, reply in found:
        table.add_row(oid, _when(at), reply or "")
    _console().print(table)


@click.command("resend-email")
@click.argument("order_ids", nargs=-1)
@click.option("--all", "all_undelivered", is_flag=True, help="Every Order listed by `provisioning emails`.")
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def resend_email(
    ctx: Context, order_ids: tuple[str, ...], all_undelivered: bool, dry_run: bool, as_json: bool
) -> None:
    """Send a refused welcome e-mail again, to the address the Order has now (same Message-ID)."""
    from provisioning.ops.actions import resend_email as do_resend

    if bool(order_ids) == all_undelivered:
        raise click.UsageError("give ORDER_ID... or --all (not both)")
    services = _services(ctx)
    ids = (
        [oid for oid, _ in services.ledger.registries.undelivered()]
        if all_undelivered
        else [_resolve_order_ids(o)[0] for o in order_ids]
    )
    outcomes = do_resend(services, ids, dry_run=dry_run, user=_user())
    if as_json:
        _emit_json([o.to_json() for o in outcomes])
    elif not outcomes:
        click.echo("No undelivered e-mails.")
    else:
        _outcome_table("Order", outcomes)
    if any(o.action in ("skipped", "refused") for o in outcomes):
        sys.exit(1)


def _outcome_table(what: str, outcomes: list[Any]) -> None:
    table = Table(what, "action", "step", "detail")
    for o in outcomes:
        table.add_row(o.target, o.action, o.step or "-", o.detail)
    _console().print(table)


def _user() -> str:
    """Who runs the command, for the log line every operator action writes."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@click.command()
@click.option("--limit", default=100, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def quarantine(ctx: Context, limit: int, as_json: bool) -> None:
    """Events the listener rejected, with their replay id and the reason."""
    entries = _services(ctx).ledger.registries.quarantined(limit)
    if as_json:
        _emit_json(entries)
        return
    if not entries:
        click.echo("No quarantined events.")
        return
    table = Table("received", "replay id", "reason", "payload")
    for e in entries:
        table.add_row(
            _when(e.get("received_at")),
            str(e.get("replay_id")),
            e.get("reason", ""),
            json.dumps(e.get("payload"))[:60],
        )
    _console().print(table)


@click.command()
@click.argument("order_id")
@click.option(
    "--reason", required=True, help="Why (kept on the Order and written to it), e.g. 'payment reversed'."
)
@click.option("--dry-run", is_flag=True, help="Say what would be stopped and undone; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@pass_ctx
def cancel(ctx: Context, order_id: str, reason: str, dry_run: bool, as_json: bool) -> None:
    """Cancel an Order: stop its runs before their next effect and undo what it got, each once.

    The eSIM profile is cancelled on the SM-DP+ while not downloaded (and its ICCID returns to
    stock), the WHMCS order cancelled (or its services terminated once accepted), the Order
    written Cancelled with what was undone. Repeating it changes nothing. `--dry-run` first.
    """
    from provisioning.ops.actions import cancel as do_cancel
    from provisioning.runs.publishing import make_publisher

    services = _services(ctx)
    oid, _ = _resolve_order_ids(order_id)
    outcome = do_cancel(
        services, make_publisher(ctx.settings), oid, reason=reason, dry_run=dry_run, user=_user()
    )
    if as_json:
        _emit_json(outcome.to_json())
    else:
        click.echo(f"Order {oid}: {outcome.action}")
        for line in outcome.detail.split("\n"):
            click.echo(f"  {line}")
    if outcome.action == "skipped":
        sys.exit(1)
