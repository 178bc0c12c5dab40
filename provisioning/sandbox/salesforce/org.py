"""The simulated org's setup: what is deployed and what the integration user may do with it.

As deployed from ``salesforce/`` (:mod:`provisioning.salesforce.metadata`): every custom field,
the Platform Event, both flows active, and the permission set assigned to the integration user,
which decides what it may read and edit. The knobs (:class:`OrgKnobs`, the admin route
``/__admin/org``) take pieces away, as a half-done deploy would: a field removed, a field the user
may not read or edit, an object it may not read (the event: it cannot subscribe), a flow left
inactive. Everything the sandbox answers about the org goes through :class:`OrgSetup`: describe,
the queries' columns, a PATCH's fields, the Tooling API's flows, the event's subscribers.

Field-level security as on Salesforce: custom fields, and the standard fields the permission
set names (``Order.BillToContactId``, ``Contact.Email``), are read and edited only as it grants;
other standard fields, and a Platform Event's fields, go with their object. A field the user may not read is not in describe and
is "No such column" to a query or a PATCH; an object it may not read is NOT_FOUND to describe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from provisioning.salesforce.metadata import FlowDecl, PermissionSetDecl, Project, project
from provisioning.sandbox.salesforce import ids
from provisioning.sandbox.salesforce.model import OBJECT_FIELDS, ApiError, FieldSpec

KNOB_NAMES = (
    "removed_fields",
    "unreadable_fields",
    "read_only_fields",
    "unreadable_objects",
    "inactive_flows",
)
# Key prefixes of the Tooling API's flow records (FlowDefinition 300, Flow 301).
PREFIX_FLOW_DEFINITION = "300"
PREFIX_FLOW = "301"
_TOOLING_QUERY = re.compile(
    r"\s*SELECT\s+(?P<columns>[\w\s,]+?)\s+FROM\s+(?P<object>\w+)"
    r"(?:\s+WHERE\s+(?P<field>\w+)\s*(?:=\s*'(?P<one>[^']*)'|IN\s*\((?P<many>[^)]*)\)))?\s*",
    re.IGNORECASE,
)
# The Tooling API objects the sandbox answers, the name field of each, and their columns.
_FLOW_OBJECTS = {
    "FlowDefinition": (
        "DeveloperName",
        ("Id", "DeveloperName", "MasterLabel", "ActiveVersionId", "LatestVersionId"),
    ),
    "FlowDefinitionView": (
        "ApiName",
        (
            "Id",
            "DurableId",
            "ApiName",
            "Label",
            "ActiveVersionId",
            "LatestVersionId",
            "IsActive",
            "ProcessType",
        ),
    ),
}


@dataclass(frozen=True)
class OrgKnobs:
    """What the org lacks compared with the project; names are ``Object.Field``, objects, flows."""

    removed_fields: frozenset[str] = frozenset()
    unreadable_fields: frozenset[str] = frozenset()
    read_only_fields: frozenset[str] = frozenset()
    unreadable_objects: frozenset[str] = frozenset()
    inactive_flows: frozenset[str] = frozenset()

    def as_json(self) -> dict[str, list[str]]:
        return {name: sorted(getattr(self, name)) for name in KNOB_NAMES}


@dataclass
class OrgSetup:
    """The org's objects, fields, permissions and flows, with the knobs applied."""

    metadata: Project = field(default_factory=project)
    knobs: OrgKnobs = field(default_factory=OrgKnobs)

    @property
    def permission_set(self) -> PermissionSetDecl:
        return self.metadata.permission_set

    # -- the knobs ----------------------------------------------------------------------------

    def configure(self, body: Any) -> None:
        """Replace the knobs ``body`` names (lists); ValueError for an unknown name."""
        if not isinstance(body, dict) or set(body) - set(KNOB_NAMES):
            raise ValueError(f"expected an object with any of {list(KNOB_NAMES)}, each a list of names")
        changes: dict[str, frozenset[str]] = {}
        for name, value in body.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} is a list of names")
            known = self._known(name)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; known: {sorted(known)}")
            changes[name] = frozenset(value)
        self.knobs = replace(self.knobs, **changes)

    def _known(self, knob: str) -> set[str]:
        if knob == "inactive_flows":
            return set(self.metadata.flows)
        if knob == "unreadable_objects":
            return set(OBJECT_FIELDS)
        return {f"{obj}.{name}" for obj, specs in OBJECT_FIELDS.items() for name in specs if name != "Id"}

    # -- fields and objects -------------------------------------------------------------------

    def exists(self, sobject: str, name: str) -> bool:
        return name in OBJECT_FIELDS.get(sobject, {}) and f"{sobject}.{name}" not in self.knobs.removed_fields

    def object_readable(self, sobject: str) -> bool:
        access = self.permission_set.objects.get(sobject)
        return access is not None and access.read and sobject not in self.knobs.unreadable_objects

    def object_editable(self, sobject: str) -> bool:
        access = self.permission_set.objects.get(sobject)
        return self.object_readable(sobject) and access is not None and access.edit

    def _secured(self, sobject: str, name: str) -> bool:
        """Under field-level security: a custom field, or a standard one the permission set names.

        A Platform Event's fields have none: read on the event reads them all.
        """
        if sobject.endswith("__e"):
            return False
        return name.endswith("__c") or self.permission_set.field(sobject, name) is not None

    def readable(self, sobject: str, name: str) -> bool:
        if not self.exists(sobject, name) or not self.object_readable(sobject):
            return False
        if f"{sobject}.{name}" in self.knobs.unreadable_fields:
            return False
        if not self._secured(sobject, name):
            return True
        access = self.permission_set.field(sobject, name)
        return access is not None and access.readable

    def editable(self, sobject: str, name: str) -> bool:
        spec = OBJECT_FIELDS[sobject].get(name)
        if spec is None or not spec.updateable or not self.readable(sobject, name):
            return False
        if not self.object_editable(sobject) or f"{sobject}.{name}" in self.knobs.read_only_fields:
            return False
        if not self._secured(sobject, name):
            return True
        access = self.permission_set.field(sobject, name)
        return access is not None and access.editable

    def hidden(self) -> frozenset[tuple[str, str]]:
        """(object, field) of every field a query may not name: removed, or not readable."""
        return frozenset(
            (obj, name)
            for obj, specs in OBJECT_FIELDS.items()
            for name in specs
            if not self.readable(obj, name)
        )

    def unreadable(self) -> frozenset[str]:
        return frozenset(obj for obj in OBJECT_FIELDS if not self.object_readable(obj))

    def check_patch(self, sobject: str, changes: Iterable[str]) -> None:
        """The ApiError Salesforce answers a PATCH of ``changes`` (API names) that the user may not make."""
        for name in changes:
            if not self.readable(sobject, name):
                raise ApiError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}")
            if not self.editable(sobject, name):
                raise ApiError(
                    400,
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {name}. Please check the security settings of this field "
                    "and verify that it is read/write for your profile or permission set.",
                    [name],
                )

    # -- describe -----------------------------------------------------------------------------

    def describe(self, sobject: str, version: str) -> dict[str, Any]:
        """``GET sobjects/{sobject}/describe`` as the integration user sees it; NOT_FOUND if it may not."""
        specs = OBJECT_FIELDS.get(sobject)
        if specs is None or not self.object_readable(sobject):
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        declared = self.metadata.objects.get(sobject)
        label = declared.label if declared is not None and declared.label else sobject
        url = f"/services/data/v{version}/sobjects/{sobject}"
        return {
            "name": sobject,
            "label": label,
            "custom": sobject.endswith("__e"),
            "keyPrefix": None if sobject.endswith("__e") else _KEY_PREFIXES.get(sobject),
            "queryable": not sobject.endswith("__e"),
            "retrieveable": not sobject.endswith("__e"),
            "createable": sobject.endswith("__e"),
            "updateable": self.object_editable(sobject),
            "deletable": False,
            "urls": {"describe": f"{url}/describe", "sobject": url},
            "fields": [
                self._describe_field(sobject, spec)
                for spec in specs.values()
                if self.readable(sobject, spec.name)
            ],
        }

    def _describe_field(self, sobject: str, spec: FieldSpec) -> dict[str, Any]:
        editable = self.editable(sobject, spec.name)
        return {
            "name": spec.name,
            "label": spec.label,
            "type": spec.kind,
            "length": spec.length
            if spec.kind in ("string", "picklist", "email", "textarea", "id", "reference")
            else 0,
            "custom": spec.custom,
            "nillable": spec.nillable,
            "updateable": editable,
            "createable": editable,
            "defaultedOnCreate": spec.default_value is not None,
            "picklistValues": [
                {
                    "active": True,
                    "defaultValue": v == spec.default_value,
                    "label": v,
                    "validFor": None,
                    "value": v,
                }
                for v in spec.values
            ],
            "referenceTo": list(spec.reference_to),
            "relationshipName": spec.name.removesuffix("Id") if spec.kind == "reference" else None,
            "soapType": _SOAP_TYPES.get(spec.kind, "xsd:string"),
        }

    # -- flows --------------------------------------------------------------------------------

    def flow_active(self, name: str) -> bool:
        flow = self.metadata.flows.get(name)
        return flow is not None and flow.active and name not in self.knobs.inactive_flows

    def active_flows(self) -> list[FlowDecl]:
        return [f for f in self.metadata.flows.values() if self.flow_active(f.name)]

    def tooling_query(self, soql: str, version: str) -> list[dict[str, Any]]:
        """The records of a Tooling API query of ``FlowDefinition`` or ``FlowDefinitionView``."""
        match = _TOOLING_QUERY.fullmatch(soql or "")
        if match is None:
            raise ApiError(
                400,
                "MALFORMED_QUERY",
                "the sandbox's Tooling API answers SELECT ... FROM FlowDefinition[View] [WHERE name = '...' | name IN (...)]",
            )
        sobject = next((o for o in _FLOW_OBJECTS if o.lower() == match["object"].lower()), None)
        if sobject is None:
            raise ApiError(400, "INVALID_TYPE", f"sObject type '{match['object']}' is not supported.")
        name_field, known = _FLOW_OBJECTS[sobject]
        columns = [c.strip() for c in match["columns"].split(",")]
        resolved = []
        for column in columns:
            found = next((k for k in known if k.lower() == column.lower()), None)
            if found is None:
                raise ApiError(400, "INVALID_FIELD", f"No such column '{column}' on entity '{sobject}'.")
            resolved.append(found)
        wanted: set[str] | None = None
        if match["field"] is not None:
            if match["field"].lower() != name_field.lower():
                raise ApiError(400, "INVALID_FIELD", f"the sandbox filters {sobject} on {name_field} only")
            raw = [match["one"]] if match["one"] is not None else match["many"].split(",")
            wanted = {v.strip().strip("'") for v in raw}
        records = []
        for number, flow in enumerate(sorted(self.metadata.flows.values(), key=lambda f: f.name), start=1):
            if wanted is not None and flow.name not in wanted:
                continue
            record = self._flow_record(flow, number)
            url = f"/services/data/v{version}/tooling/sobjects/{sobject}/{record['Id']}"
            records.append({"attributes": {"type": sobject, "url": url}, **{c: record[c] for c in resolved}})
        return records

    def _flow_record(self, flow: FlowDecl, number: int) -> dict[str, Any]:
        definition = ids.to18(PREFIX_FLOW_DEFINITION + f"{number:012d}")
        latest = ids.to18(PREFIX_FLOW + f"{number:012d}")
        active = self.flow_active(flow.name)
        return {
            "Id": definition,
            "DurableId": definition,
            "DeveloperName": flow.name,
            "ApiName": flow.name,
            "MasterLabel": flow.label,
            "Label": flow.label,
            "ActiveVersionId": latest if active else None,
            "LatestVersionId": latest,
            "IsActive": active,
            "ProcessType": "AutoLaunchedFlow",
        }


_KEY_PREFIXES = {"Order": "801", "Account": "001", "Contact": "003", "OrderItem": "802", "Product2": "01t"}
_SOAP_TYPES = {
    "id": "tns:ID",
    "reference": "tns:ID",
    "datetime": "xsd:dateTime",
    "date": "xsd:date",
    "boolean": "xsd:boolean",
    "double": "xsd:double",
    "currency": "xsd:double",
}
