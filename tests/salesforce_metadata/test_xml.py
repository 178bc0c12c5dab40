"""Every metadata file of salesforce/ is well-formed XML whose root element is its type.

The sf CLI does not check this (it copies most files as they are), and there is no official XSD:
a malformed file would only be refused by the org, at deploy time.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.salesforce_metadata.project import MD, SOURCE, parse

pytestmark = pytest.mark.fast

# File suffix -> the metadata type (the root element) the Metadata API expects in it.
ROOT_BY_SUFFIX = {
    ".object-meta.xml": "CustomObject",
    ".field-meta.xml": "CustomField",
    ".flow-meta.xml": "Flow",
    ".permissionset-meta.xml": "PermissionSet",
    ".eca-meta.xml": "ExternalClientApplication",
    ".ecaOauth-meta.xml": "ExtlClntAppOauthSettings",
    ".ecaGlblOauth-meta.xml": "ExtlClntAppGlobalOauthSettings",
    ".ecaOauthPlcy-meta.xml": "ExtlClntAppOauthConfigurablePolicies",
}
FILES = sorted(p for p in SOURCE.rglob("*") if p.is_file())


def test_the_project_holds_only_files_of_the_types_it_is_made_of():
    assert FILES
    unknown = [p for p in FILES if not p.name.endswith(tuple(ROOT_BY_SUFFIX))]
    assert unknown == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_every_file_is_well_formed_and_its_root_element_is_its_type(path):
    suffix = next(s for s in ROOT_BY_SUFFIX if path.name.endswith(s))
    assert parse(path).tag == MD + ROOT_BY_SUFFIX[suffix]


def test_a_malformed_file_would_be_caught(tmp_path):
    broken = tmp_path / "Broken.flow-meta.xml"
    broken.write_text(
        (SOURCE / "flows" / "Order_SetActivatingOnApproval.flow-meta.xml").read_text().replace("</start>", "")
    )
    with pytest.raises(ET.ParseError):
        parse(broken)
