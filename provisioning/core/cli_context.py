"""The CLI's shared context: Settings built once, on first use, so ``--help`` needs no configuration."""

from __future__ import annotations

import sys

import click

from provisioning.core.settings import ConfigError, Settings, load_settings

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
            from provisioning.core.logs import configure_logging

            configure_logging(self._settings)
        return self._settings


pass_ctx = click.make_pass_decorator(Context, ensure=True)
