"""Every error the Salesforce package raises, one tree (like httpx ``_exceptions.py``)::

    SalesforceError                     (provisioning.errors.ProvisioningError)
    ├── SalesforceTransientError        (also provisioning.errors.TransientError)
    │   ├── SalesforceConnectionError   connection refused/reset, TLS failure, timeout
    │   └── SalesforceUnavailable       HTTP 5xx/429, REQUEST_LIMIT_EXCEEDED, UNABLE_TO_LOCK_ROW
    └── SalesforcePermanentError        (also provisioning.errors.PermanentError)
        ├── SalesforceAuthError         login refused, or 401 again right after a fresh login
        ├── SalesforceRequestError      MALFORMED_ID, INVALID_FIELD, validation rules, other 4xx
        │   └── OrderNotFound           no Order with that Id
        ├── InvalidSalesforceId         (also ValueError) not a 15/18-character Id
        └── SalesforceStreamingError    the Streaming or Pub/Sub API refused the subscription
            └── SalesforceEventPermissionError  the integration user may not subscribe to the event

Messages never hold tokens, keys or customer data; ``status`` and ``error_code``
carry the HTTP status and Salesforce ``errorCode`` when there was one.
"""

from __future__ import annotations

from provisioning.errors import PermanentError, ProvisioningError, TransientError


class SalesforceError(ProvisioningError):
    """Root of every error of the Salesforce package."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


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


class InvalidSalesforceId(SalesforcePermanentError, ValueError):
    """Not a valid 15- or 18-character Salesforce Id."""


class SalesforceStreamingError(SalesforcePermanentError):
    """The Streaming or Pub/Sub API refused the subscription for a reason retrying cannot fix."""


class SalesforceEventPermissionError(SalesforceStreamingError):
    """The integration user lacks read access to the Platform Event (it cannot subscribe)."""
