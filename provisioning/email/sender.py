"""Sends a built message over SMTP (smtplib), on connections kept for the next message.

SMTP has no idempotency: a connection lost after the message body went out may
still have delivered it, which :class:`EmailDeliveryUnknownError` says. Nothing
here retries (the task does, with the same Message-ID) but a kept connection
that the server dropped while it was idle: the message goes once more, on a new
connection, since nothing of it was sent. Every smtplib and socket error becomes
one of :mod:`provisioning.email.errors` in :func:`_translate`.
"""

from __future__ import annotations

import contextlib
import queue
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from provisioning.core import calls, tracing
from provisioning.core.logs import get_logger
from provisioning.core.settings import Settings
from provisioning.email.errors import (
    EmailDeliveryUnknownError,
    EmailError,
    EmailPermanentError,
    EmailTransientError,
)
from provisioning.step.spec import System

log = get_logger(__name__)

# One limit for connecting and for every reply, DATA's included (smtplib has a single timeout).
SMTP_TIMEOUT_S = 30.0
# Connections kept open between messages, per sender (a worker process shares one across its
# threads): a new connection costs a TCP connect, the greeting, EHLO and, with STARTTLS, a TLS
# handshake. More messages at once than this open more connections, closed after their message.
SMTP_IDLE_CONNECTIONS = 4
# A kept connection idle for longer is closed rather than used: servers drop idle clients (Postfix
# after 300 s), and a connection found dropped costs a reconnect anyway.
SMTP_IDLE_MAX_S = 60.0
# "Service not available, closing": what a server says to a client it drops, idle ones included.
SMTP_CLOSING = 421

_ENHANCED_CODE = re.compile(rb"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class _TrackedSMTP(smtplib.SMTP):
    """smtplib.SMTP that remembers whether the message body was handed over."""

    body_sent = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        # Once DATA starts, a lost connection no longer means "not delivered".
        self.body_sent = True
        return super().data(msg)


class SmtpSender:
    """Sends e-mail through one SMTP server; optionally STARTTLS and AUTH."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None = None,
        password: SecretStr | None = None,
        starttls: bool = False,
        timeout_s: float = SMTP_TIMEOUT_S,
        ca_bundle: Path | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("set both the SMTP username and password, or neither")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.starttls = starttls
        self.timeout_s = timeout_s
        self.ca_bundle = ca_bundle
        self._idle: queue.LifoQueue[tuple[_TrackedSMTP, float]] = queue.LifoQueue(SMTP_IDLE_CONNECTIONS)

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpSender:
        settings.require("smtp_host")
        assert settings.smtp_host is not None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            starttls=settings.smtp_starttls,
            ca_bundle=settings.tls_ca_bundle,
        )

    def __repr__(self) -> str:
        return f"SmtpSender(host={self.host!r}, port={self.port}, username={self.username!r}, starttls={self.starttls})"

    def _tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)

    def send(self, message: Message) -> str:
        """Send ``message`` to its To/Cc/Bcc recipients; return its Message-ID."""
        message_id = message.get("Message-ID")
        if message_id is None:
            raise ValueError("message has no Message-ID")
        message_id = str(message_id).strip()
        with (
            tracing.client_span("smtp send", {"server.address": self.host, "server.port": self.port}),
            _translate() as state,
        ):
            calls.going_out(System.SMTP)
            smtp = self._kept()
            if smtp is not None:
                state["smtp"] = smtp
                try:
                    refused = self._send_on(smtp, message)
                except (smtplib.SMTPServerDisconnected, smtplib.SMTPSenderRefused, OSError) as exc:
                    if smtp.body_sent or not _dropped(exc):
                        raise
                    # The server dropped it while it was idle, before it took anything: a new one.
                    smtp = None
            if smtp is None:
                smtp = self._connect()
                state["smtp"] = smtp
                refused = self._send_on(smtp, message)
            self._keep(smtp)
        if refused:
            # Some recipients took it; retrying would duplicate it for them.
            log.warning("email_recipients_refused", message_id=message_id, refused=len(refused))
        log.info("email_sent", message_id=message_id)
        return message_id

    def close(self) -> None:
        """QUIT the kept connections."""
        while True:
            try:
                smtp, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            _quit(smtp)

    def _connect(self) -> _TrackedSMTP:
        smtp = _TrackedSMTP(self.host, self.port, timeout=self.timeout_s)
        try:
            if self.starttls:
                smtp.starttls(context=self._tls_context())
            if self.username is not None and self._password is not None:
                smtp.login(self.username, self._password.get_secret_value())
        except BaseException:
            smtp.close()
            raise
        return smtp

    @staticmethod
    def _send_on(smtp: _TrackedSMTP, message: Message) -> dict[str, tuple[int, bytes]]:
        smtp.body_sent = False
        try:
            return smtp.send_message(message)
        except BaseException:
            # No QUIT after a failure: it could wait a whole timeout, or hide the first error.
            smtp.close()
            raise

    def _kept(self) -> _TrackedSMTP | None:
        """A kept connection idle for less than SMTP_IDLE_MAX_S (older ones are closed), or None."""
        while True:
            try:
                smtp, since = self._idle.get_nowait()
            except queue.Empty:
                return None
            if time.monotonic() - since < SMTP_IDLE_MAX_S:
                return smtp
            # No QUIT: the server may be gone, and QUIT would wait for its answer.
            smtp.close()

    def _keep(self, smtp: _TrackedSMTP) -> None:
        try:
            self._idle.put_nowait((smtp, time.monotonic()))
        except queue.Full:
            _quit(smtp)


def _dropped(exc: BaseException) -> bool:
    """The server closed a kept connection (gone, or a 421 to MAIL FROM) before the message went out."""
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return exc.smtp_code == SMTP_CLOSING
    return isinstance(exc, (smtplib.SMTPServerDisconnected, OSError))


def _quit(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        smtp.quit()
    smtp.close()


def _reply_summary(code: int, reply: bytes | str) -> str:
    raw = reply.encode("utf-8", "replace") if isinstance(reply, str) else reply
    match = _ENHANCED_CODE.match(raw)
    return f"{code} {match.group(1).decode()}" if match else str(code)


def _is_temporary(code: int) -> bool:
    return 400 <= code < 500


@contextlib.contextmanager
def _translate() -> Iterator[dict[str, Any]]:
    """The one place smtplib and socket errors become EmailError (see errors.py for the tree).

    Server reply texts are dropped, and the original exception is not chained
    for refusals, since both often quote the recipient's address.
    """
    state: dict[str, Any] = {}
    try:
        yield state
    except EmailError:
        raise
    except smtplib.SMTPRecipientsRefused as exc:
        codes = sorted({code for code, _ in exc.recipients.values()})
        temporary = any(_is_temporary(c) for c in codes)
        kind = EmailTransientError if temporary else EmailPermanentError
        raise kind(
            f"SMTP refused every recipient ({', '.join(map(str, codes))})", code=codes[0] if codes else None
        ) from None
    except smtplib.SMTPResponseException as exc:
        # Sender refused, DATA refused, HELO, AUTH, connect greeting: the stage is in the type.
        stage = {
            smtplib.SMTPSenderRefused: "MAIL FROM",
            smtplib.SMTPDataError: "DATA",
            smtplib.SMTPHeloError: "HELO",
            smtplib.SMTPAuthenticationError: "AUTH",
            smtplib.SMTPConnectError: "connect",
        }.get(type(exc), "command")
        kind = EmailTransientError if _is_temporary(exc.smtp_code) else EmailPermanentError
        raise kind(
            f"SMTP {stage} answered {_reply_summary(exc.smtp_code, exc.smtp_error)}", code=exc.smtp_code
        ) from None
    except smtplib.SMTPNotSupportedError as exc:
        # Asked for STARTTLS or AUTH and the server does not offer it: configuration, not luck.
        raise EmailPermanentError(f"SMTP server lacks a required extension: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise EmailPermanentError(f"SMTP server certificate not trusted: {exc.verify_message}") from exc
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        # OSError covers refused/reset connections, timeouts, DNS and TLS failures.
        smtp = state.get("smtp")
        what = type(exc).__name__
        if smtp is not None and smtp.body_sent:
            raise EmailDeliveryUnknownError(
                f"SMTP connection lost after the message was sent ({what}); it may have been delivered"
            ) from exc
        raise EmailTransientError(f"SMTP connection failed ({what})") from exc
    except smtplib.SMTPException as exc:
        # e.g. "No suitable authentication method found": the server cannot take our login.
        raise EmailPermanentError(f"SMTP failed: {type(exc).__name__}") from None
