"""The SMTP simulator, driven by the standard library's smtplib and its admin app over HTTPS."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import requests

from provisioning.core.http import make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.smtp import SmtpSimulator

RECIPIENT = "customer@example.com"
SENDER = "provisioning@example.com"


class Running:
    def __init__(self, sim: SmtpSimulator, thread: ServerThread, admin: requests.Session) -> None:
        self.sim, self.thread, self.admin = sim, thread, admin
        self.host, self.port = thread.host, thread.ports["smtp"]

    def url(self, path: str) -> str:
        return f"{self.thread.url('admin')}/__admin/{path}"

    def get(self, path: str, **params: str) -> Any:
        response = self.admin.get(self.url(path), params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.admin.post(self.url(path), json=body or {}, timeout=5)
        response.raise_for_status()
        return response.json()

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=5)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def start(tls: SandboxTLS) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def _start(**kwargs: Any) -> Running:
        sim = SmtpSimulator(seed=7, **kwargs)
        thread = ServerThread(ssl_context=tls.server_context)
        thread.add_server("smtp", sim.starter())
        thread.add_app("admin", sim.build_admin_app())
        thread.start()
        running.append(Running(sim, thread, make_session(tls.ca_bundle)))
        return running[-1]

    yield _start
    for r in running:
        r.admin.close()
        r.thread.stop()


@pytest.fixture
def server(start: Callable[..., Running]) -> Running:
    return start()


def message(
    message_id: str = "<one.abc@test.local>", subject: str = "Your order 42 is active"
) -> EmailMessage:
    msg = EmailMessage()
    msg["Message-ID"] = message_id
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = subject
    msg.set_content("Hello,\nyour order is active.\n")
    return msg


def test_an_accepted_message_is_kept_with_its_envelope_and_headers(server: Running) -> None:
    with server.smtp() as smtp:
        refused = smtp.send_message(message())

    assert refused == {}
    [kept] = server.get("messages")["messages"]
    assert kept["id"] == 1
    assert kept["message_id"] == "<one.abc@test.local>"
    assert kept["mail_from"] == SENDER
    assert kept["rcpt_tos"] == [RECIPIENT]
    assert kept["subject"] == "Your order 42 is active"
    assert kept["size"] > 0
    assert kept["received_at"].endswith("+00:00")
    raw = server.admin.get(server.url("messages/1"), timeout=5)
    assert raw.status_code == 200
    assert "your order is active." in raw.text
    assert len(raw.content) == kept["size"]


def test_the_message_id_filter_keeps_only_that_message(server: Running) -> None:
    with server.smtp() as smtp:
        smtp.send_message(message("<one.abc@test.local>"))
        smtp.send_message(message("<two.abc@test.local>"))

    assert [m["id"] for m in server.get("messages", message_id="<two.abc@test.local>")["messages"]] == [2]
    assert [m["id"] for m in server.get("messages", message_id="one.abc@test.local")["messages"]] == [1]
    assert server.get("messages", message_id="<none@test.local>") == {"count": 0, "messages": []}


def test_the_summary_counts_copies_of_one_message_id_as_duplicates(server: Running) -> None:
    with server.smtp() as smtp:
        smtp.send_message(message("<dup@test.local>"))
        smtp.send_message(message("<dup@test.local>"))
        smtp.send_message(message("<single@test.local>"))

    assert server.get("messages/summary") == {
        "count": 3,
        "distinct_message_ids": 2,
        "without_message_id": 0,
        "duplicates": {"<dup@test.local>": 2},
        "connections": 1,  # the three went over one connection
    }


def test_clear_forgets_every_message(server: Running) -> None:
    with server.smtp() as smtp:
        smtp.send_message(message())

    assert server.post("messages/clear") == {"cleared": 1}
    assert server.get("messages")["count"] == 0


def test_an_unknown_message_number_is_not_found(server: Running) -> None:
    assert server.admin.get(server.url("messages/99"), timeout=5).status_code == 404


def test_a_forced_error_answers_451_and_keeps_nothing(server: Running) -> None:
    server.post("faults", {"force": {"DATA": ["error"]}})

    with server.smtp() as smtp, pytest.raises(smtplib.SMTPDataError) as caught:
        smtp.send_message(message())

    assert caught.value.smtp_code == 451
    assert caught.value.smtp_error == b"4.3.0 Temporary failure"
    assert server.get("messages")["count"] == 0
    calls = server.get("calls")
    assert calls["calls"] == {"DATA": 1}
    assert calls["injected"] == {"DATA:error": 1}


def test_a_forced_reset_drops_the_connection_and_keeps_nothing(server: Running) -> None:
    server.post("faults", {"force": {"DATA": ["reset"]}})

    smtp = server.smtp()
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionResetError)):
        smtp.send_message(message())
    smtp.close()

    assert server.get("messages")["count"] == 0


def test_an_ambiguous_failure_keeps_exactly_one_message_and_the_client_sees_a_disconnect(
    server: Running,
) -> None:
    server.post("faults", {"force": {"DATA": ["ambiguous"]}})

    smtp = server.smtp()
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionResetError)):
        smtp.send_message(message("<lost-reply@test.local>"))
    smtp.close()

    assert [m["message_id"] for m in server.get("messages")["messages"]] == ["<lost-reply@test.local>"]


def test_a_forced_fault_is_used_once_then_messages_go_through(server: Running) -> None:
    server.post("faults", {"force": {"DATA": ["error"]}})

    with server.smtp() as smtp:
        with pytest.raises(smtplib.SMTPDataError):
            smtp.send_message(message())
        smtp.send_message(message())

    assert server.get("messages")["count"] == 1
    assert server.get("faults")["force"] == {}


def test_an_error_rate_of_one_refuses_every_message_until_it_is_reset(server: Running) -> None:
    server.post("faults", {"error_rate": 1.0})
    with server.smtp() as smtp:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPDataError):
                smtp.send_message(message())

    server.post("faults", {})
    with server.smtp() as smtp:
        smtp.send_message(message())

    assert server.get("messages")["count"] == 1
    assert server.get("calls")["calls"] == {"DATA": 4}


def test_a_recipient_in_the_invalid_domain_is_refused_with_550(server: Running) -> None:
    msg = message()
    msg.replace_header("To", "nobody@example.invalid")

    with server.smtp() as smtp, pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        smtp.send_message(msg)

    assert caught.value.recipients["nobody@example.invalid"][0] == 550
    assert server.get("messages")["count"] == 0


def test_a_message_over_the_size_limit_is_refused_with_552(start: Callable[..., Running]) -> None:
    server = start(data_size_limit=200)
    msg = message()
    msg.set_content("x" * 500)

    with server.smtp() as smtp, pytest.raises(smtplib.SMTPSenderRefused) as caught:
        smtp.send_message(msg)

    assert caught.value.smtp_code == 552


def test_with_credentials_starttls_and_auth_come_before_mail(
    start: Callable[..., Running], tls: SandboxTLS
) -> None:
    server = start(tls_context=tls.server_context, credentials=("robot", "s3cret"))
    client_tls = ssl.create_default_context(cafile=str(tls.ca_bundle))

    with server.smtp() as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            smtp.send_message(message())
        assert caught.value.smtp_code == 530

    with server.smtp() as smtp:
        smtp.starttls(context=client_tls)
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad_login:
            smtp.login("robot", "wrong")
        assert bad_login.value.smtp_code == 535
        smtp.login("robot", "s3cret")
        smtp.send_message(message())

    assert server.get("messages")["count"] == 1


def test_credentials_without_tls_are_refused() -> None:
    with pytest.raises(ValueError, match="tls_context"):
        SmtpSimulator(credentials=("robot", "s3cret"))


def test_env_points_our_settings_at_the_server(start: Callable[..., Running], tls: SandboxTLS) -> None:
    plain = SmtpSimulator()
    secured = SmtpSimulator(tls_context=tls.server_context, credentials=("robot", "s3cret"))

    assert plain.env("127.0.0.1", 2525) == {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": "2525",
        "SMTP_STARTTLS": "false",
    }
    assert secured.env("127.0.0.1", 2525) == {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": "2525",
        "SMTP_STARTTLS": "true",
        "SMTP_USERNAME": "robot",
        "SMTP_PASSWORD": "s3cret",
    }


def test_stopping_the_server_ends_the_sessions_of_clients_still_connected(
    start: Callable[..., Running],
) -> None:
    # Our sender keeps its connection open between messages: at stop, its session's handler must end
    # with the loop, not be left pending (asyncio then logs "Task was destroyed but it is pending!").
    running = start()
    client = running.smtp()
    client.ehlo()
    running.thread.stop()

    assert [t for t in asyncio.all_tasks(running.thread.loop) if not t.done()] == []
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()
