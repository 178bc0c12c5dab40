"""``provisioning esim``: the operator's ICCID inventory (load a vendor batch, see the stock)."""

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


def _inventory(settings: Settings) -> EsimInventory:
    from provisioning.core.redis_client import redis_from_settings

    return EsimInventory.on(redis_from_settings(settings), settings.ledger_prefix)
