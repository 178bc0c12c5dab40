"""The one translation of transport failures, on real sockets; and a certificate failure is permanent everywhere.

Every failure here is produced for real (refused ports, full accept queues, TLS
servers with certificates from a CA the client does not trust, servers that drop
the connection), not raised by a fake.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import trustme
import urllib3
from pydantic import SecretStr

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.http import (
    CONNECT_ATTEMPTS,
    RULES,
    Failure,
    classify,
    connection_retrying,
    make_pool,
    make_session,
    status_failure,
)
from provisioning.core.settings import Settings
from provisioning.email.errors import EmailPermanentError
from provisioning.email.sender import SmtpSender
from provisioning.esim import errors as esim_errors
from provisioning.esim.client import Es2PlusClient
from provisioning.esim.errors import Es2PlusTlsError
from provisioning.salesforce import errors as salesforce_errors
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import SalesforceClient
from provisioning.salesforce.errors import SalesforceEndpointError
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.smtp import SmtpSimulator
from provisioning.whmcs import errors as whmcs_errors
from provisioning.whmcs.client import WhmcsClient
from provisioning.whmcs.errors import WhmcsPermanentError

SHORT_TIMEOUT_S = 0.3


# -- real servers that fail in one way each ------------------------------------------------------


class RawServer:
    """Accepts TCP connections on a thread, counts them and hands each to ``handle``."""

    def __init__(self, handle: Callable[[socket.socket], None], *, backlog: int = 16) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> RawServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._open.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handle: Callable[[socket.socket], None], **kwargs: Any) -> RawServer:
        server = RawServer(handle, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA(organization_name="the server's CA")


@pytest.fixture(scope="module")
def other_ca_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA bundle that does not hold the servers' CA: what a wrong TLS_CA_BUNDLE looks like."""
    path = tmp_path_factory.mktemp("other-ca") / "other-ca.pem"
    trustme.CA(organization_name="someone else's CA").cert_pem.write_to_path(str(path))
    return path


def tls_handshake(server_ca: trustme.CA, *hosts: str) -> Callable[[socket.socket], None]:
    """A connection handler that completes (or fails) a real TLS handshake, then closes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert(*(hosts or ("127.0.0.1",))).configure_cert(context)

    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True):
            pass

    return handle


def read_request_then(action: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        action(conn)

    return handle


def fail_with(call: Callable[[], object]) -> requests.RequestException:
    try:
        call()
    except requests.RequestException as exc:
        return exc
    raise AssertionError("the call succeeded")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- classify: one rule per kind ------------------------------------------------------------------


def test_a_refused_connection_is_unreachable_and_safe_to_resend() -> None:
    exc = fail_with(lambda: requests.get(f"http://127.0.0.1:{closed_port()}/", timeout=SHORT_TIMEOUT_S))
    failure = classify(exc)
    assert failure.kind is Failure.UNREACHABLE
    assert (failure.transient, failure.never_sent, failure.safe_to_resend) == (True, True, True)
    assert "ConnectionRefusedError" in failure.describe()


def test_an_unknown_host_is_unreachable() -> None:
    exc = fail_with(lambda: requests.get("http://no-such-host.invalid/", timeout=SHORT_TIMEOUT_S))
    assert classify(exc).kind is Failure.UNREACHABLE


def test_a_full_accept_queue_is_a_connect_timeout_and_safe_to_resend(
    raw_server: Callable[..., RawServer],
) -> None:
    server = RawServer(lambda conn: None, backlog=0)  # never accepts: the queue fills up
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", server.port))
        fillers.append(filler)
    try:
        exc = fail_with(
            lambda: requests.get(f"http://127.0.0.1:{server.port}/", timeout=(SHORT_TIMEOUT_S, 5))
        )
    finally:
        for filler in fillers:
            filler.close()
        server.close()
    failure = classify(exc)
    assert failure.kind is Failure.CONNECT_TIMEOUT
    assert failure.safe_to_resend


def test_no_answer_in_time_is_a_read_timeout_and_ambiguous(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(read_request_then(lambda conn: time.sleep(2)))
    exc = fail_with(lambda: requests.post(f"http://127.0.0.1:{server.port}/", timeout=(5, SHORT_TIMEOUT_S)))
    failure = classify(exc)
    assert failure.kind is Failure.READ_TIMEOUT
    assert (failure.transient, failure.never_sent) == (True, False)


def test_a_connection_closed_after_the_request_is_lost_and_ambiguous(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(read_request_then(lambda conn: conn.close()))
    exc = fail_with(lambda: requests.post(f"http://127.0.0.1:{server.port}/", timeout=5))
    failure = classify(exc)
    assert failure.kind is Failure.CONNECTION_LOST
    assert (failure.transient, failure.never_sent) == (True, False)


def test_a_body_cut_short_is_a_lost_connection(raw_server: Callable[..., RawServer]) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"

    def cut(conn: socket.socket) -> None:
        conn.sendall(head)
        conn.close()

    server = raw_server(read_request_then(cut))
    exc = fail_with(lambda: requests.get(f"http://127.0.0.1:{server.port}/", timeout=5))
    assert isinstance(exc, requests.exceptions.ChunkedEncodingError)
    assert classify(exc).kind is Failure.CONNECTION_LOST


def test_a_tls_handshake_cut_short_is_a_lost_connection(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(lambda conn: conn.close())
    exc = fail_with(lambda: requests.get(f"https://127.0.0.1:{server.port}/", timeout=5))
    assert classify(exc).kind is Failure.CONNECTION_LOST


def urllib3_fail(method: str, url: str, *, timeout: float = 5, ca_bundle: Path | None = None) -> Exception:
    """The exception of one call through :func:`make_pool`'s pools (no retries: raised as it happens)."""
    pool = make_pool(ca_bundle)
    try:
        pool.request(method, url, timeout=timeout)
    except urllib3.exceptions.HTTPError as exc:
        return exc
    finally:
        pool.clear()
    raise AssertionError("the call succeeded")


def test_urllib3s_exceptions_get_the_same_kinds_as_requests(
    raw_server: Callable[..., RawServer], server_ca: trustme.CA, other_ca_bundle: Path
) -> None:
    def cut_body(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        conn.close()

    slow = raw_server(read_request_then(lambda conn: time.sleep(2)))
    closed = raw_server(read_request_then(lambda conn: conn.close()))
    cut = raw_server(read_request_then(cut_body))
    no_tls = raw_server(lambda conn: conn.close())
    tls = raw_server(tls_handshake(server_ca))
    cases = {
        Failure.UNREACHABLE: urllib3_fail("GET", f"http://127.0.0.1:{closed_port()}/"),
        Failure.READ_TIMEOUT: urllib3_fail("POST", f"http://127.0.0.1:{slow.port}/", timeout=SHORT_TIMEOUT_S),
        Failure.CONNECTION_LOST: urllib3_fail("POST", f"http://127.0.0.1:{closed.port}/"),
        Failure.TLS_CERTIFICATE: urllib3_fail(
            "GET", f"https://127.0.0.1:{tls.port}/", ca_bundle=other_ca_bundle
        ),
        Failure.INVALID_URL: urllib3_fail("GET", "http://[not a host/"),
    }
    for kind, exc in cases.items():
        assert classify(exc).kind is kind, (kind, repr(exc))
    for url in (f"http://127.0.0.1:{cut.port}/", f"https://127.0.0.1:{no_tls.port}/"):
        assert classify(urllib3_fail("GET", url)).kind is Failure.CONNECTION_LOST, url
    assert classify(cases[Failure.UNREACHABLE]).safe_to_resend
    assert "TLS_CA_BUNDLE" in classify(cases[Failure.TLS_CERTIFICATE]).describe()


def test_an_untrusted_certificate_is_permanent_and_says_why(
    raw_server: Callable[..., RawServer], server_ca: trustme.CA, other_ca_bundle: Path
) -> None:
    server = raw_server(tls_handshake(server_ca))
    session = make_session(other_ca_bundle)
    exc = fail_with(lambda: session.get(f"https://127.0.0.1:{server.port}/", timeout=5))
    failure = classify(exc)
    assert failure.kind is Failure.TLS_CERTIFICATE
    assert not failure.transient
    assert not failure.safe_to_resend
    assert "unable to get local issuer certificate" in failure.describe()
    assert "TLS_CA_BUNDLE" in failure.describe()


def test_a_certificate_for_another_host_is_permanent(
    raw_server: Callable[..., RawServer], server_ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    server_ca.cert_pem.write_to_path(str(bundle))
    server = raw_server(tls_handshake(server_ca, "elsewhere.test"))
    exc = fail_with(lambda: make_session(bundle).get(f"https://127.0.0.1:{server.port}/", timeout=5))
    failure = classify(exc)
    assert failure.kind is Failure.TLS_CERTIFICATE
    assert "mismatch" in failure.describe()


def test_a_redirect_loop_is_permanent() -> None:
    class Loop(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "/again")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        exc = fail_with(lambda: requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=5))
    finally:
        server.shutdown()
        server.server_close()
    failure = classify(exc)
    assert failure.kind is Failure.TOO_MANY_REDIRECTS
    assert not failure.transient


@pytest.mark.parametrize("url", ["https://", "ftp://example.com/x", "example.com/x"])
def test_an_invalid_url_is_permanent(url: str) -> None:
    failure = classify(fail_with(lambda: requests.get(url, timeout=SHORT_TIMEOUT_S)))
    assert failure.kind is Failure.INVALID_URL
    assert not failure.transient


def test_a_body_that_cannot_be_decoded_is_unexpected_and_permanent(
    raw_server: Callable[..., RawServer],
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnope!"
    server = raw_server(read_request_then(lambda conn: conn.sendall(answer)))
    exc = fail_with(lambda: requests.get(f"http://127.0.0.1:{server.port}/", timeout=5))
    failure = classify(exc)
    assert failure.kind is Failure.UNEXPECTED
    assert not failure.transient


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, Failure.THROTTLED),
        (500, Failure.SERVER_ERROR),
        (503, Failure.SERVER_ERROR),
        (404, None),
        (302, None),
    ],
)
def test_only_429_and_5xx_are_statuses_that_mean_not_now(status: int, kind: Failure | None) -> None:
    assert status_failure(status) is kind
    if kind is not None:
        assert RULES[kind].transient


# -- connection_retrying: a client retries at most a connection ------------------------------------


def test_a_request_never_sent_is_tried_once_more_and_no_more() -> None:
    retrying = connection_retrying()
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(requests.ConnectionError):
        retrying(requests.post, url, timeout=SHORT_TIMEOUT_S)
    assert retrying.statistics["attempt_number"] == CONNECT_ATTEMPTS


def test_a_request_that_was_sent_is_not_resent_unless_the_caller_says_it_may_be(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(read_request_then(lambda conn: conn.close()))
    url = f"http://127.0.0.1:{server.port}/"
    with pytest.raises(requests.ConnectionError):
        connection_retrying()(requests.post, url, timeout=5)
    assert server.accepted == 1
    read = connection_retrying(also_resend=lambda failure: failure.kind is Failure.CONNECTION_LOST)
    with pytest.raises(requests.ConnectionError):
        read(requests.post, url, timeout=5)
    assert server.accepted == 1 + CONNECT_ATTEMPTS


# -- every client maps every kind, and agrees with the rules ---------------------------------------


@pytest.mark.parametrize("module", [salesforce_errors, whmcs_errors, esim_errors], ids=lambda m: m.__name__)
def test_every_client_maps_every_kind_to_an_error_of_the_same_transience(module: ModuleType) -> None:
    table = module.TRANSPORT_ERRORS
    assert set(table) == set(Failure)
    for kind, cls in table.items():
        expected, other = (
            (TransientError, PermanentError) if RULES[kind].transient else (PermanentError, TransientError)
        )
        assert issubclass(cls, expected), (kind, cls)
        assert not issubclass(cls, other), (kind, cls)


# -- a certificate that does not verify: permanent for every client, tried once -------------------


def _whmcs(url: str, bundle: Path) -> Callable[[], object]:
    client = WhmcsClient(session=make_pool(bundle), url=url, identifier=SecretStr("i"), secret=SecretStr("s"))
    return lambda: client.get_orders()


def _es2plus(url: str, bundle: Path) -> Callable[[], object]:
    client = Es2PlusClient(session=make_pool(bundle), url=url, requester_id="tests")
    return lambda: client.download_order(iccid="8988299000000000006")


def _salesforce_login(url: str, bundle: Path, key_file: Path) -> Callable[[], object]:
    auth = JWTBearerAuth(
        login_url=url,
        client_id="cid",
        username="u@example.com",
        private_key_file=key_file,
        session=make_session(bundle),
    )
    return auth.token


@pytest.mark.parametrize(
    ("client", "error"),
    [
        ("whmcs", WhmcsPermanentError),
        ("es2plus", Es2PlusTlsError),
        ("salesforce_login", SalesforceEndpointError),
    ],
)
def test_an_untrusted_certificate_is_a_permanent_error_of_every_http_client_tried_once(
    client: str,
    error: type[Exception],
    raw_server: Callable[..., RawServer],
    server_ca: trustme.CA,
    other_ca_bundle: Path,
    sandbox_key_file: Path,
) -> None:
    server = raw_server(tls_handshake(server_ca))
    url = f"https://127.0.0.1:{server.port}"
    call = {
        "whmcs": lambda: _whmcs(url, other_ca_bundle),
        "es2plus": lambda: _es2plus(url, other_ca_bundle),
        "salesforce_login": lambda: _salesforce_login(url, other_ca_bundle, sandbox_key_file),
    }[client]()
    with pytest.raises(error, match="certificate") as caught:
        call()
    assert isinstance(caught.value, PermanentError)
    assert not isinstance(caught.value, TransientError)
    assert server.accepted == 1


@pytest.fixture(scope="module")
def sandbox_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("key") / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def test_salesforce_rest_with_an_untrusted_certificate_is_permanent_and_reaches_nothing(
    sandbox: Sandbox, other_ca_bundle: Path
) -> None:
    values: dict[str, Any] = {k.lower(): v for k, v in sandbox.env().items()}
    settings = Settings(_env_file=None, **values)
    auth = JWTBearerAuth.from_settings(settings, make_session(settings.tls_ca_bundle))
    client = SalesforceClient(auth=auth, session=make_session(other_ca_bundle))
    with pytest.raises(SalesforceEndpointError, match="certificate") as caught:
        client.fetch_order("a0RE000000IJmcNMAT")
    assert isinstance(caught.value, PermanentError)
    assert auth.logins == 1
    calls = sandbox.admin("salesforce").get("/__admin/calls")["calls"]
    assert calls.get("token") == 1
    assert calls.get("query", 0) == 0


def test_smtp_starttls_with_an_untrusted_certificate_is_permanent(
    tmp_path: Path, other_ca_bundle: Path
) -> None:
    tls = SandboxTLS.create(tmp_path / "smtp-tls")
    sim = SmtpSimulator(seed=1, tls_context=tls.server_context)
    thread = ServerThread(ssl_context=tls.server_context)
    thread.add_server("smtp", sim.starter())
    thread.start()
    try:
        sender = SmtpSender(
            host=thread.host, port=thread.ports["smtp"], starttls=True, ca_bundle=other_ca_bundle
        )
        message = _message()
        with pytest.raises(EmailPermanentError, match="certificate") as caught:
            sender.send(message)
        assert not isinstance(caught.value, TransientError)
    finally:
        thread.stop()


def _message() -> Any:
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"] = "provisioning@example.com"
    message["To"] = "someone@example.com"
    message["Subject"] = "test"
    message["Message-ID"] = "<test@provisioning.local>"
    message.set_content("hello")
    return message
