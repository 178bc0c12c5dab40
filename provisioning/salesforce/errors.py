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
through :data:`TRANSPORT_ERRORS` only, and Salesforce's error answers (which simple-salesforce
raises as its own exceptions, one per HTTP status) through :func:`from_answer` only: the
``errorCode`` first (:data:`TRANSIENT_ERROR_CODES`), then the status (429 and 5xx are busy),
then :data:`ANSWER_ERRORS`, simple-salesforce's class to ours. Messages never hold tokens, keys or
customer data; ``status`` and ``error_code`` carry the HTTP status and
Salesforce ``errorCode`` when there was one; ``remedy``, when set, says in a few words what a
person must fix (a refusal no retry cures: the listener logs it once and serves it on /healthz).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from simple_salesforce import exceptions as sf

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError
from provisioning.core.http import Failure, TransportFailure, status_failure


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


# errorCodes worth retrying later whatever the HTTP status says (REQUEST_LIMIT_EXCEEDED is a 403).
TRANSIENT_ERROR_CODES: Final = frozenset(
    {"REQUEST_LIMIT_EXCEEDED", "UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "QUERY_TIMEOUT"}
)

# simple-salesforce's exception for each status (its util.exception_handler) -> ours, once the
# errorCode and the status have had their say. 401 arrives here only after the one renewal.
ANSWER_ERRORS: Final[Mapping[type[sf.SalesforceError], type[SalesforceError]]] = MappingProxyType(
    {
        sf.SalesforceMoreThanOneRecord: SalesforceRequestError,  # 300
        sf.SalesforceMalformedRequest: SalesforceRequestError,  # 400
        sf.SalesforceExpiredSession: SalesforceAuthError,  # 401
        sf.SalesforceRefusedRequest: SalesforceRequestError,  # 403
        sf.SalesforceResourceNotFound: SalesforceRequestError,  # 404
        sf.SalesforceGeneralError: SalesforceRequestError,  # any other status
    }
)
# Characters of an error answer that is not Salesforce's JSON kept in the message.
ERROR_BODY_MAX_CHARS = 200


def first_error(content: object) -> tuple[str | None, str]:
    """errorCode and message of a Salesforce error body (a JSON array of errors, usually)."""
    first = content[0] if isinstance(content, list) and content else content
    if isinstance(first, dict):
        code = first.get("errorCode") or first.get("error")
        message = first.get("message") or first.get("error_description") or ""
        return (str(code) if code else None), str(message)
    if isinstance(content, bytes):
        content = content.decode("utf-8", "replace")
    return None, str(content)[:ERROR_BODY_MAX_CHARS]


def from_answer(
    exc: sf.SalesforceError, what: str, *, not_found: type[SalesforceError] | None = None
) -> SalesforceError:
    """THE place where an error answer of Salesforce becomes one of our errors.

    ``not_found`` is the class of a 404 (OrderNotFound for a call about one Order).
    """
    status = int(exc.status)
    code, message = first_error(exc.content)
    text = f"{what}: HTTP {status} {code or ''}: {message}".replace("  ", " ")
    if code in TRANSIENT_ERROR_CODES or status_failure(status) is not None:
        return SalesforceUnavailable(text, status=status, error_code=code)
    if not_found is not None and status == 404:
        return not_found(text, status=status, error_code=code)
    kind = ANSWER_ERRORS.get(type(exc), SalesforceRequestError)
    return kind(text, status=status, error_code=code)
