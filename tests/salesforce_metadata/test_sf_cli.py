"""The pinned sf CLI resolves salesforce/ offline, as a deploy would, and reaches for nothing doing so.

`sf project convert source` maps every file to its metadata type by folder and suffix and fails on
malformed XML (there is no official XSD; only a deploy to an org checks element names). Each run is
in a network namespace of its own with HOME and TMPDIR in a temporary directory (project.run_offline).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.core.settings import DEFAULT_ORDER_FIELD_NAMES, DEFAULT_PROVISION_EVENT
from provisioning.salesforce.keys import generate_key_pair
from tests.salesforce_metadata.project import (
    SF_BIN,
    SF_PROJECT,
    SOURCE,
    child,
    doc_field_rows,
    parse,
    replacement_variables,
    run_offline,
    sf,
    sf_json,
)

TRACER = Path(__file__).with_name("trace_reach.cjs")
# Folder under force-app/main/default -> the metadata type `sf` must resolve its files to.
TYPES_BY_FOLDER = {
    "flows": "Flow",
    "permissionsets": "PermissionSet",
    "externalClientApps": "ExternalClientApplication",
    "extlClntAppOauthSettings": "ExtlClntAppOauthSettings",
    "extlClntAppGlobalOauthSets": "ExtlClntAppGlobalOauthSettings",
    "extlClntAppOauthPolicies": "ExtlClntAppOauthConfigurablePolicies",
}
PACKAGE_NS = "{http://soap.sforce.com/2006/04/metadata}"


def convert(home: Path, out: Path, **env: str) -> dict[str, object]:
    return sf_json(
        "project",
        "convert",
        "source",
        "--source-dir",
        "force-app",
        "--output-dir",
        str(out),
        home=home,
        **env,
    )


def package_members(package_xml: Path) -> dict[str, set[str]]:
    root = ET.parse(package_xml).getroot()  # noqa: S314 (the CLI's output from our own files)
    return {
        t.findtext(PACKAGE_NS + "name") or "": {m.text or "" for m in t.findall(PACKAGE_NS + "members")}
        for t in root.findall(PACKAGE_NS + "types")
    }


def expected_members() -> dict[str, set[str]]:
    """What the source tree holds, by type: the members a conversion must list, no more, no fewer."""
    expected: dict[str, set[str]] = {"CustomObject": set(), "CustomField": set()}
    for folder, type_name in TYPES_BY_FOLDER.items():
        expected[type_name] = {p.name.split(".")[0] for p in (SOURCE / folder).glob("*-meta.xml")}
    for obj_dir in (SOURCE / "objects").iterdir():
        if (obj_dir / f"{obj_dir.name}.object-meta.xml").exists():
            expected["CustomObject"].add(obj_dir.name)
        expected["CustomField"] |= {
            f"{obj_dir.name}.{p.name.removesuffix('.field-meta.xml')}"
            for p in (obj_dir / "fields").glob("*.xml")
        }
    return expected


def test_the_cli_converts_the_project_and_its_package_lists_every_component(tmp_path):
    answer = convert(tmp_path / "home", tmp_path / "mdapi")
    assert answer["status"] == 0, answer
    members = package_members(tmp_path / "mdapi" / "package.xml")
    assert members == expected_members()
    # What the service needs is among them (so the comparison above cannot pass on an empty tree).
    assert DEFAULT_PROVISION_EVENT in members["CustomObject"]
    assert {f"{DEFAULT_PROVISION_EVENT}.OrderId__c", f"{DEFAULT_PROVISION_EVENT}.IdemKey__c"} <= members[
        "CustomField"
    ]
    assert {f"{row.sobject}.{row.field}" for row in doc_field_rows()} <= members["CustomField"]
    assert f"Order.{DEFAULT_ORDER_FIELD_NAMES['activation_status']}" in members["CustomField"]
    assert members["Flow"] == {
        "Order_SetActivatingOnApproval",
        "Order_PublishProvisionRequest",
        "Order_PublishCancelRequest",
    }
    assert members["PermissionSet"] == {"Provisioning_Integration"}
    assert members["ExternalClientApplication"] == {"Provisioning_Service"}
    version = ET.parse(tmp_path / "mdapi" / "package.xml").getroot().findtext(PACKAGE_NS + "version")  # noqa: S314
    assert version == json.loads((SF_PROJECT / "sfdx-project.json").read_text())["sourceApiVersion"]


def test_the_cli_refuses_a_file_it_cannot_place_as_a_metadata_type(tmp_path):
    # The control for the test above: a misspelt suffix is an error, not a file left out.
    project = tmp_path / "project"
    (project / "force-app" / "main" / "default" / "flows").mkdir(parents=True)
    (project / "sfdx-project.json").write_text(
        json.dumps(
            {"packageDirectories": [{"path": "force-app", "default": True}], "sourceApiVersion": "64.0"}
        )
    )
    flow = SOURCE / "flows" / "Order_SetActivatingOnApproval.flow-meta.xml"
    (project / "force-app" / "main" / "default" / "flows" / "Misspelt.flw-meta.xml").write_text(
        flow.read_text()
    )
    result = run_offline(
        [
            str(SF_BIN),
            "project",
            "convert",
            "source",
            "--source-dir",
            "force-app",
            "--output-dir",
            "out",
            "--json",
        ],
        home=tmp_path / "home",
        cwd=project,
    )
    assert result.returncode != 0
    answer = json.loads(result.stdout)
    assert answer["name"] == "TypeInferenceError"
    assert "Misspelt.flw-meta.xml" in answer["message"]


def test_each_converted_files_root_element_is_the_type_the_cli_resolved_it_to(tmp_path):
    # The CLI copies most files as they are (it does not check their XML): our root elements must
    # name the types it resolved them to, or the org would refuse them.
    assert convert(tmp_path / "home", tmp_path / "mdapi")["status"] == 0
    by_folder = {**TYPES_BY_FOLDER, "objects": "CustomObject"}
    converted = [p for p in (tmp_path / "mdapi").rglob("*") if p.is_file() and p.name != "package.xml"]
    assert len(converted) >= len(by_folder)
    for path in converted:
        assert parse(path).tag == PACKAGE_NS + by_folder[path.parent.name], path


def test_the_deploy_puts_the_certificate_from_the_environment_into_the_external_client_app(tmp_path):
    pair = generate_key_pair(tmp_path / "keys", days=30)
    pem = pair.cert_file.read_text()
    (variable,) = replacement_variables()
    # A deploy applies sfdx-project.json's replacements as it zips; this switch makes a conversion do so.
    answer = convert(
        tmp_path / "home", tmp_path / "mdapi", SF_APPLY_REPLACEMENTS_ON_CONVERT="true", **{variable: pem}
    )
    assert answer["status"] == 0, answer
    (converted,) = (tmp_path / "mdapi" / "extlClntAppGlobalOauthSets").glob("*.ecaGlblOauth")
    certificate = child(parse(converted), "certificate") or ""
    assert certificate.strip() == pem.strip()
    assert x509.load_pem_x509_certificate(certificate.encode()) == x509.load_pem_x509_certificate(
        pem.encode()
    )
    # The repository's file is untouched.
    (source,) = (SOURCE / "extlClntAppGlobalOauthSets").glob("*.ecaGlblOauth-meta.xml")
    assert "BEGIN CERTIFICATE" not in source.read_text()


def test_a_deploy_without_the_certificate_stops_and_names_the_variable(tmp_path):
    (variable,) = replacement_variables()
    answer = convert(tmp_path / "home", tmp_path / "mdapi", SF_APPLY_REPLACEMENTS_ON_CONVERT="true")
    assert answer["status"] != 0
    assert variable in str(answer.get("message"))


def test_the_cli_starts_no_process_reaches_no_host_and_leaves_nothing_behind(tmp_path):
    home, trace = tmp_path / "home", tmp_path / "reach.jsonl"
    before = {p for p in SF_PROJECT.iterdir() if p.name != "node_modules"}
    result = sf(
        "project",
        "convert",
        "source",
        "--source-dir",
        "force-app",
        "--output-dir",
        str(tmp_path / "mdapi"),
        home=home,
        NODE_OPTIONS=f"--require {TRACER}",
        TRACE_REACH_FILE=str(trace),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mdapi" / "package.xml").exists()
    reached = trace.read_text().splitlines() if trace.exists() else []
    assert reached == [], "the CLI started a process or looked up a host:\n" + "\n".join(reached)
    left = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert left == ["tmp"], left
    assert {p for p in SF_PROJECT.iterdir() if p.name != "node_modules"} == before


def test_the_reach_tracer_sees_what_the_cli_does_without_its_switches(tmp_path):
    # Without SF_SKIP_NEW_VERSION_CHECK the CLI looks up its latest version: the tracer must see that,
    # or the test above proves nothing. (No network here: the look-up fails, as the tracer records it.)
    trace = tmp_path / "reach.jsonl"
    result = sf(
        "--version",
        home=tmp_path / "home",
        NODE_OPTIONS=f"--require {TRACER}",
        TRACE_REACH_FILE=str(trace),
        SF_SKIP_NEW_VERSION_CHECK="false",
    )
    assert result.returncode == 0, result.stderr
    assert "get-version" in trace.read_text()


@pytest.mark.parametrize("command", [["project", "convert", "source"], ["project", "deploy", "start"]])
def test_the_pinned_cli_runs_on_this_machines_node(tmp_path, command):
    result = sf(*command, "--help", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "--source-dir" in result.stdout
