"""Nothing secret is, or would be, committed under salesforce/: no key, no certificate, no consumer secret.

The External Client App's certificate is a placeholder that the deploy replaces from the
environment (sfdx-project.json's "replacements"); the org makes the consumer key and secret.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.salesforce_metadata.project import ROOT, SF_PROJECT, SOURCE, child, parse, replacement_variables

pytestmark = pytest.mark.fast

SECRET_SUFFIXES = (".key", ".pem", ".crt", ".cer", ".der", ".p12", ".pfx", ".jks", ".keystore")
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
SECRET_ELEMENTS = re.compile(r"<(consumerKey|consumerSecret|privateKey|password|clientSecret)>", re.I)
# A base64 run as long as a certificate or key body (a 2048-bit key's PEM line count times 64).
LONG_BASE64 = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


def files_git_would_commit() -> list[str]:
    """Tracked files under salesforce/ and the untracked ones .gitignore does not exclude."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "salesforce"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed, "git lists no file under salesforce/"
    return listed


def test_no_file_under_salesforce_holds_a_pem_block_a_consumer_secret_or_a_key():
    for name in files_git_would_commit():
        assert not name.lower().endswith(SECRET_SUFFIXES), name
        text = (ROOT / name).read_text(errors="replace")
        assert not PEM_BLOCK.search(text), name
        assert not SECRET_ELEMENTS.search(text), name
        if not name.endswith("package-lock.json"):  # its integrity hashes are base64 of hashes
            assert not LONG_BASE64.search(text), name


def test_node_modules_is_never_committed():
    assert not [n for n in files_git_would_commit() if "node_modules/" in n]


def test_the_certificate_is_a_placeholder_that_the_deploy_replaces_from_the_environment():
    project = json.loads((SF_PROJECT / "sfdx-project.json").read_text())
    (global_oauth,) = (SOURCE / "extlClntAppGlobalOauthSets").glob("*.ecaGlblOauth-meta.xml")
    (replacement,) = [
        r for r in project["replacements"] if global_oauth.as_posix().endswith(r.get("filename", "\0"))
    ]
    assert replacement["replaceWithEnv"] in replacement_variables()
    assert child(parse(global_oauth), "certificate") == replacement["stringToReplace"]
    assert not replacement.get("allowUnsetEnvVariable"), "a deploy without the certificate must stop"
