"""OAuth 2.0 JWT bearer login, without simple-salesforce's own (it only builds *.salesforce.com hosts).

One :class:`JWTBearerAuth` per process: the token is cached and shared by every
thread; :meth:`JWTBearerAuth.renew` logs in again only when the token that
failed is still the current one, so many threads meeting one expired token
cause one login.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from pydantic import SecretStr

from provisioning.core.http import (
    TransportFailure,
    classify,
    connection_retrying,
    make_session,
    status_failure,
)
from provisioning.core.logs import get_logger
from provisioning.core.repeating import RepeatingFailure
from provisioning.core.settings import Settings
from provisioning.salesforce.errors import SalesforceAuthError, from_transport

log = get_logger(__name__)

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
LOGIN_CONNECT_TIMEOUT_S = 10.0
LOGIN_READ_TIMEOUT_S = 30.0
# Salesforce wants exp within 3 minutes of now.
ASSERTION_LIFETIME_S = 180

KEY_REMEDY = (
    "upload the certificate of SF_PRIVATE_KEY_FILE's key to the connected app (or point "
    "SF_PRIVATE_KEY_FILE at the key of the certificate it has)"
)
CLIENT_ID_REMEDY = "set SF_CLIENT_ID to the consumer key of the org's connected app"
DEFAULT_REMEDY = "check SF_LOGIN_URL, SF_CLIENT_ID, SF_USERNAME and SF_PRIVATE_KEY_FILE against the org"

# The one table of login refusals: (substring of "error error_description", likely cause, remedy);
# first match wins. The cause goes in the error's message, the remedy on the error and in the log.
_REFUSALS: tuple[tuple[str, str, str], ...] = (
    (
        "user hasn't approved this consumer",
        "the integration user is not pre-authorized for the connected app (Permitted Users: "
        "'Admin approved users are pre-authorized', and the user's profile or permission set added to "
        "the app), or the JWT audience (SF_LOGIN_URL) does not match the org's login host",
        "pre-authorize the integration user for the connected app (add its profile or permission set), "
        "and check that SF_LOGIN_URL is the org's login host",
    ),
    (
        "not admin approved",
        "the integration user is not pre-authorized for the connected app: add the user's profile or "
        "permission set to the app's approved users",
        "add the integration user's profile or permission set to the connected app's approved users",
    ),
    (
        "audience",
        "the JWT audience does not match the login URL: SF_LOGIN_URL must be https://login.salesforce.com "
        "(production), https://test.salesforce.com (sandbox) or the org's My Domain URL, and it is used "
        "both as the host and as aud",
        "set SF_LOGIN_URL to https://login.salesforce.com, https://test.salesforce.com or the org's "
        "My Domain URL",
    ),
    (
        "invalid assertion",
        "the JWT signature does not verify: the private key (SF_PRIVATE_KEY_FILE) does not match the "
        "certificate uploaded to the connected app (or the assertion expired: check this machine's clock)",
        KEY_REMEDY,
    ),
    (
        "signature",
        "the private key (SF_PRIVATE_KEY_FILE) does not match the certificate uploaded to the connected app",
        KEY_REMEDY,
    ),
    (
        "expired",
        "the assertion had expired on arrival: check this machine's clock",
        "set this machine's clock right (NTP)",
    ),
    (
        "client identifier invalid",
        "SF_CLIENT_ID is not the consumer key of a connected app in this org",
        CLIENT_ID_REMEDY,
    ),
    (
        "invalid_client",
        "SF_CLIENT_ID is not the consumer key of a connected app in this org",
        CLIENT_ID_REMEDY,
    ),
    (
        "inactive",
        "the integration user (SF_USERNAME) is inactive or frozen",
        "reactivate or unfreeze the integration user (SF_USERNAME)",
    ),
    (
        "user",
        "SF_USERNAME is not a user of this org, or not allowed to use the connected app",
        "set SF_USERNAME to a user of this org that may use the connected app",
    ),
)
# A refused login logged once, then summarized this often (SF_REFUSED_RETRY_MAX_S from the settings).
REFUSAL_SUMMARY_S = 60.0


@dataclass(frozen=True)
class AccessToken:
    """One Salesforce session: the bearer token and the instance it belongs to."""

    access_token: SecretStr = field(repr=False)
    instance_url: str
    issued_at: float
    id_url: str | None = None
    scope: str | None = None

    def bearer(self) -> str:
        """The raw token, for an Authorization header; never log it."""
        return self.access_token.get_secret_value()

    @property
    def org_id(self) -> str | None:
        """The org's Id (the Pub/Sub API's ``tenantid``), from the identity URL ``…/id/<orgId>/<userId>``."""
        if not self.id_url:
            return None
        parts = urlsplit(self.id_url).path.rstrip("/").split("/")
        if len(parts) >= 3 and parts[-3] == "id" and parts[-2]:
            return parts[-2]
        return None


class JWTBearerAuth:
    """Logs in with a signed JWT and caches the token for every thread of the process."""

    def __init__(
        self,
        *,
        login_url: str,
        client_id: str | SecretStr,
        username: str,
        private_key_file: Path,
        session: requests.Session,
        refusal_summary_s: float = REFUSAL_SUMMARY_S,
    ) -> None:
        self.login_url = str(login_url).rstrip("/")
        self._client_id = client_id if isinstance(client_id, SecretStr) else SecretStr(client_id)
        self._username = username
        self._key = _load_private_key(Path(private_key_file))
        self._session = session
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self.logins = 0
        # Every thread that logs in meets the same refusal: one ERROR line, then a summary per interval.
        self._refusals = RepeatingFailure(log, "salesforce_login_refused", interval_s=refusal_summary_s)

    @classmethod
    def from_settings(cls, settings: Settings, session: requests.Session | None = None) -> JWTBearerAuth:
        settings.require("sf_login_url", "sf_client_id", "sf_username", "sf_private_key_file")
        assert settings.sf_client_id is not None
        assert settings.sf_username is not None
        assert settings.sf_private_key_file is not None
        return cls(
            login_url=str(settings.sf_login_url),
            client_id=settings.sf_client_id,
            username=settings.sf_username,
            private_key_file=settings.sf_private_key_file,
            session=session if session is not None else make_session(settings.tls_ca_bundle),
            refusal_summary_s=settings.sf_refused_retry_max_s,
        )

    def __repr__(self) -> str:
        return f"JWTBearerAuth(login_url={self.login_url!r}, logins={self.logins})"

    @property
    def token_url(self) -> str:
        return f"{self.login_url}/services/oauth2/token"

    def token(self) -> AccessToken:
        """The current token, logging in first if there is none."""
        current = self._token
        if current is not None:
            return current
        with self._lock:
            if self._token is None:
                self._token = self._login()
            return self._token

    def renew(self, failed: AccessToken) -> AccessToken:
        """A new token after ``failed`` was refused; no login if another thread already renewed it."""
        with self._lock:
            if self._token is not None and self._token != failed:
                return self._token
            self._token = None
            self._token = self._login()
            return self._token

    def _assertion(self) -> str:
        claims: dict[str, Any] = {
            "iss": self._client_id.get_secret_value(),
            "sub": self._username,
            "aud": self.login_url,
            "exp": int(time.time()) + ASSERTION_LIFETIME_S,
        }
        return jwt.encode(claims, self._key, algorithm="RS256")

    def _login(self) -> AccessToken:
        self.logins += 1
        try:
            response = connection_retrying()(
                self._session.post,
                self.token_url,
                data={"grant_type": GRANT_TYPE, "assertion": self._assertion()},
                headers={"Accept": "application/json"},
                timeout=(LOGIN_CONNECT_TIMEOUT_S, LOGIN_READ_TIMEOUT_S),
            )
        except requests.RequestException as exc:
            # Not chained: the request (and with it the assertion) stays out of tracebacks.
            raise from_transport(classify(exc), f"Salesforce login at {self.token_url}") from None
        body = _json_object(response)
        if response.status_code == 200 and body.get("access_token") and body.get("instance_url"):
            if not self._refusals.recovered(login_url=self.login_url):
                log.info("salesforce_login", login_url=self.login_url, instance_url=body["instance_url"])
            return AccessToken(
                access_token=SecretStr(str(body["access_token"])),
                instance_url=str(body["instance_url"]).rstrip("/"),
                issued_at=time.time(),
                id_url=body.get("id"),
                scope=body.get("scope"),
            )
        status = response.status_code
        busy = status_failure(status)
        if busy is not None:
            raise from_transport(
                TransportFailure(busy, f"HTTP {status}"),
                f"Salesforce login at {self.token_url}",
                status=status,
            )
        error = str(body.get("error") or f"HTTP {status}")
        description = str(body.get("error_description") or "").strip()
        cause, remedy = _likely_cause(error, description)
        self._refusals.failed(
            f"{status} {error} {description}",
            login_url=self.login_url,
            status=status,
            error=error,
            error_description=description,
            remedy=remedy,
        )
        raise SalesforceAuthError(
            f"Salesforce login refused at {self.token_url}: {error}"
            + (f" ({description})" if description else "")
            + f". Likely cause: {cause}.",
            status=status,
            error_code=error,
            remedy=remedy,
        )


def _likely_cause(error: str, description: str) -> tuple[str, str]:
    """(likely cause, remedy) of a refused login, from :data:`_REFUSALS`."""
    text = f"{error} {description}".lower()
    for needle, cause, remedy in _REFUSALS:
        if needle in text:
            return cause, remedy
    if error == "HTTP 200":
        return (
            "the answer has no access_token or instance_url: is SF_LOGIN_URL a Salesforce login host?",
            "set SF_LOGIN_URL to the org's login host",
        )
    return "see the error above; check SF_LOGIN_URL, SF_CLIENT_ID, SF_USERNAME and SF_PRIVATE_KEY_FILE", (
        DEFAULT_REMEDY
    )


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _load_private_key(path: Path) -> RSAPrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise SalesforceAuthError(f"cannot read the private key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SalesforceAuthError(
            f"{path} is not an unencrypted PEM private key (expected -----BEGIN PRIVATE KEY----- "
            "or -----BEGIN RSA PRIVATE KEY-----)"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise SalesforceAuthError(
            f"{path} holds a {type(key).__name__}; the JWT bearer flow needs an RSA key"
        )
    return key
