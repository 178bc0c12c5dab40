"""The integration user's permission set grants what the service's code reads and writes, and no more.

What is read comes from the service's one SOQL query (built by the real client), what is written
from its ``field_names.patch(...)`` calls; the External Client App pre-authorizes this permission set.
"""

from __future__ import annotations

import pytest

from provisioning.core.settings import DEFAULT_ORDER_FIELD_NAMES, DEFAULT_PROVISION_EVENT
from tests.salesforce_metadata.project import (
    SOURCE,
    child,
    children,
    fields_read,
    logical_fields_written,
    parse,
    service_soql,
)

pytestmark = pytest.mark.fast

PERMISSION_SET = "Provisioning_Integration"
# Fields without field-level security (Ids, required and system fields, a Contact's name parts):
# readable by whoever reads the object, and refused in a permission set's fieldPermissions.
ALWAYS_READABLE = {
    ("Order", "Id"),
    ("Order", "OrderNumber"),
    ("Order", "AccountId"),
    ("Contact", "FirstName"),
    ("OrderItem", "Quantity"),
    ("OrderItem", "Product2Id"),
}


def permission_set():
    return parse(SOURCE / "permissionsets" / f"{PERMISSION_SET}.permissionset-meta.xml")


def object_permissions() -> dict[str, dict[str, bool]]:
    return {
        child(o, "object") or "": {
            e.tag.split("}")[1]: e.text == "true" for e in o if e.tag.split("}")[1] != "object"
        }
        for o in children(permission_set(), "objectPermissions")
    }


def field_permissions() -> dict[tuple[str, str], dict[str, bool]]:
    out: dict[tuple[str, str], dict[str, bool]] = {}
    for f in children(permission_set(), "fieldPermissions"):
        sobject, _, field = (child(f, "field") or "").partition(".")
        out[(sobject, field)] = {
            "readable": child(f, "readable") == "true",
            "editable": child(f, "editable") == "true",
        }
    return out


def written() -> set[tuple[str, str]]:
    return {("Order", DEFAULT_ORDER_FIELD_NAMES[name]) for name in logical_fields_written()}


def test_it_grants_read_on_every_object_the_query_reads_and_edit_on_the_order_only():
    objects = object_permissions()
    read_objects = {sobject for sobject, _ in fields_read(service_soql())}
    assert read_objects == {"Order", "Account", "Contact", "OrderItem", "Product2"}
    for sobject in read_objects:
        assert objects[sobject]["allowRead"], sobject
        # Sharing must hide no Order (nor its Account, Contact, items, products) from the service.
        assert objects[sobject]["viewAllRecords"], sobject
    assert {s for s, p in objects.items() if p["allowEdit"]} == {"Order"}
    for sobject, perms in objects.items():
        granted = {name for name in ("allowCreate", "allowDelete", "modifyAllRecords") if perms[name]}
        assert granted == set(), sobject


def test_it_grants_read_on_the_platform_event_so_the_listener_may_subscribe():
    assert object_permissions()[DEFAULT_PROVISION_EVENT]["allowRead"]


def test_every_field_the_query_reads_is_readable_and_every_field_the_service_writes_is_editable():
    fields = field_permissions()
    for key in sorted(fields_read(service_soql()) - ALWAYS_READABLE):
        assert fields.get(key, {}).get("readable"), f"{key} is read by the service's query"
    assert written(), "no field_names.patch(...) call found"
    for key in sorted(written()):
        assert fields.get(key) == {"readable": True, "editable": True}, f"{key} is written by the service"


def test_it_grants_nothing_on_fields_the_service_neither_reads_nor_writes():
    needed = fields_read(service_soql()) | written()
    fields = field_permissions()
    assert set(fields) <= needed, set(fields) - needed
    for key, perms in fields.items():
        assert perms["editable"] == (key in written()), key


def test_the_user_may_use_the_api():
    enabled = {
        child(p, "name"): child(p, "enabled") == "true" for p in children(permission_set(), "userPermissions")
    }
    assert enabled == {"ApiEnabled": True}


def test_the_external_client_app_pre_authorizes_the_users_of_this_permission_set_only():
    (policy_file,) = (SOURCE / "extlClntAppOauthPolicies").glob("*.ecaOauthPlcy-meta.xml")
    policy = parse(policy_file)
    assert child(policy, "permittedUsersPolicyType") == "AdminApprovedPreAuthorized"
    assert child(policy, "commaSeparatedPermissionSet") == PERMISSION_SET
    assert child(policy, "isClientCredentialsFlowEnabled") == "false"
    (app_file,) = (SOURCE / "externalClientApps").glob("*.eca-meta.xml")
    app_name = app_file.name.removesuffix(".eca-meta.xml")
    assert child(policy, "externalClientApplication") == app_name
    (settings_file,) = (SOURCE / "extlClntAppOauthSettings").glob("*.ecaOauth-meta.xml")
    settings = parse(settings_file)
    assert child(settings, "externalClientApplication") == app_name
    # The JWT bearer flow needs the api scope (REST and the Pub/Sub API); nothing more is asked for.
    assert child(settings, "commaSeparatedOauthScopes") == "Api"
