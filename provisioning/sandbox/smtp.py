"""SMTP simulator: an aiosmtpd server that keeps every message it accepts.

Plain SMTP on the :class:`~provisioning.sandbox.common.ServerThread` loop; with a
``tls_context`` it also offers STARTTLS, and with ``credentials`` it requires
AUTH (PLAIN or LOGIN, after STARTTLS, as real submission servers do).
Recipients in the reserved ``.invalid`` domain (RFC 2606) are refused with
``550 5.1.1``, which is how a test gets a permanent failure.

Faults apply to the ``DATA`` operation, once the message body has arrived
(``Faults.error_status`` is HTTP-only and ignored here):

- latency: the reply to DATA is delayed;
- error: ``451 4.3.0 Temporary failure``, the message is not stored;
- reset: the connection is dropped, the message is not stored;
- ambiguous: the message is stored, then the connection is dropped without the ``250``.

Admin routes (the aiohttp app of :meth:`SmtpSimulator.build_admin_app`; never subject to faults):

- ``GET  /__admin/messages``  ``{"count", "messages": [{"id", "message_id", "mail_from",
  "rcpt_tos", "subject", "received_at", "size"}]}`` in arrival order;
  ``?message_id=<id>`` (angle brackets optional) keeps that Message-ID only.
- ``GET  /__admin/messages/{id}``  the raw message as received (``text/plain``); 404 if unknown.
- ``GET  /__admin/messages/summary``  ``{"count", "distinct_message_ids",
  "without_message_id", "duplicates": {"<message-id>": copies}, "connections"}`` (Message-IDs seen
  more than once; connections opened by clients so far).
- ``POST /__admin/messages/clear``  forgets every message: ``{"cleared": n}``.
- ``GET/POST /__admin/faults``, ``GET /__admin/calls``, ``POST /__admin/calls/reset``:
  see :mod:`provisioning.sandbox.common`; the operation is ``DATA``, e.g.
  ``{"force": {"DATA": ["ambiguous"]}}``.
"""

from __future__ import annotations

import asyncio
import email.policy
import hmac
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesParser
from functools import cached_property
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from provisioning.sandbox.common import ADMIN_PREFIX, FaultInjector, Faults, StartHook, new_app

DATA_OPERATION = "DATA"
SERVER_HOSTNAME = "smtp.sandbox.local"
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure"
MAILBOX_UNAVAILABLE = "550 5.1.1 Mailbox unavailable"
# Largest message accepted (advertised as SIZE); larger ones get 552.
DEFAULT_DATA_SIZE_LIMIT = 10 * 1024**2
# Idle connections are closed after this long, as real servers do.
IDLE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class StoredMessage:
    """One message the simulator accepted."""

    id: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: datetime
    raw: bytes

    # Parsed on first use, not in the DATA handler: parsing costs more than the rest of a delivery.
    @cached_property
    def _headers(self) -> tuple[str | None, str | None]:
        headers = BytesParser(policy=email.policy.default).parsebytes(self.raw, headersonly=True)
        message_id, subject = headers.get("Message-ID"), headers.get("Subject")
        return (
            str(message_id).strip() if message_id is not None else None,
            str(subject) if subject is not None else None,
        )

    @property
    def message_id(self) -> str | None:
        return self._headers[0]

    @property
    def subject(self) -> str | None:
        return self._headers[1]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "subject": self.subject,
            "received_at": self.received_at.isoformat(),
            "size": len(self.raw),
        }


def _normalise_message_id(value: str) -> str:
    value = value.strip()
    return value if value.startswith("<") else f"<{value}>"


class SmtpSimulator:
    """An SMTP server keeping what it accepts, with faults on DATA and a JSON admin app."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        data_size_limit: int = DEFAULT_DATA_SIZE_LIMIT,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        if credentials is not None and tls_context is None:
            raise ValueError("credentials need a tls_context: AUTH is only offered after STARTTLS")
        self.injector = FaultInjector(Faults(), seed=seed)
        self.tls_context = tls_context
        self.data_size_limit = data_size_limit
        self.idle_timeout_s = idle_timeout_s
        self.connections = 0
        self._credentials = credentials
        self.messages: list[StoredMessage] = []
        self._next_id = 1

    # -- server --------------------------------------------------------------------------------

    def _protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        # One protocol per connection a client opens.
        self.connections += 1
        return SMTP(
            self,
            hostname=SERVER_HOSTNAME,  # also spares a reverse DNS lookup per connection
            data_size_limit=self.data_size_limit,
            tls_context=self.tls_context,
            require_starttls=self._credentials is not None,
            auth_required=self._credentials is not None,
            authenticator=self._authenticate if self._credentials else None,
            timeout=self.idle_timeout_s,
            loop=loop,
        )

    def starter(self, host: str = "127.0.0.1", port: int = 0) -> StartHook:
        """The hook for ``ServerThread.add_server``: listens on ``host:port`` (0: a free port)."""

        async def start(loop: asyncio.AbstractEventLoop) -> tuple[Any, int]:
            server = await loop.create_server(lambda: self._protocol(loop), host, port)
            return server, server.sockets[0].getsockname()[1]

        return start

    def env(self, host: str, port: int) -> dict[str, str]:
        """Settings (environment variables) that point our sender at this server."""
        values = {
            "SMTP_HOST": host,
            "SMTP_PORT": str(port),
            "SMTP_STARTTLS": str(self.tls_context is not None).lower(),
        }
        if self._credentials is not None:
            values["SMTP_USERNAME"], values["SMTP_PASSWORD"] = self._credentials
        return values

    # -- aiosmtpd hooks (run on the server loop) ---------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._credentials is not None
        ok = isinstance(auth_data, LoginPassword) and all(
            hmac.compare_digest(given, expected.encode())
            for given, expected in zip((auth_data.login, auth_data.password), self._credentials, strict=True)
        )
        return AuthResult(success=ok, handled=False)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain == "invalid" or domain.endswith(".invalid"):
            return MAILBOX_UNAVAILABLE
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        kind = self.injector.next_fault(DATA_OPERATION)
        await self.injector.delay(DATA_OPERATION)
        if kind == "error":
            return TEMPORARY_FAILURE
        if kind == "reset":
            self._drop(server)
        self._store(envelope)
        if kind == "ambiguous":
            self._drop(server)
        return "250 2.0.0 OK: queued"

    @staticmethod
    def _drop(server: SMTP) -> None:
        """Abort the connection without a reply and end the session's handler."""
        transport = server.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        elif transport is not None:
            transport.close()
        # aiosmtpd treats a cancelled session as a lost connection (closes the writer, no reply).
        raise asyncio.CancelledError()

    def _store(self, envelope: Envelope) -> StoredMessage:
        stored = StoredMessage(
            id=self._next_id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            received_at=datetime.now(UTC),
            raw=bytes(envelope.original_content or b""),
        )
        self._next_id += 1
        self.messages.append(stored)
        return stored

    # -- state, for the admin routes (and ServerThread.call) ----------------------------------------

    def find(self, message_id: str) -> list[StoredMessage]:
        wanted = _normalise_message_id(message_id)
        return [
            m
            for m in self.messages
            if m.message_id is not None and _normalise_message_id(m.message_id) == wanted
        ]

    def summary(self) -> dict[str, Any]:
        copies: dict[str, int] = {}
        for m in self.messages:
            if m.message_id is not None:
                copies[m.message_id] = copies.get(m.message_id, 0) + 1
        return {
            "count": len(self.messages),
            "distinct_message_ids": len(copies),
            "without_message_id": sum(1 for m in self.messages if m.message_id is None),
            "duplicates": {mid: n for mid, n in copies.items() if n > 1},
            "connections": self.connections,
        }

    def clear(self) -> int:
        cleared = len(self.messages)
        self.messages.clear()
        return cleared

    # -- admin -------------------------------------------------------------------------------

    def build_admin_app(self) -> web.Application:
        async def list_messages(request: web.Request) -> web.Response:
            wanted = request.query.get("message_id")
            selected = self.find(wanted) if wanted else self.messages
            return web.json_response({"count": len(selected), "messages": [m.summary() for m in selected]})

        async def get_message(request: web.Request) -> web.Response:
            number = int(request.match_info["n"])
            for m in self.messages:
                if m.id == number:
                    return web.Response(body=m.raw, content_type="text/plain", charset="utf-8")
            return web.json_response({"error": f"no message {number}"}, status=404)

        async def summary(_: web.Request) -> web.Response:
            return web.json_response(self.summary())

        async def clear(_: web.Request) -> web.Response:
            return web.json_response({"cleared": self.clear()})

        routes = [
            web.get(f"{ADMIN_PREFIX}/messages", list_messages),
            web.get(f"{ADMIN_PREFIX}/messages/summary", summary),
            web.get(ADMIN_PREFIX + r"/messages/{n:\d+}", get_message),
            web.post(f"{ADMIN_PREFIX}/messages/clear", clear),
        ]
        return new_app(routes, self.injector.admin_routes())
