"""The operators' commands: ``status``, ``failed``, ``requeue`` and ``quarantine``.

Flower shows tasks, not runs, and cannot resume a chain; these read the ledger,
which is the record of every run, and act on it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provisioning.clictx import Context, pass_ctx
from provisioning.ledger import STEPS, RunRecord
from provisioning.salesforce.ids import normalize_id
from provisioning.services import Services

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r}: expected a number and a unit, like 30m, 12h or 7d")
    return int(match.group(1)) * _UNITS_S[match.group(2)]


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


def _resolve_run_ids(services: Services, key: str) -> list[str]:
    """A run id, or an Order id (15 or 18 characters) standing for all its runs."""
    if ":" in key:
        order_part, _, idem = key.partition(":")
        try:
            return [f"{normalize_id(order_part)}:{idem}"]
        except ValueError:
            return [key]
    try:
        order_id = normalize_id(key)
    except ValueError as exc:
        raise click.BadParameter(
            f"{key!r} is neither a run id (OrderId:IdemKey) nor an Order id: {exc}"
        ) from None
    return services.ledger.runs_for_order(order_id)


@click.command()
@click.argument("run_or_order_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def status(ctx: Context, run_or_order_id: str, as_json: bool) -> None:
    """Show a run (or every run of an Order): its state and each step with time, result ids and last error."""
    services = _services(ctx)
    runs = [r for r in (services.ledger.get(i) for i in _resolve_run_ids(services, run_or_order_id)) if r]
    if not runs:
        click.echo(
            f"No run found for {run_or_order_id} (unknown, or expired after the retention period).", err=True
        )
        sys.exit(1)
    if as_json:
        _emit_json([r.to_json() for r in runs])
        return
    console = _console()
    for run in runs:
        console.print(
            f"[bold]{run.run_id}[/bold]  state: {run.state.value}  created: {_when(run.created_at)}"
            f"  updated: {_when(run.updated_at)}"
        )
        if run.error:
            console.print(f"  failed at {run.failed_step}: {run.error}")
        table = Table("step", "done at", "attempts", "result", "last error")
        for name in STEPS:
            rec = run.step(name)
            result = ", ".join(f"{k}={v}" for k, v in (rec.result or {}).items())
            table.add_row(name, _when(rec.at), str(rec.attempts or ""), result, rec.last_error or "")
        console.print(table)


def _failed_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r.run_id,
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
    rows = _failed_rows(services.ledger.failed_runs(cutoff))
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
    from provisioning.runs import make_publisher
    from provisioning.runs import requeue as do_requeue

    if bool(run_ids) == all_failed:
        raise click.UsageError("give RUN_ID... or --all (not both)")
    services = _services(ctx)
    ids = [r.run_id for r in services.ledger.failed_runs()] if all_failed else list(run_ids)
    app = make_publisher(ctx.settings)
    outcomes = do_requeue(services, app, ids, dry_run=dry_run)
    if as_json:
        _emit_json([o.__dict__ for o in outcomes])
    elif not outcomes:
        click.echo("No failed runs to requeue.")
    else:
        table = Table("run id", "action", "step", "detail")
        for o in outcomes:
            table.add_row(o.run_id, o.action, o.step or "-", o.detail)
        _console().print(table)
    if any(o.action == "skipped" for o in outcomes) and not all_failed:
        sys.exit(1)


@click.command()
@click.option("--limit", default=100, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def quarantine(ctx: Context, limit: int, as_json: bool) -> None:
    """Events the listener rejected, with their replay id and the reason."""
    entries = _services(ctx).ledger.quarantined(limit)
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
