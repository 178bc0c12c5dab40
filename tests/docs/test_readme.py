"""The docs say what the code does: every variable, command and make target they name exists."""

import re
import subprocess
import sys
from pathlib import Path

from provisioning.core.settings import Settings
from tests.salesforce_metadata.project import SF_CLI_ENV, replacement_variables

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = str(Path(sys.executable).with_name("provisioning"))


def test_the_readme_configuration_table_lists_exactly_the_settings():
    text = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, flags=re.M))
    assert table == {name.upper() for name in Settings.model_fields}


def test_the_readme_starts_with_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_make_target_the_docs_name_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    named = {t for doc in DOCS for t in re.findall(r"`make ([a-z-]+)`", doc.read_text())}
    assert named, "the docs name no make target"
    assert named <= targets, named - targets


def test_every_provisioning_subcommand_the_docs_name_exists():
    help_text = subprocess.run([CLI, "--help"], capture_output=True, text=True, check=True).stdout
    commands = set(re.findall(r"^  ([a-z-]+)\s", help_text, flags=re.M))
    named = {c for doc in DOCS for c in re.findall(r"`provisioning ([a-z-]+)", doc.read_text())}
    assert named <= commands, named - commands


def test_every_environment_variable_the_docs_name_exists():
    known = (
        {name.upper() for name in Settings.model_fields}
        | {
            "PROVISIONING_ENV_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "FLOWER_UNAUTHENTICATED_API",
            "CI",
            # The sf CLI's own: its switches the metadata tests set, and the conversion's replacements switch.
            *SF_CLI_ENV,
            "SF_APPLY_REPLACEMENTS_ON_CONVERT",
        }
        # The deploy reads these (salesforce/sfdx-project.json's replacements).
        | replacement_variables()
    )
    pattern = re.compile(
        r"`((?:SF|WHMCS|SMDP|SMTP|CELERY|REDIS|LEDGER|RUN|TASK|EMAIL|TLS|LOG|LISTENER|RECONCILE|ESIM|PROVISIONING|CONSOLE|METRICS|WORKER)_[A-Z0-9_]+)`"
    )
    named = {v for doc in DOCS for v in pattern.findall(doc.read_text())}
    wildcard = {v for v in named if v.endswith("_")}
    assert (named - wildcard) <= known, (named - wildcard) - known
