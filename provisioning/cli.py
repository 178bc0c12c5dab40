"""The ``provisioning`` command: checks, the sandbox, the listener and the operators' tools."""

from __future__ import annotations

import sys
import click

from provisioning.settings import ConfigError, Settings, load_settings

# Exit code for configuration errors (as argparse/click use for usage errors).
EXIT_CONFIG = 2


class Context:
    """Settings are built on first use, once, so ``--help`` works with any environment."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings()
            except ConfigError as exc:
                click.echo(exc.render(), err=True)
                sys.exit(EXIT_CONFIG)
            from provisioning.logs import configure_logging

            configure_logging(self._settings)
        return self._settings


pass_ctx = click.make_pass_decorator(Context, ensure=True)


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

    results = run_checks(ctx.settings)
    width = max(len(r.name) for r in results)
    for r in results:
        click.echo(f"{r.status:<4}  {r.name:<{width}}  {r.detail}")
    if any(r.status == "FAIL" for r in results):
        sys.exit(1)
