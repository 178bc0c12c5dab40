"""The two kinds of failure every client error is, whatever API it came from.

Each client has its own exceptions module with one root error; each of its
errors also derives from one of these, so that the retry policy on the tasks can
say which errors it retries without knowing every client::

    ProvisioningError
    ├── TransientError   worth retrying later: connection errors, timeouts, 429/5xx, SMTP 4xx
    └── PermanentError   retrying cannot help: validation, unknown ids, auth, business rules
        └── OrderRejected  the Order itself cannot be provisioned (raised by the steps)

Every exception class of the package survives ``pickle`` (Celery pickles them for
result backends, events and its prefork pool) with its message and attributes:
:class:`PicklableError` rebuilds an exception without calling its constructor, so
keyword-only or extra constructor arguments cannot break the round trip.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class PicklableError(Exception):
    """Pickles as (class, args, attributes); unpickling does not call ``__init__``.

    The default pickling of exceptions calls ``cls(*self.args)``, which fails or
    builds nonsense when the constructor takes other arguments than the message.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class ProvisioningError(PicklableError):
    """Root of every error raised by this package's clients."""


class TransientError(ProvisioningError):
    """A failure that may succeed when tried again later.

    A client sets ``throttled`` when the system said it is refusing us for our rate (HTTP 429,
    Salesforce's REQUEST_LIMIT_EXCEEDED) and ``retry_after_s`` when it said when to come back
    (HTTP ``Retry-After``): the circuit breaker of that system opens at once on either.
    """

    retry_after_s: float | None = None
    throttled: bool = False


class PermanentError(ProvisioningError):
    """A failure that the same call will meet again; never retried."""


class OrderRejected(PermanentError):
    """The Order cannot be provisioned as it is (missing data, no pay method, inactive client)."""
