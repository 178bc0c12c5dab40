"""``provisioning salesforce``: what setting up the customer's Salesforce org needs from this side.

The org's side is the DX project under ``salesforce/`` (docs/salesforce-setup.md). ``keys`` makes
what it needs from us and reads no settings, so it runs before there is any configuration;
``check`` asks the live org, with the service's settings, whether it has what the service needs
(:mod:`provisioning.ops.checks.salesforce_org`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from provisioning.salesforce.keys import DEFAULT_VALID_DAYS, MAX_VALID_DAYS, KeyFilesExist, generate_key_pair

# The External Client App whose certificate it is, and how the deploy takes it (salesforce/sfdx-project.json).
EXTERNAL_CLIENT_APP = "Provisioning_Service"
CERTIFICATE_VARIABLE = "PROVISIONING_JWT_CERTIFICATE"


@click.group()
def salesforce() -> None:
    """Set up the Salesforce side: the JWT bearer flow's keys, and a check of the live org (docs/salesforce-setup.md)."""


@salesforce.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write salesforce-jwt.key and salesforce-jwt.crt into (created if needed).",
)
@click.option(
    "--days",
    type=click.IntRange(1, MAX_VALID_DAYS),
    default=DEFAULT_VALID_DAYS,
    show_default=True,
    help="Days the certificate is valid.",
)
@click.option("--force", is_flag=True, help="Replace an existing key and certificate.")
def keys(out_dir: Path, days: int, force: bool) -> None:
    """Make the JWT bearer flow's RSA key and its self-signed certificate.

    The private key (mode 0600) is SF_PRIVATE_KEY_FILE and stays on the service's
    hosts; the certificate goes on the External Client App when the salesforce/
    project is deployed. Existing files are kept unless --force is given.
    """
    try:
        pair = generate_key_pair(out_dir, days=days, force=force)
    except KeyFilesExist as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    key_file, cert_file = pair.key_file.resolve(), pair.cert_file.resolve()
    click.echo(f"Private key  {key_file}  (RSA 2048, mode 0600)")
    click.echo(f"  Keep it secret and never commit it; the service reads it: SF_PRIVATE_KEY_FILE={key_file}")
    click.echo(
        f"Certificate  {cert_file}  (self-signed, valid until {pair.not_valid_after:%Y-%m-%d}, "
        f"SHA-256 {pair.sha256_fingerprint})"
    )
    click.echo(
        f"  It goes on the External Client App {EXTERNAL_CLIENT_APP}, put in at deploy time (in salesforce/):"
    )
    click.echo(
        f'    {CERTIFICATE_VARIABLE}="$(cat {cert_file})" '
        "sf project deploy start --source-dir force-app --target-org ORG"
    )
    click.echo("  See docs/salesforce-setup.md for the other steps.")


@salesforce.command()
def check() -> None:
    """Check the live org against what the service needs: one line per item, with the fix.

    With the service's settings and credentials: the JWT login; every field the service reads or
    writes (SF_FIELD_* and its query), with a type compatible with salesforce/ and the access it
    needs; the Platform Event of SF_PROVISION_EVENT_CHANNEL and the right to subscribe to it; the
    flows active; the daily API budget left. Exits 0 only when all hold, 1 when one does not, 2
    when a setting it uses is invalid or missing.
    """
    import logging

    from provisioning.core.cli_context import EXIT_CONFIG
    from provisioning.core.logs import configure_logging
    from provisioning.core.settings import ConfigError, load_settings
    from provisioning.ops.checks import format_results
    from provisioning.ops.checks.salesforce_org import org_lines

    try:
        settings = load_settings()
        settings.require("sf_login_url", "sf_client_id", "sf_username", "sf_private_key_file")
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(EXIT_CONFIG)
    configure_logging(settings)
    logging.getLogger().setLevel(logging.ERROR)
    results = org_lines(settings)
    for line in format_results(results, shutil.get_terminal_size().columns):
        click.echo(line)
    if any(r.status in ("FAIL", "SKIP") for r in results):
        sys.exit(1)
