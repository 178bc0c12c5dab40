"""The ``provisioning`` command: checks, the sandbox, the listener and the operators' tools."""

from __future__ import annotations

import logging
import shutil
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sf-provisioning")
def main() -> None:
    """Provision approved Salesforce Orders: WHMCS, eSIM (ES2+), Salesforce, e-mail, on Celery.

    Configuration comes from the environment and the env file (.env, or the
    file named by PROVISIONING_ENV_FILE); see README.md for every variable.
    """


@main.command()
def check() -> None:
    """Validate the settings and reach every configured dependency: every problem, one line each.

    Exits 2 when a setting is invalid (the probes still run for what is valid), 1 when a probe
    failed, 0 otherwise.
    """
    from provisioning.core.cli_context import EXIT_CONFIG
    from provisioning.core.logs import configure_logging
    from provisioning.core.settings import ConfigError, load_settings_leniently
    from provisioning.ops.checks import format_results, run_checks

    try:
        settings, config_error = load_settings_leniently()
    except ConfigError as exc:  # not even the defaults in place of the invalid values make settings
        click.echo(exc.render(), err=True)
        sys.exit(EXIT_CONFIG)
    configure_logging(settings)
    # The probes' own log lines (an expected "Client Not Found", say) would only blur the table.
    logging.getLogger().setLevel(logging.ERROR)
    results = run_checks(settings, config_error)
    for line in format_results(results, shutil.get_terminal_size().columns):
        click.echo(line)
    if config_error is not None:
        sys.exit(EXIT_CONFIG)
    if any(r.status == "FAIL" for r in results):
        sys.exit(1)


def _add_commands() -> None:
    from provisioning.listener import listen
    from provisioning.notify import esim_notify
    from provisioning.ops import commands as operators
    from provisioning.ops.console.cli import console
    from provisioning.ops.esim_commands import esim
    from provisioning.ops.exporter import metrics
    from provisioning.ops.salesforce_commands import salesforce
    from provisioning.ops.worker_commands import worker
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
        operators.cancel,
        sandbox,
        listen,
        esim_notify,
        metrics,
        console,
        esim,
        salesforce,
        worker,
        demo,
    ):
        main.add_command(command)


_add_commands()
