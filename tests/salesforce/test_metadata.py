"""The salesforce/ DX project as the service and the sandbox read it (provisioning.salesforce.metadata)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provisioning.core.settings import DEFAULT_ORDER_FIELD_NAMES, DEFAULT_PROVISION_EVENT
from provisioning.salesforce import metadata
from provisioning.salesforce.metadata import MetadataError, load, project

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fast
def test_the_shipped_source_is_the_repository_s_salesforce_project() -> None:
    assert metadata.SOURCE_DIR.resolve() == (ROOT / "salesforce" / "force-app" / "main" / "default").resolve()


@pytest.mark.fast
def test_every_default_field_of_the_settings_is_declared_with_a_type_describe_knows() -> None:
    declared = {name for o in project().objects.values() for name in o.fields}
    assert set(DEFAULT_ORDER_FIELD_NAMES.values()) <= declared
    for sobject in project().objects.values():
        for field in sobject.fields.values():
            assert field.describe_type in {"string", "picklist", "datetime"}, field


@pytest.mark.fast
def test_the_event_its_fields_the_permission_set_and_the_flows_are_read() -> None:
    (event,) = project().events()
    assert event.name == DEFAULT_PROVISION_EVENT
    assert event.fields["OrderId__c"].required
    assert event.fields["IdemKey__c"].length == 80
    access = project().permission_set.field("Order", "WHMCS_Order_ID__c")
    assert access is not None
    assert (access.readable, access.editable) == (True, True)
    assert project().permission_set.objects[DEFAULT_PROVISION_EVENT].read
    assert "ApiEnabled" in project().permission_set.user_permissions
    flows = project().flows
    assert {f.trigger_type for f in flows.values()} == {"RecordBeforeSave", "RecordAfterSave"}
    assert all(f.active and f.object == "Order" for f in flows.values())
    status = project().field("Order", "Activation_Status__c")
    assert status is not None
    assert status.default_value == "Pending"


@pytest.mark.fast
def test_a_directory_without_the_project_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="no Salesforce DX source"):
        load(tmp_path)


def test_a_wheel_built_from_the_checkout_carries_the_project(tmp_path: Path) -> None:
    # A copy of what a build reads (the link kept a link), so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "node_modules")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "celeryconfig.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for name in ("provisioning", "tasks", "salesforce/force-app"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sf_provisioning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "salesforce" / "force-app" / "main" / "default"
    expected = {
        "provisioning/salesforce/sfdx_source/" + str(p.relative_to(source)) for p in source.rglob("*.xml")
    }
    assert expected <= names
