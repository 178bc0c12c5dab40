"""`provisioning salesforce keys`: the JWT bearer flow's key (0600) and the certificate Salesforce holds."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.keys import CERT_FILE_NAME, KEY_FILE_NAME, KeyFilesExist, generate_key_pair

CLI = str(Path(sys.executable).with_name("provisioning"))
LOGIN_URL = "https://example.my.salesforce.com"


def load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "salesforce", "keys", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_key_is_an_unencrypted_rsa_2048_key_the_service_loads(tmp_path):
    pair = generate_key_pair(tmp_path)
    assert pair.key_file == tmp_path / KEY_FILE_NAME
    assert load_key(pair.key_file).key_size == 2048
    # The service's own loader takes it (it raises on anything else).
    JWTBearerAuth(
        login_url=LOGIN_URL,
        client_id="consumer-key",
        username="integration@example.com",
        private_key_file=pair.key_file,
        session=requests.Session(),
    )


def test_the_certificate_is_self_signed_for_that_key_and_valid_for_the_days_asked(tmp_path):
    now = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.UTC)
    pair = generate_key_pair(tmp_path, days=30, now=now)
    cert, key = load_cert(pair.cert_file), load_key(pair.key_file)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # signed by its own key
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == now + dt.timedelta(days=30)
    assert pair.not_valid_after == cert.not_valid_after_utc
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_jwt_signed_with_the_key_verifies_with_the_certificates_public_key(tmp_path):
    pair = generate_key_pair(tmp_path)
    auth = JWTBearerAuth(
        login_url=LOGIN_URL,
        client_id="consumer-key",
        username="integration@example.com",
        private_key_file=pair.key_file,
        session=requests.Session(),
    )
    assertion = auth._assertion()  # what the service sends to Salesforce's token endpoint
    claims = jwt.decode(
        assertion, load_cert(pair.cert_file).public_key(), algorithms=["RS256"], audience=LOGIN_URL
    )
    assert claims["iss"] == "consumer-key"
    assert claims["sub"] == "integration@example.com"
    other = generate_key_pair(tmp_path / "other")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            assertion, load_cert(other.cert_file).public_key(), algorithms=["RS256"], audience=LOGIN_URL
        )


def test_the_key_is_readable_by_its_owner_only_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        pair = generate_key_pair(tmp_path)
    finally:
        os.umask(previous)
    assert mode(pair.key_file) == 0o600
    assert mode(pair.cert_file) == 0o644


def test_existing_files_are_not_overwritten_without_force(tmp_path):
    first = generate_key_pair(tmp_path)
    key_pem, cert_pem = first.key_file.read_bytes(), first.cert_file.read_bytes()
    with pytest.raises(KeyFilesExist) as caught:
        generate_key_pair(tmp_path)
    assert set(caught.value.existing) == {first.key_file, first.cert_file}
    assert "--force" in str(caught.value)
    assert (first.key_file.read_bytes(), first.cert_file.read_bytes()) == (key_pem, cert_pem)
    # The certificate alone is enough to refuse: a key beside someone's certificate would not match it.
    first.key_file.unlink()
    with pytest.raises(KeyFilesExist):
        generate_key_pair(tmp_path)
    assert not first.key_file.exists()


def test_force_replaces_both_with_a_new_pair_and_a_world_readable_old_key_becomes_0600(tmp_path):
    first = generate_key_pair(tmp_path)
    old_key, old_cert = first.key_file.read_bytes(), first.cert_file.read_bytes()
    first.key_file.chmod(0o644)
    second = generate_key_pair(tmp_path, force=True)
    assert second.key_file.read_bytes() != old_key
    assert second.cert_file.read_bytes() != old_cert
    new_key = load_key(second.key_file)
    assert load_cert(second.cert_file).public_key().public_numbers() == new_key.public_key().public_numbers()
    assert mode(second.key_file) == 0o600


def test_a_symlink_in_place_of_the_key_is_replaced_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not a key")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / KEY_FILE_NAME).symlink_to(target)
    with pytest.raises(KeyFilesExist):
        generate_key_pair(tmp_path / "out")
    pair = generate_key_pair(tmp_path / "out", force=True)
    assert target.read_text() == "not a key"
    assert not pair.key_file.is_symlink()


def test_days_outside_one_to_ten_years_are_refused(tmp_path):
    for days in (0, 3651):
        with pytest.raises(ValueError, match="days"):
            generate_key_pair(tmp_path, days=days)
    assert list(tmp_path.iterdir()) == []


# -- the command -----------------------------------------------------------------------------------


def test_the_command_writes_the_pair_and_says_where_each_goes(tmp_path):
    out = tmp_path / "keys"
    result = run_keys("--out", str(out), "--days", "90")
    assert result.returncode == 0, result.stderr
    key_file, cert_file = out / KEY_FILE_NAME, out / CERT_FILE_NAME
    assert mode(key_file) == 0o600
    assert f"SF_PRIVATE_KEY_FILE={key_file.resolve()}" in result.stdout
    assert f'PROVISIONING_JWT_CERTIFICATE="$(cat {cert_file.resolve()})"' in result.stdout
    assert "sf project deploy start --source-dir force-app" in result.stdout
    valid_until = load_cert(cert_file).not_valid_after_utc
    assert f"valid until {valid_until:%Y-%m-%d}" in result.stdout
    assert "BEGIN" not in result.stdout  # it says where the key is, never what it is


def test_the_command_refuses_to_overwrite_and_force_replaces(tmp_path):
    assert run_keys("--out", str(tmp_path)).returncode == 0
    before = (tmp_path / KEY_FILE_NAME).read_bytes()
    refused = run_keys("--out", str(tmp_path))
    assert refused.returncode == 1
    assert "already exist" in refused.stderr
    assert "--force" in refused.stderr
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == before
    forced = run_keys("--out", str(tmp_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / KEY_FILE_NAME).read_bytes() != before


def test_the_command_refuses_days_out_of_range_as_a_usage_error(tmp_path):
    result = run_keys("--out", str(tmp_path), "--days", "0")
    assert result.returncode == 2
    assert "--days" in result.stderr
    assert list(tmp_path.iterdir()) == []
