"""The ES2+ notification endpoint's process (``provisioning esim-notify``): see :mod:`.server`."""

from __future__ import annotations

import sys

import click

from provisioning.core.cli_context import Context, pass_ctx


@click.command("esim-notify")
@click.option("--port", type=int, default=None, help="Port (default ESIM_NOTIFY_PORT).")
@pass_ctx
def esim_notify(ctx: Context, port: int | None) -> None:
    """Serve the ES2+ handleDownloadProgressInfo endpoint the SM-DP+ calls (HTTPS, mutual TLS or the
    requester id), record each notification once, move the eSIM's state and write it to the Order."""
    from provisioning.notify.server import NotifyConfigError, serve

    settings = ctx.settings
    if port is not None:
        settings = settings.model_copy(update={"esim_notify_port": port})
    try:
        serve(settings)
    except NotifyConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
