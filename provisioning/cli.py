"""The ``provisioning`` command: checks, the sandbox, the listener and the operators' tools."""

from __future__ import annotations

import logging
import sys

import click

from provisioning.clictx import Context, pass_ctx


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sf-provisioning")
def main() -> None:
    """Provision approved Salesforce Orders: WHMCS, eSIM (ES2+), Salesforce, e-mail, on Celery.

    Configuration comes from the environment and the env file (.env, or the
    file named by PROVISIONING_ENV_FILE); see README.md for every variable.
    """


@main.command()
@pass_ctx
def check(ctx: Context) -> None:
    """Validate the settings and reach every configured dependency (one OK/FAIL line each)."""
    from provisioning.checks import run_checks

    settings = ctx.settings
    # The probes' own log lines (an expected "Client Not Found", say) would only blur the table.
    logging.getLogger().setLevel(logging.ERROR)
    results = run_checks(settings)
    width = max(len(r.name) for r in results)
    for r in results:
        click.echo(f"{r.status:<4}  {r.name:<{width}}  {r.detail}")
    if any(r.status == "FAIL" for r in results):
        sys.exit(1)


def _add_commands() -> None:
    from provisioning import operators
    from provisioning.console.cli import console
    from provisioning.esim.cli import esim
    from provisioning.exporter import metrics
    from provisioning.listener import listen
    from provisioning.salesforce_commands import salesforce
    from provisioning.sandbox import missing_sandbox_packages
    from provisioning.sandbox.cli import needs_sandbox_extra, sandbox

    # The demo imports the simulators at once; without the sandbox extra it only says what to install.
    if missing_sandbox_packages():
        demo = needs_sandbox_extra("demo", "The end-to-end demo against the simulators.")
    else:
        from provisioning.demo import demo

    for command in (
        operators.status,
        operators.runs,
        operators.failed,
        operators.requeue,
        operators.reprovision,
        operators.emails,
        operators.resend_email,
        operators.quarantine,
        sandbox,
        listen,
        metrics,
        console,
        esim,
        salesforce,
        demo,
    ):
        main.add_command(command)


_add_commands()
