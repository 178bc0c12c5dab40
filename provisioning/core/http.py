"""HTTP for every client: sessions whose CA bundle really applies, and THE translation of transport failures.

Two transports, one table. The clients on the hot path that we wrote against the
wire ourselves (WHMCS, ES2+) use urllib3's pools directly (:func:`make_pool`):
requests is urllib3 plus a per-call layer of cookies, hooks, settings merges and
redirect handling that costs more CPU than the call itself (about 0.6 against
0.2 ms on a kept-alive connection), and those clients need none of it.
The Salesforce REST client (simple-salesforce), the JWT login and CometD use a
``requests.Session`` (:func:`make_session`): for Salesforce the per-call layer is
about 0.4 ms of CPU a call, under a millisecond a run (docs/benchmarks.md).

:func:`classify` turns any ``requests`` or urllib3 exception into one
:class:`Failure`, and :func:`status_failure` does the same for an HTTP status;
:data:`RULES` says, once for all clients, whether each kind is worth retrying and
whether the request can have reached the server. Each client maps a kind to its
own exception classes (``from_transport`` in its errors module) and never
inspects transport exceptions itself.

A client retries at most a connection (:func:`connection_retrying`): only a
request that was never sent, at most :data:`CONNECT_ATTEMPTS` tries, so that
nothing stacks under the retry policy of the Celery tasks.
"""

from __future__ import annotations

import email.utils
import enum
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from urllib3 import exceptions as u3
from urllib3.exceptions import MaxRetryError, NewConnectionError

from provisioning.core.backoff import tenacity_wait
from provisioning.core.errors import TransientError
from provisioning.core.logs import get_logger

log = get_logger(__name__)

# Connections kept per host, one per thread of the largest worker documented (100 threads share one
# pool per client): fewer, and the connections of the threads beyond it are closed after each call
# (urllib3's "Connection pool is full"), the next call paying a new TLS handshake.
DEFAULT_POOL_SIZE = 100
# Tries of one request whose connection could not be opened (the request was never sent).
CONNECT_ATTEMPTS = 2
# Wait before that second try (full jitter below it): a load balancer or DNS blip, not an outage.
CONNECT_RETRY_BACKOFF_S = 0.1
CONNECT_RETRY_BACKOFF_MAX_S = 0.5
# How deep to look into wrapped exceptions (requests -> urllib3 -> ssl/OSError).
MAX_CAUSE_DEPTH = 10


class Failure(enum.Enum):
    """What went wrong on the way to an answer (or in the answer's HTTP status)."""

    UNREACHABLE = "unreachable"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    CONNECTION_LOST = "connection_lost"
    TLS_CERTIFICATE = "tls_certificate"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    INVALID_URL = "invalid_url"
    THROTTLED = "throttled"
    SERVER_ERROR = "server_error"
    UNEXPECTED = "unexpected"


@dataclass(frozen=True)
class Rule:
    """How every client treats one kind of failure."""

    transient: bool  # worth trying again later (the task's retry policy decides when)
    never_sent: bool  # the server cannot have seen the request, so even a write may be resent now
    phrase: str  # what the error message says


RULES: Final[Mapping[Failure, Rule]] = MappingProxyType(
    {
        # Refused, reset while connecting, unknown host, no route: no connection, nothing sent.
        Failure.UNREACHABLE: Rule(True, True, "connection failed (server not reached)"),
        Failure.CONNECT_TIMEOUT: Rule(True, True, "timed out connecting"),
        # Sent, no answer in time: the server may have applied it (ambiguous).
        Failure.READ_TIMEOUT: Rule(True, False, "timed out waiting for the answer"),
        # Reset or closed after the connection was up, a TLS record cut short, a truncated body:
        # ambiguous like a read timeout.
        Failure.CONNECTION_LOST: Rule(
            True, False, "connection failed (lost after sending: the request may have been applied)"
        ),
        # A CA that does not know the server's certificate stays so: configuration, never luck.
        Failure.TLS_CERTIFICATE: Rule(
            False, True, "TLS certificate verification failed (check TLS_CA_BUNDLE and the URL's host)"
        ),
        Failure.TOO_MANY_REDIRECTS: Rule(False, False, "too many redirects (check the URL)"),
        Failure.INVALID_URL: Rule(False, True, "invalid URL (check the setting)"),
        Failure.THROTTLED: Rule(True, False, "rate limited"),
        Failure.SERVER_ERROR: Rule(True, False, "server error"),
        # Anything else requests raises (an undecodable body, a body we could not encode): a bug
        # on one side or the other, which the same call meets again.
        Failure.UNEXPECTED: Rule(False, False, "request failed"),
    }
)


@dataclass(frozen=True)
class TransportFailure:
    """One classified failure: its kind and a short detail (the innermost cause's type)."""

    kind: Failure
    detail: str = ""

    @property
    def rule(self) -> Rule:
        return RULES[self.kind]

    @property
    def transient(self) -> bool:
        return self.rule.transient

    @property
    def never_sent(self) -> bool:
        return self.rule.never_sent

    @property
    def safe_to_resend(self) -> bool:
        """Resending now cannot apply anything twice and may well work."""
        return self.rule.transient and self.rule.never_sent

    def describe(self) -> str:
        return f"{self.rule.phrase} ({self.detail})" if self.detail else self.rule.phrase


_INVALID_URL = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.URLRequired,
)


# What a transport raises: requests' exceptions, and urllib3's (which requests wraps).
TRANSPORT_EXCEPTIONS: Final = (requests.RequestException, u3.HTTPError)


def classify(exc: requests.RequestException | u3.HTTPError) -> TransportFailure:
    """THE place where a transport exception becomes a :class:`Failure` (first match wins)."""
    if isinstance(exc, u3.HTTPError):
        return _classify_urllib3(exc)
    root = _root(exc)
    detail = type(root).__name__
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return TransportFailure(Failure.TOO_MANY_REDIRECTS)
    if isinstance(exc, _INVALID_URL):
        return TransportFailure(Failure.INVALID_URL, type(exc).__name__)
    certificate = _certificate_error(exc)
    if certificate is not None:
        return TransportFailure(Failure.TLS_CERTIFICATE, certificate)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return TransportFailure(Failure.CONNECT_TIMEOUT, detail)
    if isinstance(exc, requests.exceptions.Timeout):
        return TransportFailure(Failure.READ_TIMEOUT, detail)
    if isinstance(exc, requests.exceptions.ConnectionError) and _never_connected(exc):
        return TransportFailure(Failure.UNREACHABLE, detail)
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return TransportFailure(Failure.CONNECTION_LOST, detail)
    return TransportFailure(Failure.UNEXPECTED, type(exc).__name__)


def _classify_urllib3(exc: u3.HTTPError) -> TransportFailure:
    """urllib3's own exceptions (``retries=False``: raised as they happen, not wrapped in MaxRetryError)."""
    if isinstance(exc, MaxRetryError) and isinstance(exc.reason, u3.HTTPError):
        return _classify_urllib3(exc.reason)
    detail = type(_root(exc)).__name__
    if isinstance(exc, u3.LocationValueError):
        return TransportFailure(Failure.INVALID_URL, type(exc).__name__)
    certificate = _certificate_error(exc)
    if certificate is not None:
        return TransportFailure(Failure.TLS_CERTIFICATE, certificate)
    # NewConnectionError is a ConnectTimeoutError in urllib3's tree: the refusal is decided first.
    if isinstance(exc, NewConnectionError):
        return TransportFailure(Failure.UNREACHABLE, detail)
    if isinstance(exc, u3.ConnectTimeoutError):
        return TransportFailure(Failure.CONNECT_TIMEOUT, detail)
    if isinstance(exc, u3.ReadTimeoutError):
        return TransportFailure(Failure.READ_TIMEOUT, detail)
    if isinstance(exc, (u3.ProtocolError, u3.SSLError, u3.DecodeError)):
        return TransportFailure(Failure.CONNECTION_LOST, detail)
    return TransportFailure(Failure.UNEXPECTED, type(exc).__name__)


THROTTLED_STATUS = 429
E = TypeVar("E", bound=TransientError)


def status_failure(status: int) -> Failure | None:
    """The kind of an HTTP status that means "not now": 429 and 5xx; None for any other."""
    if status == THROTTLED_STATUS:
        return Failure.THROTTLED
    if status >= 500:
        return Failure.SERVER_ERROR
    return None


def mark_busy(exc: E, status: int, headers: Mapping[str, str]) -> E:
    """``exc`` (a busy answer's error) with what the answer said: 429 is a throttle, and when
    ``Retry-After`` says when to come back (seconds, or an HTTP date)."""
    exc.throttled = status == THROTTLED_STATUS
    exc.retry_after_s = retry_after_s(headers.get("Retry-After"))
    return exc


def retry_after_s(value: str | None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` value (delay-seconds or an HTTP-date); None when absent
    or not understood."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def connection_retrying(
    *, also_resend: Callable[[TransportFailure], bool] | None = None, attempts: int = CONNECT_ATTEMPTS
) -> Retrying:
    """A tenacity ``Retrying`` that resends a request only when it was never sent.

    ``also_resend`` widens that for calls that are safe to repeat (a read).
    Anything else, and the last try's failure, is raised as it came.
    """

    def resend(exc: BaseException) -> bool:
        if not isinstance(exc, TRANSPORT_EXCEPTIONS):
            return False
        failure = classify(exc)
        return failure.safe_to_resend or (
            failure.transient and also_resend is not None and also_resend(failure)
        )

    return Retrying(
        stop=stop_after_attempt(attempts),
        retry=retry_if_exception(resend),
        wait=tenacity_wait(base_s=CONNECT_RETRY_BACKOFF_S, cap_s=CONNECT_RETRY_BACKOFF_MAX_S),
        before_sleep=_log_resend,
        reraise=True,
    )


def _log_resend(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    failure = classify(exc) if isinstance(exc, TRANSPORT_EXCEPTIONS) else None
    log.info("http_resend", attempt=state.attempt_number, failure=failure and failure.kind.value)


def make_session(ca_bundle: Path | None = None, *, pool_size: int = DEFAULT_POOL_SIZE) -> requests.Session:
    """A ``requests.Session`` for one client.

    With ``ca_bundle`` set, ``trust_env`` is turned off: requests otherwise lets
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment override
    ``Session.verify``, and the configured bundle would silently not be used.
    (Proxy variables are then ignored too, which the loopback sandbox wants.)
    urllib3 retries nothing (``max_retries=0``): :func:`connection_retrying` decides.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    if ca_bundle is not None:
        session.trust_env = False
        session.verify = str(ca_bundle)
    return session


def make_pool(
    ca_bundle: Path | None = None, *, url: str | None = None, pool_size: int = DEFAULT_POOL_SIZE
) -> urllib3.PoolManager:
    """urllib3's pools for one client: kept-alive connections, no retries, no redirects followed.

    The CA bundle is ``ca_bundle`` (``TLS_CA_BUNDLE``), else the one requests would take:
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``, else certifi's. The proxy comes from the
    standard variables (``HTTPS_PROXY``, ``NO_PROXY``) for ``url``'s host. Both are read
    once, here, where requests reads them on every call.
    """
    ca_certs = str(ca_bundle) if ca_bundle is not None else _environment_ca_bundle()
    proxy = _proxy_for(url) if url else None
    if proxy:
        return urllib3.ProxyManager(proxy, maxsize=pool_size, block=False, retries=False, ca_certs=ca_certs)
    return urllib3.PoolManager(maxsize=pool_size, block=False, retries=False, ca_certs=ca_certs)


def _environment_ca_bundle() -> str:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or DEFAULT_CA_BUNDLE_PATH


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


# -- looking inside wrapped exceptions ----------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it wraps, outermost first (requests wraps urllib3, which wraps OSError)."""
    node: BaseException | None = exc
    seen: set[int] = set()
    for _ in range(MAX_CAUSE_DEPTH):
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        yield node
        inner = next((a for a in node.args if isinstance(a, BaseException)), None)
        if inner is None and isinstance(node, MaxRetryError) and isinstance(node.reason, BaseException):
            inner = node.reason
        node = inner or node.__cause__ or node.__context__


def _root(exc: BaseException) -> BaseException:
    *_, innermost = _causes(exc)
    return innermost


def _certificate_error(exc: BaseException) -> str | None:
    """The verification message when a certificate did not verify, else None."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message or "certificate verify failed")
    if any("CERTIFICATE_VERIFY_FAILED" in str(cause) for cause in causes):
        return "certificate verify failed"
    return None


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """No connection was opened (refused, unknown host, no route), so nothing was sent."""
    return any(isinstance(cause, NewConnectionError) for cause in _causes(exc))
