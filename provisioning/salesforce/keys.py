"""The key pair of the JWT bearer flow: an RSA private key and the self-signed certificate for it.

Salesforce verifies the service's login assertion (signed with the private key,
:class:`provisioning.salesforce.auth.JWTBearerAuth`) against the certificate on the
External Client App, so nothing secret ever leaves this machine: the certificate is
public, the key is written readable by its owner only (mode 0600, from the moment the
file exists) and goes nowhere but ``SF_PRIVATE_KEY_FILE``. A self-signed certificate is
what Salesforce expects here (no CA is involved). Existing files are never replaced
unless asked: a new key makes the certificate already on the app useless, and the
service would stop logging in until the new one is deployed.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from provisioning.core.errors import PicklableError

KEY_FILE_NAME = "salesforce-jwt.key"
CERT_FILE_NAME = "salesforce-jwt.crt"
KEY_BITS = 2048
PUBLIC_EXPONENT = 65537
DEFAULT_VALID_DAYS = 730
MAX_VALID_DAYS = 3650
COMMON_NAME = "sf-provisioning JWT bearer"
KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
# The certificate is valid from a little before now, so a clock slightly behind ours accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)


class KeyFilesExist(PicklableError, FileExistsError):
    """The key or the certificate is already there and replacing it was not asked for."""

    def __init__(self, existing: list[Path]) -> None:
        self.existing = existing
        names = " and ".join(str(p) for p in existing)
        super().__init__(
            f"{names} already exist{'s' if len(existing) == 1 else ''}: nothing was written. "
            "A new key pair needs its new certificate on the External Client App before the service "
            "can log in again; to replace them anyway, use --force."
        )


@dataclass(frozen=True)
class KeyPair:
    """What :func:`generate_key_pair` wrote."""

    key_file: Path
    cert_file: Path
    not_valid_after: dt.datetime
    sha256_fingerprint: str


def generate_key_pair(
    out_dir: Path,
    *,
    days: int = DEFAULT_VALID_DAYS,
    force: bool = False,
    now: dt.datetime | None = None,
) -> KeyPair:
    """Write ``salesforce-jwt.key`` (0600) and ``salesforce-jwt.crt`` into ``out_dir`` (created if needed).

    KeyFilesExist when either file is there and ``force`` is false; ValueError for
    ``days`` outside 1..3650.
    """
    if not 1 <= days <= MAX_VALID_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_VALID_DAYS}, not {days}")
    out_dir = Path(out_dir)
    key_file, cert_file = out_dir / KEY_FILE_NAME, out_dir / CERT_FILE_NAME
    existing = [p for p in (key_file, cert_file) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise KeyFilesExist(existing)
    out_dir.mkdir(parents=True, exist_ok=True)

    key = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS)
    cert = self_signed_certificate(key, days=days, now=now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_file, key_pem, KEY_FILE_MODE)
    _write_new(cert_file, cert.public_bytes(serialization.Encoding.PEM), CERT_FILE_MODE)
    return KeyPair(
        key_file=key_file,
        cert_file=cert_file,
        not_valid_after=cert.not_valid_after_utc,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


def self_signed_certificate(
    key: rsa.RSAPrivateKey, *, days: int = DEFAULT_VALID_DAYS, now: dt.datetime | None = None
) -> x509.Certificate:
    """An X.509 certificate of ``key``'s public key, signed by ``key`` (SHA-256), valid ``days`` days."""
    start = (now or dt.datetime.now(dt.UTC)) - CLOCK_SKEW
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CLOCK_SKEW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` afresh with ``mode`` from its creation: an old file (or link) is removed first,
    so an old, wider mode is not kept and nothing is written through a symlink."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the umask may have narrowed it: make it exactly this
        file.write(data)
