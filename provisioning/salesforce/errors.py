"""Every error the Salesforce package raises, one tree (like httpx ``_exceptions.py``)::

    SalesforceError                     (provisioning.core.errors.ProvisioningError)
    ├── SalesforceTransientError        (also provisioning.core.errors.TransientError)
    │   ├── SalesforceConnectionError   not reached, connection lost, a TLS record cut short, timeout
    │   └── SalesforceUnavailable       HTTP 5xx/429, REQUEST_LIMIT_EXCEEDED, UNABLE_TO_LOCK_ROW
    └── SalesforcePermanentError        (also provisioning.core.errors.PermanentError)
        ├── SalesforceAuthError         login refused, or 401 again right after a fresh login
        ├── SalesforceRequestError      MALFORMED_ID, INVALID_FIELD, validation rules, other 4xx
        │   └── OrderNotFound           no Order with that Id
        ├── SalesforceEndpointError     the URL cannot be used: certificate does not verify,
        │                               invalid URL, redirect loop
        ├── InvalidSalesforceId         (also ValueError) not a 15/18-character Id
        └── SalesforceStreamingError    the Streaming or Pub/Sub API refused the subscription
            ├── SalesforceEventPermissionError  the integration user may not subscribe to the event
            └── SalesforceEventNotFound     the org has no such Platform Event (NOT_FOUND)

Transport failures (:mod:`provisioning.core.http` classifies them) become these errors
through :data:`TRANSPORT_ERRORS` only. Messages never hold tokens, keys or
customer data; ``status`` and ``error_code`` carry the HTTP status and
Salesforce ``errorCode`` when there was one; ``remedy``, when set, says in a few words what a
person must fix (a refusal no retry cures: the listener logs it once and serves it on /healthz).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError
from provisioning.core.http import Failure, TransportFailure


class SalesforceError(ProvisioningError):
    """Root of every error of the Salesforce package."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        remedy: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.remedy = remedy


class SalesforceTransientError(SalesforceError, TransientError):
    """Worth retrying later."""


class SalesforceConnectionError(SalesforceTransientError):
    """No answer: connection refused or reset, TLS failure, timeout."""


class SalesforceUnavailable(SalesforceTransientError):
    """Salesforce answered but is busy: 5xx, 429, REQUEST_LIMIT_EXCEEDED, UNABLE_TO_LOCK_ROW."""


class SalesforcePermanentError(SalesforceError, PermanentError):
    """The same call will fail again."""


class SalesforceAuthError(SalesforcePermanentError):
    """The JWT login was refused, or a fresh token was refused too."""


class SalesforceRequestError(SalesforcePermanentError):
    """Salesforce rejected the request itself (bad Id, unknown field, validation rule, ...)."""


class OrderNotFound(SalesforceRequestError):
    """No Order has this Id (or the integration user cannot see it)."""


class SalesforceEndpointError(SalesforcePermanentError):
    """The configured URL cannot be used: its certificate does not verify, it is invalid, or it loops."""


class InvalidSalesforceId(SalesforcePermanentError, ValueError):
    """Not a valid 15- or 18-character Salesforce Id."""


class SalesforceStreamingError(SalesforcePermanentError):
    """The Streaming or Pub/Sub API refused the subscription for a reason retrying cannot fix."""


class SalesforceEventPermissionError(SalesforceStreamingError):
    """The integration user lacks read access to the Platform Event (it cannot subscribe)."""


class SalesforceEventNotFound(SalesforceStreamingError):
    """The org has no Platform Event of that name: never deployed, or the channel is misspelt."""


def event_not_found_remedy(channel: str) -> str:
    """What to fix when the org has no event ``channel`` (both transports say so)."""
    return (
        f"deploy the Platform Event {channel.removeprefix('/event/')} to the org, or set "
        "SF_PROVISION_EVENT_CHANNEL to the channel of an event it has"
    )


def event_permission_remedy(channel: str) -> str:
    """What to fix when the integration user may not subscribe to ``channel``."""
    return (
        f"grant Read on the Platform Event {channel.removeprefix('/event/')} in the integration user's "
        "permission set (Platform Event Permissions); README, 'Setting up Salesforce'"
    )


TRANSPORT_ERRORS: Final[Mapping[Failure, type[SalesforceError]]] = MappingProxyType(
    {
        Failure.UNREACHABLE: SalesforceConnectionError,
        Failure.CONNECT_TIMEOUT: SalesforceConnectionError,
        Failure.READ_TIMEOUT: SalesforceConnectionError,
        Failure.CONNECTION_LOST: SalesforceConnectionError,
        Failure.THROTTLED: SalesforceUnavailable,
        Failure.SERVER_ERROR: SalesforceUnavailable,
        Failure.TLS_CERTIFICATE: SalesforceEndpointError,
        Failure.TOO_MANY_REDIRECTS: SalesforceEndpointError,
        Failure.INVALID_URL: SalesforceEndpointError,
        Failure.UNEXPECTED: SalesforceRequestError,
    }
)


def from_transport(failure: TransportFailure, what: str, *, status: int | None = None) -> SalesforceError:
    """The Salesforce error for a classified transport failure; ``what`` says which call."""
    return TRANSPORT_ERRORS[failure.kind](f"{what}: {failure.describe()}", status=status)
