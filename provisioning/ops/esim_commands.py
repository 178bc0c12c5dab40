"""``provisioning esim``: the operator's ICCID inventory (load a vendor batch, see the stock, reclaim the
profiles released and never downloaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from provisioning.core.cli_context import Context, pass_ctx
from provisioning.core.settings import Settings
from provisioning.esim.errors import InventoryFileError
from provisioning.ledger.inventory import EsimInventory


@click.group()
def esim() -> None:
    """The eSIM profile inventory: ICCIDs received from the SM-DP+ vendor, claimed one per run."""


@esim.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def load(ctx: Context, file: Path) -> None:
    """Import a profile batch: one ICCID a line, or the vendor's CSV with an ICCID column.

    Malformed ICCIDs are listed with their line numbers and nothing is loaded;
    ICCIDs already known are skipped, so loading a batch twice adds nothing.
    """
    from provisioning.esim.batch import parse_batch

    try:
        iccids = parse_batch(file)
    except InventoryFileError as exc:
        click.echo(str(exc), err=True)
        click.echo("Fix those lines (or remove them) and load the file again.", err=True)
        sys.exit(1)
    inventory = _inventory(ctx.settings)
    added = inventory.load(iccids)
    stock = inventory.stock()
    click.echo(
        f"{added} ICCIDs added ({len(iccids) - added} already known); free {stock.free}, "
        f"claimed {stock.claimed}, used {stock.used}"
    )


@esim.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def stock(ctx: Context, as_json: bool) -> None:
    """How many ICCIDs are free, claimed (by a run in progress) and used; warns when low."""
    settings = ctx.settings
    inventory = _inventory(settings)
    current = inventory.stock()
    low = current.free < settings.esim_stock_warn_threshold
    if as_json:
        click.echo(
            json.dumps(
                {
                    "free": current.free,
                    "claimed": current.claimed,
                    "used": current.used,
                    "low": low,
                    "threshold": settings.esim_stock_warn_threshold,
                }
            )
        )
        return
    click.echo(f"free {current.free}  claimed {current.claimed}  used {current.used}")
    if low:
        click.echo(
            f"WARNING: fewer than {settings.esim_stock_warn_threshold} free ICCIDs "
            "(ESIM_STOCK_WARN_THRESHOLD); load a new batch with `provisioning esim load FILE`.",
            err=True,
        )


@esim.command()
@click.option("--reclaim", is_flag=True, help="Cancel them on the SM-DP+ and return their ICCIDs to stock.")
@click.option("--yes", is_flag=True, help="With --reclaim: do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def stale(ctx: Context, reclaim: bool, yes: bool, as_json: bool) -> None:
    """Profiles released ESIM_RECLAIM_AFTER_DAYS ago or more and never downloaded; with --reclaim
    (after a confirmation) each is cancelled on the SM-DP+ and its ICCID returned to the stock.

    The customer's activation code stops working: reclaim only what sales agreed to give up.
    """
    import getpass
    import time

    from provisioning.ops.actions import reclaim_esims, stale_esims
    from provisioning.runs.services import Services

    services = Services(ctx.settings)
    found = stale_esims(services)
    rows = [
        {
            "iccid": p.iccid,
            "order_id": p.order_id,
            "state": p.state.value,
            "released_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.released_at)),
            "reason": p.reason,
        }
        for p in found
    ]
    if not reclaim:
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(
            f"{len(rows)} profile(s) released {ctx.settings.esim_reclaim_after_days:g} days ago or more, never downloaded"
        )
        for row in rows:
            click.echo(
                f"  {row['iccid']}  Order {row['order_id']}  {row['state']}  released {row['released_at']} UTC"
            )
        return
    if not found:
        click.echo("Nothing to reclaim.")
        return
    if not yes and not click.confirm(
        f"Cancel {len(found)} profile(s) on the SM-DP+ and return them to stock?"
    ):
        sys.exit(1)
    outcomes = reclaim_esims(services, [p.iccid for p in found], user=getpass.getuser())
    if as_json:
        click.echo(json.dumps([o.to_json() for o in outcomes], indent=2))
        return
    for outcome in outcomes:
        click.echo(f"  {outcome.target}  {outcome.action}  {outcome.detail}")


def _inventory(settings: Settings) -> EsimInventory:
    from provisioning.core.redis_client import redis_from_settings

    return EsimInventory.on(redis_from_settings(settings), settings.ledger_prefix)
