"""``provisioning esim-notify``: the operator's ES2+ endpoint the SM-DP+ calls (handleDownloadProgressInfo).

A small HTTPS server process of its own (Procfile ``esim-notify``): the stdlib
``ThreadingHTTPServer``, HTTP/1.1 keep-alive, ``TCP_NODELAY`` on every connection
(headers and body leave in two writes: without it Nagle and delayed ACKs cost 40 ms a
request), the TLS handshake in the connection's own thread. The runtime has no async
web server and needs none: a notification is one Redis script.

Authentication, as the SM-DP+ would be authenticated: mutual TLS when
ESIM_NOTIFY_CLIENT_CA is set (a client certificate that does not verify never gets an
HTTP answer), and ``header.functionRequesterIdentifier`` checked against
ESIM_NOTIFY_REQUESTER_IDS when that is set (one of the two is required).

Each notification is **recorded first, then answered** 204: the SM-DP+ delivers at least
once and retries what was not answered, so an answer sent before the write would lose the
notification if the process died or Redis refused in between. The write is one Redis
script (well under a millisecond on a warm connection), so the 204 is still immediate;
Redis out of reach answers 503 and the SM-DP+ sends it again (the dedupe absorbs any
repeat). The record is as durable as the ledger (AOF, replicas: docs/deployment.md).

- a new notification: recorded once (dedupe on ICCID + point + timestamp), the eSIM's state
  moved (``ledger.esim_status``), 204;
- a duplicate, or an ICCID no Order of ours released: 204 (the spec's answer), the unknown
  ICCID logged once and counted;
- a malformed body: HTTP 200 with a ``Failed`` envelope (1.1/2.2 or 1.1/2.1), logged once per
  kind, counted; a refused requester: HTTP 403 with a ``Failed`` envelope (1.2), counted.

A writer thread sends each change to the Order (``ESIM_Status__c`` and its time: one PATCH
of absolute values, under the Order's lease, through the Salesforce client's ``update_order``),
from the ledger's queue of changes: a change made while Salesforce is down is written when
it is back, and any replica of this process may write it (only a newer change keeps it
queued). ``GET /healthz`` answers 200 while Redis does.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from contextlib import suppress
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.esim import notifications
from provisioning.ledger.esim_status import NotificationOutcome
from provisioning.ledger.metrics import ESIM_NOTIFICATIONS
from provisioning.runs.services import Services
from provisioning.salesforce.steps import salesforce_time

log = get_logger(__name__)

ADMIN_PROTOCOL = "gsma/rsp/v2.5.0"
ADMIN_PROTOCOL_PREFIX = "gsma/rsp/v2."
# The largest body read: a notification is well under 1 kB (resultData, base64 ASN.1, a few kB at most).
MAX_BODY_BYTES = 64 * 1024
# An idle keep-alive connection is closed after this long.
IDLE_TIMEOUT_S = 60.0
# How often the writer looks for changes to write, and how long it waits after Salesforce failed.
WRITER_INTERVAL_S = 0.5
WRITER_BACKOFF_S = 5.0
WRITER_BATCH = 100
# How many distinct unknown ICCIDs / malformed kinds are remembered to log each once.
LOG_ONCE_MAX = 10_000


class NotifyConfigError(ValueError):
    """The endpoint cannot start with these settings (the message says which)."""


class _Once:
    """Says True once per key (bounded: past the bound it starts again)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= LOG_ONCE_MAX:
                self._seen.clear()
            self._seen.add(key)
            return True


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context: our certificate, and the SM-DP+'s client certificate when a client CA is set."""
    if settings.esim_notify_cert_file is None or settings.esim_notify_key_file is None:
        raise NotifyConfigError(
            "ESIM_NOTIFY_CERT_FILE and ESIM_NOTIFY_KEY_FILE are required: the SM-DP+ calls HTTPS"
        )
    if settings.esim_notify_client_ca is None and not requester_ids(settings):
        raise NotifyConfigError(
            "set ESIM_NOTIFY_CLIENT_CA (mutual TLS) or ESIM_NOTIFY_REQUESTER_IDS (the SM-DP+'s "
            "functionRequesterIdentifier), or both: an endpoint anyone may call would accept forged states"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.esim_notify_cert_file), str(settings.esim_notify_key_file))
    if settings.esim_notify_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(settings.esim_notify_client_ca))
    return context


def requester_ids(settings: Settings) -> frozenset[str]:
    return frozenset(part.strip() for part in settings.esim_notify_requester_ids.split(",") if part.strip())


class NotifyServer:
    """The endpoint and its writer thread, on one process's services."""

    def __init__(self, settings: Settings, services: Services, *, port: int | None = None) -> None:
        self.settings = settings
        self.services = services
        self.accepted = requester_ids(settings)
        self.context = server_context(settings)
        self.unknown_once = _Once()
        self.malformed_once = _Once()
        self.stopping = threading.Event()
        handler = _handler_class(self)
        self.httpd = _TlsServer(
            (settings.esim_notify_host, settings.esim_notify_port if port is None else port),
            handler,
            self.context,
        )
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> NotifyServer:
        """Serve and write in background threads (the tests'); ``serve_forever`` for a process."""
        for target, name in ((self.httpd.serve_forever, "esim-notify"), (self.write_loop, "esim-writer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "esim_notify_listening", port=self.port, mutual_tls=self.context.verify_mode == ssl.CERT_REQUIRED
        )
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- one notification ---------------------------------------------------------------------------
    def handle(self, body: bytes, peer: str) -> tuple[int, dict[str, Any] | None]:
        """(HTTP status, JSON body or None for an empty one) for one request's body."""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        parsed = notifications.parse(data)
        statuses = self.services.ledger.esim_status
        if isinstance(parsed, notifications.Malformed):
            self._count("malformed")
            if self.malformed_once(parsed.message):
                log.warning("esim_notification_malformed", peer=peer, reason=parsed.message)
            return HTTPStatus.OK, parsed.envelope()
        if self.accepted and parsed.requester not in self.accepted:
            self._count("refused")
            if self.malformed_once("requester:" + parsed.requester):
                log.error("esim_notification_refused", peer=peer, requester=parsed.requester)
            refused = notifications.Malformed("8.1", "1.2", "Function requester not authorized")
            return HTTPStatus.FORBIDDEN, refused.envelope()
        noted = statuses.note(
            parsed.iccid, parsed.point, parsed.timestamp_ms, parsed.status, parsed.wanted, parsed.reason
        )
        if noted.outcome is NotificationOutcome.UNKNOWN:
            if self.unknown_once(parsed.iccid):
                log.warning("esim_notification_unknown_iccid", iccid=parsed.iccid, point=parsed.point)
        elif noted.outcome is NotificationOutcome.CHANGED:
            assert noted.state is not None
            log.info(
                "esim_state_changed",
                iccid=parsed.iccid,
                order_id=noted.order_id,
                state=noted.state.value,
                point=parsed.point,
                reason=parsed.reason or None,
            )
        return HTTPStatus.NO_CONTENT, None

    def _count(self, outcome: str) -> None:
        with suppress(redis.RedisError):  # a count lost with Redis: the answer matters more
            self.services.ledger.metrics.count(self.services.redis, ESIM_NOTIFICATIONS, outcome=outcome)

    # -- the Orders' write-backs ------------------------------------------------------------------------
    def write_loop(self) -> None:
        while not self.stopping.wait(WRITER_INTERVAL_S):
            try:
                failed = self.write_pending()
            except redis.RedisError as exc:
                log.warning("esim_writer_redis_unavailable", error=str(exc))
                failed = True
            if failed:
                self.stopping.wait(WRITER_BACKOFF_S)

    def write_pending(self) -> bool:
        """Write every queued change to its Order (one PATCH each); True when Salesforce failed."""
        ledger = self.services.ledger
        statuses = ledger.esim_status
        for iccid, score in statuses.writebacks(WRITER_BATCH):
            status = statuses.get(iccid)
            if status is None or not status.order_id:
                statuses.written(iccid, score)
                continue
            with ledger.leases.holding(status.order_id) as lease:
                if lease is None:
                    continue  # a step acts on the Order: the next pass writes it
                salesforce = self.services.salesforce
                fields = salesforce.field_names.patch(
                    esim_status=status.state.label, esim_status_at=salesforce_time(status.changed_at)
                )
                try:
                    salesforce.update_order(status.order_id, fields)
                except TransientError as exc:
                    log.warning("esim_status_writeback_retry", order_id=status.order_id, error=str(exc))
                    return True
                except PermanentError as exc:
                    log.error("esim_status_writeback_refused", order_id=status.order_id, error=str(exc))
                statuses.written(iccid, score)
                log.debug("esim_status_written", order_id=status.order_id, state=status.state.value)
        return False


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext
    ):
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread: one slow handshake never holds the others up.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(IDLE_TIMEOUT_S)
        try:
            wrapped = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("esim_notify_tls_refused", peer=str(client_address[0]), error=str(exc))
            request.close()
            return
        super().finish_request(wrapped, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("esim_notify_connection_error", peer=str(client_address[0]))


def _handler_class(server: NotifyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "sf-provisioning-esim-notify"

        def log_message(self, format: str, *args: Any) -> None:
            return  # one line per notification would be noise: the outcomes are logged and counted

        def do_GET(self) -> None:
            if self.path != "/healthz":
                self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            try:
                server.services.redis.ping()
            except redis.RedisError as exc:
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(exc)})
                return
            self._answer(HTTPStatus.OK, {"ok": True})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, None)
                return
            body = self.rfile.read(length)
            if self.path != notifications.PATH:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"POST {notifications.PATH} only"})
                return
            if not self.headers.get("X-Admin-Protocol", "").startswith(ADMIN_PROTOCOL_PREFIX):
                missing = notifications.Malformed(
                    "1.1", "2.2", "X-Admin-Protocol header gsma/rsp/v2.x.y is required"
                )
                self._answer(HTTPStatus.BAD_REQUEST, missing.envelope())
                return
            try:
                status, answer = server.handle(body, self.client_address[0])
            except redis.RedisError as exc:
                # Not recorded: the SM-DP+ delivers again (at least once), and the dedupe absorbs repeats.
                log.warning("esim_notification_not_recorded", error=str(exc))
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, None)
                return
            self._answer(status, answer)

        def _answer(self, status: int, body: dict[str, Any] | None) -> None:
            payload = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("X-Admin-Protocol", ADMIN_PROTOCOL)
            if payload:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload:
                self.wfile.write(payload)

    return Handler


def serve(settings: Settings) -> None:
    """Run the endpoint and its writer until SIGTERM or SIGINT."""
    import signal

    services = Services(settings)
    server = NotifyServer(settings, services).start()
    stop = threading.Event()

    def _stop(signum: int, _: Any) -> None:
        log.info("esim_notify_stopping", signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    server.stop()
    services.redis.close()
