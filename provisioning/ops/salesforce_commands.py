"""``provisioning salesforce``: what setting up the customer's Salesforce org needs from this side.

The org's side is the DX project under ``salesforce/`` (docs/salesforce-setup.md);
these commands make what it needs from us. They read no settings, so they run before
there is any configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from provisioning.salesforce.keys import DEFAULT_VALID_DAYS, MAX_VALID_DAYS, KeyFilesExist, generate_key_pair

# The External Client App whose certificate it is, and how the deploy takes it (salesforce/sfdx-project.json).
EXTERNAL_CLIENT_APP = "Provisioning_Service"
CERTIFICATE_VARIABLE = "PROVISIONING_JWT_CERTIFICATE"


@click.group()
def salesforce() -> None:
    """Set up the Salesforce side: the JWT bearer flow's keys (see docs/salesforce-setup.md)."""


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
