"""Errors of the eSIM domain: the ES2+ client and the profile batch files.

Every ES2+ call raises an :class:`Es2PlusError`; a malformed batch file an
:class:`InventoryFileError` (the inventory's own errors, Redis-side, are in
:mod:`provisioning.ledger.inventory`). Each leaf also derives from
:class:`provisioning.core.errors.TransientError` or :class:`~provisioning.core.errors.PermanentError`::

    ProvisioningError
    └── EsimError
        ├── Es2PlusError
        │   ├── Es2PlusTransientError            (TransientError)
        │   │   ├── Es2PlusConnectionError       refused, reset, TLS record cut short, response lost
        │   │   ├── Es2PlusTimeout               connect or read timeout
        │   │   ├── Es2PlusServerError           HTTP 429 / 5xx, or a body that is not JSON
        │   │   └── Es2PlusFunctionUnavailable   status Expired, or Failed with a transient reason (5.1)
        │   └── Es2PlusPermanentError            (PermanentError)
        │       ├── Es2PlusFunctionFailed        status Failed: subject_code, reason_code, message
        │       ├── Es2PlusProtocolError         other HTTP status, missing header/fields, bad X-Admin-Protocol,
        │       │                                invalid URL, redirect loop
        │       └── Es2PlusTlsError              the server certificate does not verify (configuration)
        └── InventoryFileError                   (PermanentError) malformed batch file: every bad line

Transport failures of ES2+ calls (classified by :mod:`provisioning.core.http`) become these
errors through :data:`TRANSPORT_ERRORS` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from provisioning.core.errors import PermanentError, ProvisioningError, TransientError
from provisioning.core.http import Failure, TransportFailure

# Reason codes that say "not now" rather than "not this": 5.1 = Inaccessible (a backend of the SM-DP+).
TRANSIENT_REASON_CODES = frozenset({"5.1"})


class EsimError(ProvisioningError):
    """Root of every error of the eSIM domain."""


# -- ES2+ -------------------------------------------------------------------------------------


class Es2PlusError(EsimError):
    """An ES2+ call to the SM-DP+ did not succeed."""


class Es2PlusTransientError(Es2PlusError, TransientError):
    """The call may succeed later; whether it took effect is unknown for connection errors."""


class Es2PlusConnectionError(Es2PlusTransientError):
    pass


class Es2PlusTimeout(Es2PlusTransientError):
    pass


class Es2PlusServerError(Es2PlusTransientError):
    """HTTP 429/5xx, or an answer that is not JSON (a gateway's error page)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class Es2PlusPermanentError(Es2PlusError, PermanentError):
    """The same call will fail again."""


class Es2PlusProtocolError(Es2PlusPermanentError):
    """The SM-DP+ answered outside the ES2+ protocol (HTTP 4xx, missing fields, wrong headers)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class Es2PlusTlsError(Es2PlusPermanentError):
    """The SM-DP+ certificate does not verify against the configured CA bundle."""


TRANSPORT_ERRORS: Final[Mapping[Failure, type[Es2PlusError]]] = MappingProxyType(
    {
        Failure.UNREACHABLE: Es2PlusConnectionError,
        Failure.CONNECTION_LOST: Es2PlusConnectionError,
        Failure.CONNECT_TIMEOUT: Es2PlusTimeout,
        Failure.READ_TIMEOUT: Es2PlusTimeout,
        Failure.THROTTLED: Es2PlusServerError,
        Failure.SERVER_ERROR: Es2PlusServerError,
        Failure.TLS_CERTIFICATE: Es2PlusTlsError,
        Failure.TOO_MANY_REDIRECTS: Es2PlusProtocolError,
        Failure.INVALID_URL: Es2PlusProtocolError,
        Failure.UNEXPECTED: Es2PlusProtocolError,
    }
)


def from_transport(failure: TransportFailure, function: str, *, status: int | None = None) -> Es2PlusError:
    """The ES2+ error for a classified transport failure of ``function``."""
    cls = TRANSPORT_ERRORS[failure.kind]
    message = f"{function}: {failure.describe()}"
    if issubclass(cls, (Es2PlusServerError, Es2PlusProtocolError)):
        return cls(message, status_code=status)
    return cls(message)


@dataclass(frozen=True)
class FunctionStatus:
    """``header.functionExecutionStatus`` of an ES2+ answer."""

    function: str
    status: str
    subject_code: str | None = None
    reason_code: str | None = None
    subject_identifier: str | None = None
    message: str | None = None

    def describe(self) -> str:
        codes = f"{self.subject_code}/{self.reason_code}" if self.subject_code else "no status code"
        text = f"{self.function}: {self.status} {codes}"
        return f"{text} ({self.message})" if self.message else text


class _WithFunctionStatus(Es2PlusError):
    def __init__(self, status: FunctionStatus) -> None:
        super().__init__(status.describe())
        self.status = status

    @property
    def function(self) -> str:
        return self.status.function

    @property
    def subject_code(self) -> str | None:
        return self.status.subject_code

    @property
    def reason_code(self) -> str | None:
        return self.status.reason_code

    @property
    def subject_identifier(self) -> str | None:
        return self.status.subject_identifier

    @property
    def message(self) -> str | None:
        return self.status.message

    def has_code(self, subject_code: str, reason_code: str) -> bool:
        return self.subject_code == subject_code and self.reason_code == reason_code


class Es2PlusFunctionUnavailable(_WithFunctionStatus, Es2PlusTransientError):
    """Status ``Expired``, or ``Failed`` with a reason in :data:`TRANSIENT_REASON_CODES`."""


class Es2PlusFunctionFailed(_WithFunctionStatus, Es2PlusPermanentError):
    """Status ``Failed``: the SM-DP+ refused the function; the codes say why.

    The two the steps act on have properties; others, through :meth:`has_code`:
    8.2.1/3.9 unknown ICCID, 8.2.5/3.7 profile type exhausted, 8.1.1/3.10 linked
    to another EID, 8.2.6/3.3 matchingId used by another profile.
    """

    @property
    def is_iccid_in_use(self) -> bool:
        """8.2.1/3.3: downloadOrder on a profile that is no longer available (a repeat of ours, or not ours)."""
        return self.has_code("8.2.1", "3.3")

    @property
    def is_invalid_transition(self) -> bool:
        """8.2.1/3.5: the profile is not in a state this function applies to (e.g. confirmed already)."""
        return self.has_code("8.2.1", "3.5")


# -- batch files ------------------------------------------------------------------------------


# Bad lines spelled out in the message of an InventoryFileError (all of them stay in ``problems``).
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class BatchProblem:
    """One bad line of a batch file."""

    line: int
    value: str
    reason: str


class InventoryFileError(EsimError, PermanentError):
    """A batch file with malformed lines; nothing of it was loaded."""

    def __init__(self, problems: list[BatchProblem], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} malformed line(s){where}; nothing loaded:"]
        lines += [f"  line {p.line}: {p.value!r}: {p.reason}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        super().__init__("\n".join(lines))
