"""The simulator's OAuth 2.0 JWT bearer token endpoint and the life of its tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.core.settings import Settings
from provisioning.sandbox.salesforce import SalesforceSimulator
from provisioning.sandbox.salesforce.driver import SalesforceDriver

StartSalesforce = Callable[..., SalesforceDriver]


def other_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_a_valid_assertion_gets_a_bearer_token_for_this_instance(sf: SalesforceDriver) -> None:
    response = sf.token_response(sf.assertion())
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "api"
    assert body["instance_url"] == sf.url
    assert body["id"].startswith(f"{sf.url}/id/00D")
    assert body["access_token"].startswith("00D")
    assert "refresh_token" not in body
    assert sf.rest("GET", f"sobjects/Order/{sf.seed()}", body["access_token"]).status_code == 200


def test_simple_salesforce_style_assertions_with_a_string_exp_and_a_trailing_slash_audience_work(
    sf: SalesforceDriver,
) -> None:
    response = sf.token_response(sf.assertion(exp=str(int(time.time()) + 180), aud=sf.url + "/"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("claims", "error", "description"),
    [
        ({"iss": "3MVG9-not-our-app"}, "invalid_client_id", "client identifier invalid"),
        ({"aud": "https://login.salesforce.com"}, "invalid_grant", "audience is invalid"),
        ({"sub": "someone@else.example"}, "invalid_grant", "user hasn't approved this consumer"),
        ({"exp": 1_000_000}, "invalid_grant", "expired authorization code"),
        ({"exp": None}, "invalid_grant", "invalid assertion"),
    ],
)
def test_each_bad_claim_gets_salesforces_own_error(
    sf: SalesforceDriver, claims: dict[str, Any], error: str, description: str
) -> None:
    response = sf.token_response(sf.assertion(**claims))
    assert response.status_code == 400
    assert response.json() == {"error": error, "error_description": description}


def test_an_assertion_signed_with_another_key_is_an_invalid_assertion(sf: SalesforceDriver) -> None:
    response = sf.token_response(sf.assertion(key=other_key()))
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": "invalid assertion"}


def test_a_foreign_certificate_on_the_app_refuses_our_key_until_it_is_put_back(sf: SalesforceDriver) -> None:
    token = sf.login()
    assert sf.ok("POST", "app", {"foreign_certificate": True}) == {"foreign_certificate": True}
    refused = sf.token_response(sf.assertion())
    assert refused.status_code == 400
    assert refused.json() == {"error": "invalid_grant", "error_description": "invalid assertion"}
    # A token issued before stays valid: only logins are refused.
    assert sf.rest("GET", f"sobjects/Order/{sf.seed()}", token).status_code == 200
    assert sf.ok("POST", "app", {"foreign_certificate": False}) == {"foreign_certificate": False}
    assert sf.token_response(sf.assertion()).status_code == 200
    sf.ok("POST", "app", {"foreign_certificate": True})
    sf.ok("POST", "reset")
    assert sf.ok("GET", "app") == {"foreign_certificate": False}


@pytest.mark.parametrize("body", [{"foreign_certificate": "yes"}, {"certificate": True}, []])
def test_bad_app_settings_are_refused(sf: SalesforceDriver, body: Any) -> None:
    assert sf.admin("POST", "app", body).status_code == 400


def test_garbage_instead_of_a_jwt_is_an_invalid_assertion(sf: SalesforceDriver) -> None:
    response = sf.token_response("not.a.jwt")
    assert response.json() == {"error": "invalid_grant", "error_description": "invalid assertion"}


def test_another_grant_type_is_not_supported(sf: SalesforceDriver) -> None:
    response = sf.token_response(sf.assertion(), grant_type="password")
    assert response.status_code == 400
    assert response.json() == {
        "error": "unsupported_grant_type",
        "error_description": "grant type not supported",
    }


def test_a_token_stops_working_after_its_lifetime(start_sf: StartSalesforce) -> None:
    sf = start_sf(token_lifetime_s=0.3)
    order_id = sf.seed()
    token = sf.login()
    assert sf.rest("GET", f"sobjects/Order/{order_id}", token).status_code == 200
    time.sleep(0.4)
    response = sf.rest("GET", f"sobjects/Order/{order_id}", token)
    assert response.status_code == 401
    assert response.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert sf.rest("GET", f"sobjects/Order/{order_id}", sf.login()).status_code == 200


def test_revoking_tokens_makes_the_next_rest_call_unauthorised(sf: SalesforceDriver) -> None:
    order_id = sf.seed()
    token = sf.login()
    assert sf.ok("POST", "tokens/revoke") == {"revoked": 1}
    response = sf.rest("GET", f"sobjects/Order/{order_id}", token)
    assert response.status_code == 401
    assert response.json()[0]["errorCode"] == "INVALID_SESSION_ID"


def test_a_missing_authorization_header_is_an_invalid_session(sf: SalesforceDriver) -> None:
    response = sf.rest("GET", f"sobjects/Order/{sf.seed()}", None)
    assert response.status_code == 401
    assert response.json()[0]["errorCode"] == "INVALID_SESSION_ID"


def test_logins_are_counted_and_take_injected_faults(sf: SalesforceDriver) -> None:
    sf.ok("POST", "faults", {"force": {"token": ["error"]}, "error_status": 503})
    failed = sf.token_response(sf.assertion())
    assert failed.status_code == 503
    assert failed.json()["error"] == "unknown_error"
    assert sf.token_response(sf.assertion()).status_code == 200
    assert sf.calls()["token"] == 2


def test_env_points_our_settings_at_the_simulator(tmp_path: Path) -> None:
    sim = SalesforceSimulator(tmp_path, seed=1)
    env = sim.env("https://127.0.0.1:8443/")
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert str(settings.sf_login_url).rstrip("/") == "https://127.0.0.1:8443"
    assert settings.sf_client_id is not None
    assert settings.sf_client_id.get_secret_value() == sim.client_id
    assert settings.sf_username == "integration@sandbox.example"
    assert settings.sf_private_key_file == tmp_path / "sf-jwt-key.pem"
    assert settings.sf_api_version == "64.0"
    assert sim.private_key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sim.certificate_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert "PRIVATE" not in repr(sim.app)
