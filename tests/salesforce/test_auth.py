from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from provisioning.core.errors import PermanentError, TransientError
from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.errors import (
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceUnavailable,
)

from .fake import CLIENT_ID, INSTANCE_URL, LOGIN_URL, USERNAME, FakeSalesforce


def test_login_sends_a_signed_jwt_with_issuer_subject_audience_and_expiry(
    auth: JWTBearerAuth, fake: FakeSalesforce
) -> None:
    token = auth.token()
    assert token.instance_url == INSTANCE_URL
    assert token.bearer() in fake.valid_tokens
    (claims,) = fake.claims
    assert claims["iss"] == CLIENT_ID
    assert claims["sub"] == USERNAME
    assert claims["aud"] == LOGIN_URL
    assert isinstance(claims["exp"], int)
    assert time.time() < claims["exp"] <= time.time() + 300
    (request,) = fake.seen
    assert request.path == "/services/oauth2/token"
    assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in request.body


def test_a_trailing_slash_on_the_login_url_does_not_change_the_audience(
    session: requests.Session, key_file: Path, fake: FakeSalesforce
) -> None:
    auth = JWTBearerAuth(
        login_url=LOGIN_URL + "/",
        client_id=CLIENT_ID,
        username=USERNAME,
        private_key_file=key_file,
        session=session,
    )
    auth.token()
    assert fake.claims[0]["aud"] == LOGIN_URL


def test_the_token_is_cached_and_shared(auth: JWTBearerAuth, fake: FakeSalesforce) -> None:
    first = auth.token()
    assert auth.token() is first
    assert fake.logins == 1


def test_twenty_threads_renewing_the_same_expired_token_cause_one_login(
    auth: JWTBearerAuth, fake: FakeSalesforce
) -> None:
    expired = auth.token()
    barrier = threading.Barrier(20)
    renewed = []

    def renew() -> None:
        barrier.wait()
        renewed.append(auth.renew(expired))

    threads = [threading.Thread(target=renew) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert fake.logins == 2
    assert len({t.bearer() for t in renewed}) == 1
    assert renewed[0] != expired


def test_renewing_a_token_that_is_not_current_any_more_returns_the_current_one(
    auth: JWTBearerAuth, fake: FakeSalesforce
) -> None:
    old = auth.token()
    new = auth.renew(old)
    assert auth.renew(old) == new
    assert fake.logins == 2


def test_a_user_not_pre_authorized_is_explained(auth: JWTBearerAuth, fake: FakeSalesforce) -> None:
    fake.login_error = (
        400,
        {"error": "invalid_grant", "error_description": "user hasn't approved this consumer"},
    )
    with pytest.raises(SalesforceAuthError, match="not pre-authorized for the connected app") as caught:
        auth.token()
    assert isinstance(caught.value, PermanentError)
    assert caught.value.error_code == "invalid_grant"


def test_an_audience_that_does_not_match_the_login_url_is_explained(
    session: requests.Session, key_file: Path
) -> None:
    auth = JWTBearerAuth(
        login_url="https://test.salesforce.com",
        client_id=CLIENT_ID,
        username=USERNAME,
        private_key_file=key_file,
        session=session,
    )
    with pytest.raises(SalesforceAuthError, match="audience does not match the login URL"):
        auth.token()


def test_a_key_that_does_not_match_the_certificate_is_explained(
    session: requests.Session, tmp_path: Path
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "other.key"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    auth = JWTBearerAuth(
        login_url=LOGIN_URL, client_id=CLIENT_ID, username=USERNAME, private_key_file=path, session=session
    )
    with pytest.raises(SalesforceAuthError, match=r"does not match the\s+certificate uploaded"):
        auth.token()


def test_a_refused_key_carries_its_remedy_and_is_logged_once_however_often_it_is_tried(
    session: requests.Session, tmp_path: Path, log_lines: Any
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "other.key"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    auth = JWTBearerAuth(
        login_url=LOGIN_URL, client_id=CLIENT_ID, username=USERNAME, private_key_file=path, session=session
    )
    for _ in range(5):
        with pytest.raises(SalesforceAuthError) as caught:
            auth.token()
        assert caught.value.remedy is not None
        assert "upload the certificate of SF_PRIVATE_KEY_FILE's key" in caught.value.remedy
    (refused,) = log_lines.at("error")
    assert refused["event"] == "salesforce_login_refused"
    assert refused["remedy"] == caught.value.remedy
    assert auth.logins == 5


def test_an_unknown_consumer_key_is_explained(session: requests.Session, key_file: Path) -> None:
    auth = JWTBearerAuth(
        login_url=LOGIN_URL,
        client_id="someone-else",
        username=USERNAME,
        private_key_file=key_file,
        session=session,
    )
    with pytest.raises(SalesforceAuthError, match="SF_CLIENT_ID is not the consumer key"):
        auth.token()


def test_refusals_never_show_the_consumer_key_the_username_or_the_assertion(
    auth: JWTBearerAuth, fake: FakeSalesforce
) -> None:
    fake.login_error = (400, {"error": "invalid_grant", "error_description": "audience is invalid"})
    with pytest.raises(SalesforceAuthError) as caught:
        auth.token()
    text = str(caught.value) + repr(auth)
    assert CLIENT_ID not in text
    assert USERNAME not in text
    assert "eyJ" not in text


def test_a_token_never_shows_in_its_repr(auth: JWTBearerAuth) -> None:
    token = auth.token()
    assert token.bearer() not in repr(token)


def test_a_login_answered_with_503_is_transient(auth: JWTBearerAuth, fake: FakeSalesforce) -> None:
    fake.login_error = (503, {"error": "unavailable"})
    with pytest.raises(SalesforceUnavailable) as caught:
        auth.token()
    assert isinstance(caught.value, TransientError)


def test_a_login_that_cannot_connect_is_transient(key_file: Path) -> None:
    session = requests.Session()
    auth = JWTBearerAuth(
        login_url="https://127.0.0.1:9",
        client_id=CLIENT_ID,
        username=USERNAME,
        private_key_file=key_file,
        session=session,
    )
    with pytest.raises(SalesforceConnectionError) as caught:
        auth.token()
    assert isinstance(caught.value, TransientError)


def test_a_missing_key_file_is_reported_at_construction(session: requests.Session, tmp_path: Path) -> None:
    with pytest.raises(SalesforceAuthError, match="cannot read the private key file"):
        JWTBearerAuth(
            login_url=LOGIN_URL,
            client_id=CLIENT_ID,
            username=USERNAME,
            private_key_file=tmp_path / "nope.key",
            session=session,
        )


def test_a_file_that_is_not_a_pem_key_is_reported(session: requests.Session, tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(SalesforceAuthError, match="not an unencrypted PEM private key"):
        JWTBearerAuth(
            login_url=LOGIN_URL,
            client_id=CLIENT_ID,
            username=USERNAME,
            private_key_file=path,
            session=session,
        )


def test_a_non_rsa_key_is_reported(session: requests.Session, tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SalesforceAuthError, match="needs an RSA key"):
        JWTBearerAuth(
            login_url=LOGIN_URL,
            client_id=CLIENT_ID,
            username=USERNAME,
            private_key_file=path,
            session=session,
        )


@pytest.mark.parametrize(
    ("id_url", "org_id"),
    [
        ("https://login.salesforce.com/id/00D5g000004ABCDEFG/0055g00000XYZ12345", "00D5g000004ABCDEFG"),
        ("https://test.salesforce.com/id/00Dfake/005fake/", "00Dfake"),
        ("https://login.salesforce.com/services/oauth2/userinfo", None),
        (None, None),
    ],
)
def test_the_org_id_comes_from_the_identity_url(id_url, org_id):
    token = AccessToken(access_token=SecretStr("t"), instance_url="https://x", issued_at=0.0, id_url=id_url)
    assert token.org_id == org_id
