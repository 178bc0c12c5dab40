"""The salesforce/ DX project as the tests see it: its files, its XML, the field table of
docs/salesforce-setup.md, what the service's code reads and writes, and the sf CLI run offline.

Everything the tests compare comes from one place each: the field names from the settings, their
types from the doc's table, what is read from the service's own SOQL query, what is written from the
service's own ``field_names.patch(...)`` calls, and the metadata from the XML files.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from provisioning.salesforce.client import OrderFieldNames, SalesforceClient

ROOT = Path(__file__).resolve().parents[2]
SF_PROJECT = ROOT / "salesforce"
SOURCE = SF_PROJECT / "force-app" / "main" / "default"
SETUP_DOC = ROOT / "docs" / "salesforce-setup.md"
NODE_MODULES = SF_PROJECT / "node_modules"
SF_BIN = NODE_MODULES / ".bin" / "sf"
SCAN_FLOWS = SF_PROJECT / "scripts" / "scan-flows.cjs"
MD = "{http://soap.sforce.com/2006/04/metadata}"
# Any syntactically valid Order Id: the query is only built, never sent.
SOME_ORDER_ID = "8015g00000ABCDEAA5"

# The sf CLI's own switches for a run that reaches for nothing: no telemetry upload, no update
# (the update hook reads SF_DISABLE_AUTOUPDATE; SF_AUTOUPDATE_DISABLE is the older name the CLI
# also reads), no "new version available" look-up, no log file.
SF_CLI_ENV = {
    "SF_DISABLE_TELEMETRY": "true",
    "SF_DISABLE_AUTOUPDATE": "true",
    "SF_AUTOUPDATE_DISABLE": "true",
    "SF_SKIP_NEW_VERSION_CHECK": "true",
    "SF_DISABLE_LOG_FILE": "true",
}
# Relationship names of the service's SOQL query and the objects (and lookup fields) behind them.
RELATIONSHIPS = {
    ("Order", "Account"): ("Account", "AccountId"),
    ("Order", "BillToContact"): ("Contact", "BillToContactId"),
    ("Order", "OrderItems"): ("OrderItem", None),
    ("OrderItem", "Product2"): ("Product2", "Product2Id"),
}


# -- the XML ---------------------------------------------------------------------------------------


def parse(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()  # noqa: S314 (the project's own files)
    assert root.tag.startswith(MD), f"{path}: not in the Metadata API namespace ({root.tag})"
    return root


def child(element: ET.Element, tag: str) -> str | None:
    found = element.find(MD + tag)
    return None if found is None else (found.text or "")


def children(element: ET.Element, tag: str) -> list[ET.Element]:
    return element.findall(MD + tag)


def field_file(sobject: str, field: str) -> Path:
    return SOURCE / "objects" / sobject / "fields" / f"{field}.field-meta.xml"


@dataclass(frozen=True)
class FieldDefinition:
    """A CustomField file, as the tests compare it."""

    sobject: str
    name: str
    type: str
    length: int | None
    required: bool
    picklist_values: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> FieldDefinition:
        root = parse(path)
        values = tuple(
            child(v, "fullName") or "" for v in root.iter(MD + "value") if v.find(MD + "fullName") is not None
        )
        length = child(root, "length")
        return cls(
            sobject=path.parent.parent.name,
            name=child(root, "fullName") or "",
            type=child(root, "type") or "",
            length=int(length) if length else None,
            required=child(root, "required") == "true",
            picklist_values=values,
        )


# -- the doc's field table -------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRow:
    """One row of docs/salesforce-setup.md's field table."""

    setting: str
    sobject: str
    field: str
    type: str
    reads: bool
    writes: bool

    def expected(self) -> tuple[str, int | None, tuple[str, ...]]:
        """(metadata type, length, picklist values) the row's type names: Text(32), Picklist: a, b, Date/Time."""
        if match := re.fullmatch(r"Text\((\d+)\)", self.type):
            return "Text", int(match.group(1)), ()
        if self.type.startswith("Picklist: "):
            return "Picklist", None, tuple(v.strip() for v in self.type.removeprefix("Picklist: ").split(","))
        if self.type == "Date/Time":
            return "DateTime", None, ()
        raise AssertionError(f"the doc's type {self.type!r} of {self.field} is none the tests know")


def doc_field_rows() -> list[FieldRow]:
    text = SETUP_DOC.read_text()
    header = "| setting | object | field | type | the service |"
    assert header in text, f"{SETUP_DOC} has no field table ({header})"
    rows: list[FieldRow] = []
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        setting, sobject, field, type_, service = (c.strip() for c in line.strip("|").split("|"))
        rows.append(
            FieldRow(
                setting=setting.strip("`"),
                sobject=sobject,
                field=field.strip("`"),
                type=type_,
                reads="reads" in service,
                writes="writes" in service,
            )
        )
    return rows


# -- what the service's code reads and writes ------------------------------------------------------


@functools.cache
def service_soql() -> str:
    """The one SOQL query the workers send for an Order, built by the real client."""
    # Building the query needs only the field names: no login, no pool, nothing is sent.
    client = SalesforceClient(auth=None, session=None)  # type: ignore[arg-type]
    return client.order_query(SOME_ORDER_ID)


def fields_read(soql: str) -> set[tuple[str, str]]:
    """(object, field) of every column of ``soql`` (and the lookup fields its relationships follow)."""
    read: set[tuple[str, str]] = set()

    def columns(select: str, sobject: str) -> None:
        for column in (c.strip() for c in select.split(",")):
            *path, field = column.split(".")
            current = sobject
            for relationship in path:
                current, lookup = relationship_of(current, relationship)
                if lookup:
                    read.add((sobject, lookup))
            read.add((current, field))

    subquery = re.search(r"\(SELECT (.+?) FROM (\w+)\)", soql)
    assert subquery, soql
    child_object, _ = relationship_of("Order", subquery.group(2))
    columns(subquery.group(1), child_object)
    outer = re.fullmatch(r"SELECT (.+) FROM Order WHERE .+", soql.replace(subquery.group(0), ""))
    assert outer, soql
    columns(outer.group(1).rstrip(", "), "Order")
    return read


def relationship_of(sobject: str, relationship: str) -> tuple[str, str | None]:
    assert (sobject, relationship) in RELATIONSHIPS, f"the tests do not know {sobject}.{relationship}"
    return RELATIONSHIPS[(sobject, relationship)]


@functools.cache
def provisioning_syntax_trees() -> tuple[ast.Module, ...]:
    """Every module of provisioning/, parsed (not imported)."""
    return tuple(
        ast.parse(path.read_text(), filename=str(path))
        for path in sorted((ROOT / "provisioning").rglob("*.py"))
    )


def patch_calls() -> list[ast.Call]:
    """Every call of a ``.patch(...)`` whose keywords are all logical Order field names."""
    known = set(OrderFieldNames.__dataclass_fields__)
    return [
        node
        for tree in provisioning_syntax_trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "patch"
        and node.keywords
        and all(k.arg in known for k in node.keywords)
    ]


def logical_fields_written() -> set[str]:
    """The logical Order field names of every ``field_names.patch(...)`` call in provisioning/."""
    return {k.arg for call in patch_calls() for k in call.keywords if k.arg}


# -- the sf CLI and node, offline ------------------------------------------------------------------


def require_tools() -> None:
    assert shutil.which("node"), "node is not installed (the machine's Node.js 20 runs the checks)"
    assert SF_BIN.exists(), f"{SF_BIN} is missing: run `make salesforce-tools` (npm ci in salesforce/)"


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for the sf CLI: its switches off, HOME and TMPDIR in ``home``, nothing else of ours."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "LANG": "C.UTF-8",
        **SF_CLI_ENV,
    }
    env.update(extra)
    return env


def run_offline(
    argv: list[str], *, home: Path, cwd: Path = SF_PROJECT, timeout: float = 180.0, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a network namespace of its own (no interface but a downed loopback)."""
    require_tools()
    assert shutil.which("unshare"), "unshare (util-linux) is needed to run the checks without a network"
    return subprocess.run(
        ["unshare", "--net", "--", *argv],
        cwd=cwd,
        env=offline_env(home, **extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def sf(*args: str, home: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return run_offline([str(SF_BIN), *args], home=home, **extra_env)


def sf_json(*args: str, home: Path, **extra_env: str) -> dict[str, object]:
    """``sf ... --json``: its JSON answer (stdout), whatever its exit code."""
    result = sf(*args, "--json", home=home, **extra_env)
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(
            f"sf {' '.join(args)} printed no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        ) from None
    assert isinstance(answer, dict)
    return answer


def replacement_variables() -> set[str]:
    """The environment variables sfdx-project.json's replacements read at deploy time."""
    project = json.loads((SF_PROJECT / "sfdx-project.json").read_text())
    return {r["replaceWithEnv"] for r in project.get("replacements", []) if "replaceWithEnv" in r}
