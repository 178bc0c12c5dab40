"""SmtpSender against the SMTP simulator: results, and every failure translated to our errors."""

from __future__ import annotations

import socket
import time
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.settings import ConfigError, Settings
from provisioning.email.errors import (
    EmailDeliveryUnknownError,
    EmailError,
    EmailPermanentError,
    EmailTransientError,
)
from provisioning.email.message import build_activation_email, message_id_for
from provisioning.email.sender import SmtpSender
from provisioning.sandbox.common import SandboxTLS

RUN_ID = "a0RE000000IJmcNMAT:idem-1"
DOMAIN = "provisioning.local"
CUSTOMER = "ana.lima@example.com"
PASSWORD = "correct-horse-battery-staple"


def activation_email(to_address: str = CUSTOMER) -> EmailMessage:
    return build_activation_email(
        key=RUN_ID,
        to_address=to_address,
        first_name="Ana",
        order_number="00000142",
        whmcs_order_id="981",
        iccid="8988247000001234567",
        activation_code="LPA:1$smdp.example.com$MATCH-1",
        sender="Provisioning <provisioning@example.com>",
        message_id_domain=DOMAIN,
    )


def sender_for(sandbox: Any, **kwargs: Any) -> SmtpSender:
    return SmtpSender(host=sandbox.host, port=sandbox.port, **kwargs)


@pytest.fixture
def secured(smtp_sandbox_factory: Any, sandbox_tls: SandboxTLS) -> Any:
    return smtp_sandbox_factory(tls_context=sandbox_tls.server_context, credentials=("robot", PASSWORD))


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_sent_message_is_stored_once_and_its_message_id_returned(smtp_sandbox: Any) -> None:
    message_id = sender_for(smtp_sandbox).send(activation_email())

    assert message_id == message_id_for(RUN_ID, DOMAIN)
    [stored] = smtp_sandbox.messages()
    assert stored["message_id"] == message_id
    assert stored["rcpt_tos"] == [CUSTOMER]
    assert stored["mail_from"] == "provisioning@example.com"
    assert b"Content-Type: image/png" in smtp_sandbox.raw(stored["id"])


def test_a_451_reply_is_transient_and_not_an_unknown_delivery(smtp_sandbox: Any) -> None:
    smtp_sandbox.force("error")

    with pytest.raises(EmailTransientError) as caught:
        sender_for(smtp_sandbox).send(activation_email())

    assert not isinstance(caught.value, EmailDeliveryUnknownError)
    assert isinstance(caught.value, TransientError)
    assert caught.value.code == 451
    assert str(caught.value) == "SMTP DATA answered 451 4.3.0"
    assert smtp_sandbox.messages() == []


def test_a_lost_reply_after_data_is_an_unknown_delivery_and_the_server_kept_one_copy(
    smtp_sandbox: Any,
) -> None:
    smtp_sandbox.force("ambiguous")

    with pytest.raises(EmailDeliveryUnknownError) as caught:
        sender_for(smtp_sandbox).send(activation_email())

    assert isinstance(caught.value, EmailTransientError)
    assert [m["message_id"] for m in smtp_sandbox.messages()] == [message_id_for(RUN_ID, DOMAIN)]


def test_a_resend_after_a_lost_reply_carries_the_same_message_id(smtp_sandbox: Any) -> None:
    smtp_sandbox.force("ambiguous")
    sender = sender_for(smtp_sandbox)
    with pytest.raises(EmailDeliveryUnknownError):
        sender.send(activation_email())

    sender.send(activation_email())

    assert smtp_sandbox.admin_get("messages/summary")["duplicates"] == {message_id_for(RUN_ID, DOMAIN): 2}


def test_a_connection_reset_during_data_is_transient_and_nothing_is_stored(smtp_sandbox: Any) -> None:
    smtp_sandbox.force("reset")

    with pytest.raises(EmailTransientError):
        sender_for(smtp_sandbox).send(activation_email())

    assert smtp_sandbox.messages() == []


def test_a_refused_connection_is_transient(closed_port: int) -> None:
    with pytest.raises(EmailTransientError) as caught:
        SmtpSender(host="127.0.0.1", port=closed_port).send(activation_email())

    assert not isinstance(caught.value, EmailDeliveryUnknownError)
    assert "ConnectionRefusedError" in str(caught.value)


def test_a_server_that_never_greets_times_out_as_transient() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        with pytest.raises(EmailTransientError) as caught:
            SmtpSender(host="127.0.0.1", port=port, timeout_s=0.2).send(activation_email())

    assert not isinstance(caught.value, EmailDeliveryUnknownError)


def test_a_refused_recipient_is_permanent_and_the_address_stays_out_of_the_error(smtp_sandbox: Any) -> None:
    with pytest.raises(EmailPermanentError) as caught:
        sender_for(smtp_sandbox).send(activation_email(to_address="ana@example.invalid"))

    assert isinstance(caught.value, PermanentError)
    assert caught.value.code == 550
    assert "example.invalid" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_message_over_the_size_limit_is_permanent(smtp_sandbox_factory: Any) -> None:
    sandbox = smtp_sandbox_factory(data_size_limit=1000)

    with pytest.raises(EmailPermanentError) as caught:
        sender_for(sandbox).send(activation_email())

    assert caught.value.code == 552
    assert str(caught.value) == "SMTP MAIL FROM answered 552"


def test_starttls_and_login_deliver_the_message(secured: Any) -> None:
    sender = sender_for(
        secured,
        username="robot",
        password=SecretStr(PASSWORD),
        starttls=True,
        ca_bundle=secured.tls.ca_bundle,
    )

    assert sender.send(activation_email()) == message_id_for(RUN_ID, DOMAIN)
    assert len(secured.messages()) == 1


def test_a_wrong_password_is_permanent_and_never_shown(secured: Any) -> None:
    wrong = "wrong-" + PASSWORD
    sender = sender_for(
        secured, username="robot", password=SecretStr(wrong), starttls=True, ca_bundle=secured.tls.ca_bundle
    )

    with pytest.raises(EmailPermanentError) as caught:
        sender.send(activation_email())

    assert caught.value.code == 535
    for text in (str(caught.value), repr(caught.value), repr(sender), str(caught.value.__cause__)):
        assert wrong not in text
        assert PASSWORD not in text
    assert secured.messages() == []


def test_an_untrusted_server_certificate_is_permanent(secured: Any) -> None:
    sender = sender_for(secured, username="robot", password=SecretStr(PASSWORD), starttls=True)

    with pytest.raises(EmailPermanentError, match="certificate"):
        sender.send(activation_email())


def test_starttls_against_a_server_without_it_is_permanent(smtp_sandbox: Any) -> None:
    with pytest.raises(EmailPermanentError, match="STARTTLS"):
        sender_for(smtp_sandbox, starttls=True).send(activation_email())


def test_a_message_without_a_message_id_is_refused_before_connecting(closed_port: int) -> None:
    msg = activation_email()
    del msg["Message-ID"]

    with pytest.raises(ValueError, match="Message-ID"):
        SmtpSender(host="127.0.0.1", port=closed_port).send(msg)


def test_a_username_without_a_password_is_refused() -> None:
    with pytest.raises(ValueError, match="password"):
        SmtpSender(host="127.0.0.1", port=25, username="robot")


def test_every_email_error_is_a_provisioning_error_of_one_kind() -> None:
    assert issubclass(EmailTransientError, EmailError)
    assert issubclass(EmailTransientError, TransientError)
    assert issubclass(EmailPermanentError, EmailError)
    assert issubclass(EmailPermanentError, PermanentError)
    assert not issubclass(EmailPermanentError, TransientError)
    assert issubclass(EmailDeliveryUnknownError, EmailTransientError)


def test_from_settings_uses_the_smtp_settings(smtp_sandbox: Any) -> None:
    settings = Settings(_env_file=None, smtp_host=smtp_sandbox.host, smtp_port=smtp_sandbox.port)

    sender = SmtpSender.from_settings(settings)

    assert sender.send(activation_email()) == message_id_for(RUN_ID, DOMAIN)
    assert len(smtp_sandbox.messages()) == 1


def test_from_settings_without_a_host_names_the_missing_setting() -> None:
    settings = Settings(_env_file=None, smtp_host=None)

    with pytest.raises(ConfigError, match="SMTP_HOST"):
        SmtpSender.from_settings(settings)


def test_messages_share_a_kept_connection_and_a_dropped_one_is_replaced_without_a_copy(
    smtp_sandbox_factory: Any,
) -> None:
    sandbox = smtp_sandbox_factory(idle_timeout_s=0.5)
    sender = sender_for(sandbox)
    for n in range(3):
        sender.send(activation_email(f"customer{n}@example.com"))
    assert sandbox.admin_get("messages/summary")["connections"] == 1
    # The server drops the idle connection (421, then closes): the next message goes on a new one, once.
    time.sleep(1.0)
    sender.send(activation_email("late@example.com"))
    summary = sandbox.admin_get("messages/summary")
    assert (summary["count"], summary["connections"]) == (4, 2)
    assert [m["rcpt_tos"] for m in sandbox.messages()].count(["late@example.com"]) == 1
    sender.close()


def test_a_kept_connection_lost_after_data_is_still_an_unknown_delivery(smtp_sandbox: Any) -> None:
    sender = sender_for(smtp_sandbox)
    sender.send(activation_email("first@example.com"))
    smtp_sandbox.force("ambiguous")
    # Lost after the body went out on a kept connection: not resent on a new one.
    with pytest.raises(EmailDeliveryUnknownError):
        sender.send(activation_email())
    assert smtp_sandbox.admin_get("messages/summary")["count"] == 2
