"""docs/salesforce-setup.md names only commands, flags and variables that exist.

Its `sf` commands are asked for their help by the pinned CLI (offline), its `provisioning` commands
by ours; every flag it names must be in the help of a command it names.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.salesforce_metadata.project import SETUP_DOC, replacement_variables, sf

CLI = str(Path(sys.executable).with_name("provisioning"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def doc_commands(program: str) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(command words, flags) of every ``program ...`` the doc shows, in code blocks or inline."""
    text = SETUP_DOC.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    snippets = re.findall(r"```sh\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`]+)`", prose)
    found = set()
    for snippet in snippets:
        for line in snippet.replace("\\\n", " ").splitlines():
            for match in re.finditer(rf"(?:^|\s){program} (.+)", line):
                tokens = match.group(1).split()
                words = []
                for token in tokens:
                    if not re.fullmatch(r"[a-z][a-z-]*", token):
                        break
                    words.append(token)
                flags = tuple(t.split("=")[0] for t in tokens if t.startswith("--"))
                if words:
                    found.add((tuple(words), flags))
    return found


def standalone_flags() -> set[str]:
    text = re.sub(r"```.*?```", "", SETUP_DOC.read_text(), flags=re.S)
    return {f for snippet in re.findall(r"`(--[^`]+)`", text) for f in FLAG.findall(snippet)}


def test_every_sf_command_and_flag_the_doc_names_exists_in_the_cli(tmp_path):
    commands = doc_commands("sf")
    assert {words for words, _ in commands} >= {
        ("project", "deploy", "start"),
        ("org", "assign", "permset"),
        ("org", "login", "web"),
    }
    helps = {}
    for words, flags in sorted(commands):
        if words not in helps:
            result = sf(*words, "--help", home=tmp_path / "home")
            assert result.returncode == 0, f"sf {' '.join(words)}: {result.stderr}"
            helps[words] = result.stdout
        for flag in flags:
            assert re.search(rf"{flag}\b", helps[words]), f"sf {' '.join(words)} has no {flag}"
    provisioning_helps = {words: provisioning_help(words) for words, _ in doc_commands("provisioning")}
    all_help = "\n".join([*helps.values(), *provisioning_helps.values()])
    for flag in standalone_flags():
        assert re.search(rf"{flag}\b", all_help), f"{flag} is a flag of no command the doc names"


def provisioning_help(words: tuple[str, ...]) -> str:
    result = subprocess.run([CLI, *words, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"provisioning {' '.join(words)}: {result.stderr}"
    return result.stdout


def test_every_provisioning_command_and_flag_the_doc_names_exists():
    commands = doc_commands("provisioning")
    assert (("salesforce", "keys"), ("--out",)) in commands
    assert any(words == ("check",) for words, _ in commands)
    for words, flags in commands:
        help_text = provisioning_help(words)
        for flag in flags:
            assert re.search(rf"{flag}\b", help_text), f"provisioning {' '.join(words)} has no {flag}"


def test_the_doc_names_the_variable_the_deploy_reads_the_certificate_from():
    (variable,) = replacement_variables()
    assert f'{variable}="$(cat ' in SETUP_DOC.read_text()
