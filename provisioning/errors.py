"""The two kinds of failure every client error is, whatever API it came from.

Each client has its own exceptions module with one root error; each of its
errors also derives from one of these, so that the retry policy on the tasks can
say which errors it retries without knowing every client::

    ProvisioningError
    ├── TransientError   worth retrying later: connection errors, timeouts, 429/5xx, SMTP 4xx
    └── PermanentError   retrying cannot help: validation, unknown ids, auth, business rules
        └── OrderRejected  the Order itself cannot be provisioned (raised by the steps)
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of every error raised by this package's clients."""


class TransientError(ProvisioningError):
    """A failure that may succeed when tried again later."""


class PermanentError(ProvisioningError):
    """A failure that the same call will meet again; never retried."""


class OrderRejected(PermanentError):
    """The Order cannot be provisioned as it is (missing data, no pay method, inactive client)."""
