"""Errors of the e-mail sender; the only ones :mod:`provisioning.email.sender` raises.

::

    EmailError                         (ProvisioningError)
    ├── EmailTransientError            (TransientError) 4xx replies, disconnects, refused or reset
    │   │                              connections, timeouts: worth sending again later
    │   └── EmailDeliveryUnknownError  the connection was lost after the message was handed
    │                                  over: the server may have accepted it (a resend may duplicate)
    └── EmailPermanentError            (PermanentError) 5xx replies, every recipient refused,
                                       authentication refused, a server lacking STARTTLS or AUTH

Messages hold the SMTP stage and reply codes only: never a password, an address
or the server's reply text (which often quotes the recipient's address).
"""

from __future__ import annotations

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError


class EmailError(ProvisioningError):
    """Root of the e-mail sender's errors. ``code`` is the SMTP reply code, when there was one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EmailTransientError(EmailError, TransientError):
    """Sending failed for now; the same message may go through later."""


class EmailDeliveryUnknownError(EmailTransientError):
    """The connection was lost after the message was sent: it may have been delivered."""


class EmailPermanentError(EmailError, PermanentError):
    """The server refused the message (or us) for good."""
