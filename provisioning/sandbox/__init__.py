"""Local simulators of Salesforce, WHMCS, SM-DP+ and SMTP, for the demo, the tests and the benchmarks.

They need the ``sandbox`` extra (``pip install 'sf-provisioning[sandbox]'``):
aiohttp, aiosmtpd and trustme, which workers and the listener never import.
This module and :mod:`provisioning.sandbox.processes`,
:mod:`provisioning.sandbox.redis_server` and :mod:`provisioning.sandbox.cli`
import without it.
"""

from __future__ import annotations

import importlib.util

SANDBOX_EXTRA_PACKAGES = ("aiohttp", "aiosmtpd", "trustme")
SANDBOX_INSTALL_HINT = "pip install 'sf-provisioning[sandbox]'"


def missing_sandbox_packages() -> list[str]:
    """The packages of the ``sandbox`` extra that cannot be imported here."""
    missing = []
    for name in SANDBOX_EXTRA_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing
