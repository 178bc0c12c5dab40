"""Errors of the WHMCS client; the only ones :mod:`provisioning.whmcs.client` raises.

::

    WhmcsError                        (ProvisioningError)
    ├── WhmcsTransientError           (TransientError) connection errors, timeouts, HTTP 429/5xx,
    │                                 a body that is not a JSON object, a database error
    │                                 (``SQLSTATE[...]``) in the error envelope
    └── WhmcsPermanentError           (PermanentError) the error envelope in general (unknown ids,
        │                             business rules), other HTTP 4xx, a redirect, a TLS
        │                             certificate that does not verify, an invalid URL
        ├── WhmcsAuthError            Authentication Failed, Invalid IP, IP Banned, Invalid or
        │                             missing credentials, Access Denied, Invalid Permissions,
        │                             HTTP 401/403: never retried (3 failed logins ban the IP)
        ├── WhmcsClientNotFound       Client Not Found / Client ID Not Found
        └── WhmcsOrderNotPending      AcceptOrder's "Order ID not found or Status not Pending":
                                      after a retry, confirm with GetOrders that the order is Active

Transport failures (classified by :mod:`provisioning.core.http`) become these errors through
:data:`TRANSPORT_ERRORS` only. A transient error of a write (AddOrder, AcceptOrder) may come after WHMCS applied it: look the
order up (``find_order_by_note``) before calling AddOrder again.

Messages hold the action, the HTTP status and WHMCS's own message; never the API identifier or
secret (WHMCS's messages do not quote them, and the client scrubs them anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError
from provisioning.core.http import RULES, Failure, TransportFailure


class WhmcsError(ProvisioningError):
    """Root of the WHMCS client's errors.

    ``action`` is the API action, ``status`` the HTTP status when there was a response, and
    ``api_message`` the ``message`` of WHMCS's error envelope when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        action: str | None = None,
        status: int | None = None,
        api_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.action = action
        self.status = status
        self.api_message = api_message


class WhmcsTransientError(WhmcsError, TransientError):
    """The call failed for now; it may succeed later (a write may have been applied)."""


class WhmcsPermanentError(WhmcsError, PermanentError):
    """WHMCS refused the call; the same call will be refused again."""


class WhmcsAuthError(WhmcsPermanentError):
    """Credentials or access refused. Never retry: three failed logins ban the IP for 15 minutes."""


class WhmcsClientNotFound(WhmcsPermanentError):
    """No WHMCS client with that id."""


class WhmcsOrderNotPending(WhmcsPermanentError):
    """AcceptOrder on an order that does not exist or is no longer Pending (e.g. already accepted)."""


# Every transient kind is a WhmcsTransientError, every permanent one a WhmcsPermanentError.
TRANSPORT_ERRORS: Final[Mapping[Failure, type[WhmcsError]]] = MappingProxyType(
    {kind: WhmcsTransientError if rule.transient else WhmcsPermanentError for kind, rule in RULES.items()}
)


def from_transport(failure: TransportFailure, action: str, *, status: int | None = None) -> WhmcsError:
    """The WHMCS error for a classified transport failure of ``action``."""
    return TRANSPORT_ERRORS[failure.kind](
        f"WHMCS {action}: {failure.describe()}", action=action, status=status
    )
