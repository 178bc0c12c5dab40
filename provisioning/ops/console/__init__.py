"""The operators' web console (``provisioning console``): runs, Orders, failed runs, e-mails, stock.

It needs the ``console`` extra (``pip install 'sf-provisioning[console]'``):
Flask (with Jinja2), Flask-WTF (CSRF), waitress and argon2-cffi, which workers
and the listener never import. This module and :mod:`provisioning.ops.console.cli`
import without it.
"""

from __future__ import annotations

import importlib.util

CONSOLE_EXTRA_PACKAGES = ("flask", "flask_wtf", "waitress", "argon2")
CONSOLE_INSTALL_HINT = "pip install 'sf-provisioning[console]'"


def missing_console_packages() -> list[str]:
    """The packages of the ``console`` extra that cannot be imported here."""
    missing = []
    for name in CONSOLE_EXTRA_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing
