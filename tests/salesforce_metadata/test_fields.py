"""The fields the service reads and writes exist in salesforce/ with the types the setup doc names.

The names come from the settings' defaults, the types from docs/salesforce-setup.md's table, what
is read and written from the service's own SOQL query and PATCH calls: nothing is listed twice.
"""

from __future__ import annotations

import ast

import pytest

from provisioning.core.settings import DEFAULT_ORDER_FIELD_NAMES, Settings
from tests.salesforce_metadata.project import (
    MD,
    SOURCE,
    FieldDefinition,
    child,
    children,
    doc_field_rows,
    field_file,
    fields_read,
    logical_fields_written,
    parse,
    patch_calls,
    service_soql,
)

pytestmark = pytest.mark.fast

FIELD_SETTINGS = sorted(name for name in Settings.model_fields if name.startswith("sf_field_"))


def test_the_setup_doc_has_one_row_per_sf_field_setting_naming_its_default():
    rows = {row.setting: row for row in doc_field_rows()}
    assert set(rows) == {name.upper() for name in FIELD_SETTINGS}
    for name in FIELD_SETTINGS:
        assert rows[name.upper()].field == Settings.model_fields[name].default, name


def test_each_settings_description_names_the_object_the_doc_puts_its_field_on():
    # The README's configuration table shows these descriptions ("Order field: ...").
    for row in doc_field_rows():
        description = Settings.model_fields[row.setting.lower()].description or ""
        assert description.startswith(f"{row.sobject} field"), (row.setting, description)


@pytest.mark.parametrize("row", doc_field_rows(), ids=lambda row: row.setting)
def test_every_field_a_setting_names_is_in_the_project_with_the_type_the_doc_names(row):
    path = field_file(row.sobject, row.field)
    assert path.exists(), f"{row.setting}'s default {row.sobject}.{row.field} has no file {path}"
    field = FieldDefinition.load(path)
    expected_type, expected_length, expected_values = row.expected()
    assert field.name == row.field
    assert field.type == expected_type, row.field
    assert field.length == expected_length, row.field
    assert field.picklist_values == expected_values, row.field
    assert not field.required, f"{row.field}: a required field would refuse Orders saved without it"


def test_the_project_adds_no_field_to_order_account_or_product2_that_the_table_leaves_out():
    documented = {(row.sobject, row.field) for row in doc_field_rows()}
    in_project = {
        (path.parent.parent.name, path.name.removesuffix(".field-meta.xml"))
        for sobject in ("Order", "Account", "Product2")
        for path in (SOURCE / "objects" / sobject / "fields").glob("*.field-meta.xml")
    }
    assert in_project == documented


def test_the_doc_says_which_fields_the_services_query_reads_and_its_patches_write():
    read = fields_read(service_soql())
    written = {DEFAULT_ORDER_FIELD_NAMES[name] for name in logical_fields_written()}
    assert "Activation_Status__c" in written, "no field_names.patch(...) call found: the AST walk is broken"
    for row in doc_field_rows():
        assert row.reads == ((row.sobject, row.field) in read), f"{row.field}: the doc says reads={row.reads}"
        assert row.writes == (row.sobject == "Order" and row.field in written), (
            f"{row.field}: the doc says writes={row.writes}"
        )


def _activation_statuses_the_code_writes() -> set[str]:
    return {
        k.value.value
        for call in patch_calls()
        for k in call.keywords
        if k.arg == "activation_status"
        and isinstance(k.value, ast.Constant)
        and isinstance(k.value.value, str)
    }


def test_every_activation_status_the_service_or_the_flow_sets_is_a_value_of_the_picklist():
    picklist = FieldDefinition.load(field_file("Order", DEFAULT_ORDER_FIELD_NAMES["activation_status"]))
    flow = parse(SOURCE / "flows" / "Order_SetActivatingOnApproval.flow-meta.xml")
    set_by_flow = {
        child(item.find(MD + "value"), "stringValue")
        for assignment in children(flow, "assignments")
        for item in children(assignment, "assignmentItems")
        if child(item, "assignToReference") == "$Record.Activation_Status__c"
    }
    set_by_code = _activation_statuses_the_code_writes()
    assert set_by_code >= {"Activated", "Failed", "Activating"}, set_by_code
    assert set_by_flow == {"Activating"}
    assert (set_by_code | set_by_flow) <= set(picklist.picklist_values)
