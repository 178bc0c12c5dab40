"""The Connected App (its key pair and certificate), the JWT bearer check and the issued tokens."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import random
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from provisioning.core.errors import PicklableError

GRANT_TYPE_JWT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
RSA_KEY_BITS = 2048
CERT_VALIDITY_DAYS = 365


class OAuthError(PicklableError):
    """An OAuth failure, answered as HTTP 400 ``{"error", "error_description"}``."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class ConnectedApp:
    """A Connected App with "Use digital signatures": consumer key plus the uploaded certificate."""

    client_id: str
    username: str
    private_key_pem: bytes = field(repr=False)
    certificate_pem: bytes = field(repr=False)

    @classmethod
    def create(cls, rng: random.Random, username: str) -> ConnectedApp:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provisioning-sandbox-jwt")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
            .sign(key, hashes.SHA256())
        )
        alphabet = string.ascii_letters + string.digits + "._"
        # Real consumer keys start with 3MVG9 and are 85 characters long.
        client_id = "3MVG9" + "".join(rng.choice(alphabet) for _ in range(80))
        return cls(
            client_id=client_id,
            username=username,
            private_key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
        )

    def write(self, key_file: Path, cert_file: Path) -> None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_bytes(self.private_key_pem)
        key_file.chmod(0o600)
        cert_file.write_bytes(self.certificate_pem)

    def verify_assertion(self, assertion: str, login_url: str) -> None:
        """Check an RS256 JWT as Salesforce does: iss, signature, aud, sub, exp; raises OAuthError."""
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "invalid assertion") from None
        if unverified.get("iss") != self.client_id:
            raise OAuthError("invalid_client_id", "client identifier invalid")
        public_key = x509.load_pem_x509_certificate(self.certificate_pem).public_key()
        try:
            if header.get("alg") != "RS256":
                raise jwt.InvalidAlgorithmError("RS256 only")
            # Claims are checked below with Salesforce's own answers; exp may be a string (simple-salesforce).
            claims: dict[str, Any] = jwt.decode(
                assertion,
                public_key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "invalid assertion") from None
        audiences = claims.get("aud")
        if not isinstance(audiences, list):
            audiences = [audiences]
        expected = login_url.rstrip("/")
        if not any(isinstance(a, str) and a.rstrip("/") == expected for a in audiences):
            raise OAuthError("invalid_grant", "audience is invalid")
        if claims.get("sub") != self.username:
            raise OAuthError("invalid_grant", "user hasn't approved this consumer")
        try:
            expires = float(claims["exp"])
        except (KeyError, TypeError, ValueError):
            raise OAuthError("invalid_grant", "invalid assertion") from None
        if expires <= time.time():
            raise OAuthError("invalid_grant", "expired authorization code")


class TokenStore:
    """Access tokens issued by the token endpoint, each with its expiry."""

    def __init__(self, rng: random.Random, org_id: str, lifetime_s: float) -> None:
        self.org_id = org_id
        self.lifetime_s = lifetime_s
        self.issued = 0
        self._rng = rng
        self._secret = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}

    def issue(self) -> tuple[str, int]:
        """A new token (``00D…!AQ…``) and its issue time in epoch milliseconds."""
        token = f"{self.org_id[:15]}!AQ{secrets.token_urlsafe(72)}"
        self._tokens[token] = time.monotonic() + self.lifetime_s
        self.issued += 1
        return token, int(time.time() * 1000)

    def signature(self, id_url: str, issued_at: int) -> str:
        digest = hmac.new(self._secret, f"{id_url}{issued_at}".encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def valid(self, token: str | None) -> bool:
        if token is None:
            return False
        expires = self._tokens.get(token)
        if expires is None:
            return False
        if expires <= time.monotonic():
            del self._tokens[token]
            return False
        return True

    def revoke(self, token: str | None = None) -> int:
        """Revoke one token, or every token; returns how many were active."""
        if token is not None:
            return 1 if self._tokens.pop(token, None) is not None else 0
        count = len(self._tokens)
        self._tokens.clear()
        return count

    def active(self) -> int:
        now = time.monotonic()
        return sum(1 for expires in self._tokens.values() if expires > now)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` (or legacy ``OAuth …``) header."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() not in ("bearer", "oauth") or not token.strip():
        return None
    return token.strip()
