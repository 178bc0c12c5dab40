"""The org's side as this repository declares it: the ``salesforce/`` DX source, parsed.

One source of truth, three readers: ``provisioning salesforce check`` compares a live org's
describe answers with the fields, types and flows declared here; the sandbox's Salesforce builds
its Order model, describe answers, event schema, permissions and approval from them; the tests of
``tests/salesforce_metadata`` hold them to the code. Only what those readers need is parsed
(objects, custom fields, the permission set, the record-triggered flows), with the standard
library's XML parser: the files are the project's own.

The files travel with the package: ``sfdx_source`` beside this module is a link to
``salesforce/force-app/main/default`` that a build copies as package data, so a host installed
with ``pip install .`` reads the same files as a checkout.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

SOURCE_DIR = Path(__file__).resolve().parent / "sfdx_source"
_MD = "{http://soap.sforce.com/2006/04/metadata}"

# A CustomField's metadata type -> the type its describe answer names (the REST API's field types).
DESCRIBE_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "Text": "string",
        "TextArea": "textarea",
        "LongTextArea": "textarea",
        "Picklist": "picklist",
        "DateTime": "datetime",
        "Date": "date",
        "Checkbox": "boolean",
        "Number": "double",
        "Email": "email",
        "Phone": "phone",
        "Url": "url",
        "Lookup": "reference",
    }
)


class MetadataError(ValueError):
    """A file of the project is missing or is not what this module expects."""


@dataclass(frozen=True)
class FieldDecl:
    """One CustomField file."""

    sobject: str
    name: str
    label: str
    type: str  # the metadata type: Text, Picklist, DateTime, ...
    length: int | None
    required: bool
    picklist_values: tuple[str, ...]
    default_value: str | None  # the picklist's default

    @property
    def describe_type(self) -> str:
        """The type a describe answer gives this field (``string`` for Text, ...)."""
        try:
            return DESCRIBE_TYPES[self.type]
        except KeyError:
            raise MetadataError(f"{self.sobject}.{self.name}: metadata type {self.type} is unknown") from None

    def type_text(self) -> str:
        """As Setup shows it: ``Text(32)``, ``Picklist (Pending, Activating)``, ``DateTime``."""
        if self.length is not None:
            return f"{self.type}({self.length})"
        if self.picklist_values:
            return f"{self.type} ({', '.join(self.picklist_values)})"
        return self.type


@dataclass(frozen=True)
class ObjectDecl:
    """An object of the project: a Platform Event it defines, or a standard object it adds fields to."""

    name: str
    label: str | None  # None for a standard object (the project has only its fields)
    fields: Mapping[str, FieldDecl]

    @property
    def is_event(self) -> bool:
        return self.name.endswith("__e")


@dataclass(frozen=True)
class ObjectAccess:
    read: bool
    edit: bool
    create: bool
    delete: bool
    view_all: bool


@dataclass(frozen=True)
class FieldAccess:
    readable: bool
    editable: bool


@dataclass(frozen=True)
class PermissionSetDecl:
    name: str
    label: str
    objects: Mapping[str, ObjectAccess]
    fields: Mapping[str, FieldAccess]  # keyed "Object.Field"
    user_permissions: frozenset[str]

    def field(self, sobject: str, name: str) -> FieldAccess | None:
        return self.fields.get(f"{sobject}.{name}")


@dataclass(frozen=True)
class FlowValue:
    """A value in a flow: a literal (``stringValue``, ...) or an ``elementReference`` (``$Record.Id``)."""

    kind: str
    text: str

    @property
    def is_reference(self) -> bool:
        return self.kind == "elementReference"


@dataclass(frozen=True)
class FlowFilter:
    field: str
    operator: str
    value: FlowValue


@dataclass(frozen=True)
class FlowAssignment:
    target: str  # e.g. $Record.Activation_Status__c
    operator: str
    value: FlowValue


@dataclass(frozen=True)
class FlowRecordCreate:
    name: str
    object: str
    inputs: Mapping[str, FlowValue]
    fault_target: str | None


@dataclass(frozen=True)
class FlowDecl:
    """A record-triggered flow: when it starts and what it does."""

    name: str
    label: str
    status: str
    object: str
    trigger_type: str  # RecordBeforeSave, RecordAfterSave
    record_trigger_type: str  # Create, Update, CreateAndUpdate
    only_when_changed: bool  # doesRequireRecordChangedToMeetCriteria
    filter_logic: str
    filters: tuple[FlowFilter, ...]
    assignments: tuple[FlowAssignment, ...]
    record_creates: tuple[FlowRecordCreate, ...]
    formulas: Mapping[str, str]

    @property
    def active(self) -> bool:
        return self.status == "Active"


@dataclass(frozen=True)
class Project:
    objects: Mapping[str, ObjectDecl]
    permission_sets: Mapping[str, PermissionSetDecl]
    flows: Mapping[str, FlowDecl]

    def field(self, sobject: str, name: str) -> FieldDecl | None:
        obj = self.objects.get(sobject)
        return None if obj is None else obj.fields.get(name)

    def events(self) -> tuple[ObjectDecl, ...]:
        return tuple(o for o in self.objects.values() if o.is_event)

    @property
    def permission_set(self) -> PermissionSetDecl:
        """The integration user's permission set (the project has one)."""
        if len(self.permission_sets) != 1:
            raise MetadataError(f"expected one permission set, found {sorted(self.permission_sets)}")
        return next(iter(self.permission_sets.values()))


# -- parsing --------------------------------------------------------------------------------------


def _parse(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()  # noqa: S314 (the project's own files)
    except (OSError, ET.ParseError) as exc:
        raise MetadataError(f"{path}: {exc}") from None
    if not root.tag.startswith(_MD):
        raise MetadataError(f"{path}: not in the Metadata API namespace ({root.tag})")
    return root


def _text(element: ET.Element | None, tag: str) -> str | None:
    found = None if element is None else element.find(_MD + tag)
    return None if found is None else (found.text or "")


def _flag(element: ET.Element, tag: str) -> bool:
    return _text(element, tag) == "true"


def _value(element: ET.Element | None) -> FlowValue:
    if element is None or len(element) != 1:
        raise MetadataError("a flow value has exactly one element")
    (inner,) = list(element)
    return FlowValue(kind=inner.tag.removeprefix(_MD), text=inner.text or "")


def _field(path: Path) -> FieldDecl:
    root = _parse(path)
    values = [v for v in root.iter(_MD + "value") if v.find(_MD + "fullName") is not None]
    length = _text(root, "length")
    default = next((_text(v, "fullName") for v in values if _flag(v, "default")), None)
    return FieldDecl(
        sobject=path.parent.parent.name,
        name=_text(root, "fullName") or path.name.removesuffix(".field-meta.xml"),
        label=_text(root, "label") or "",
        type=_text(root, "type") or "",
        length=int(length) if length else None,
        required=_flag(root, "required"),
        picklist_values=tuple(_text(v, "fullName") or "" for v in values),
        default_value=default,
    )


def _object(folder: Path) -> ObjectDecl:
    fields = {f.name: f for f in (_field(p) for p in sorted((folder / "fields").glob("*.field-meta.xml")))}
    own = folder / f"{folder.name}.object-meta.xml"
    label = _text(_parse(own), "label") if own.exists() else None
    return ObjectDecl(name=folder.name, label=label, fields=MappingProxyType(fields))


def _permission_set(path: Path) -> PermissionSetDecl:
    root = _parse(path)
    objects = {
        _text(o, "object") or "": ObjectAccess(
            read=_flag(o, "allowRead"),
            edit=_flag(o, "allowEdit"),
            create=_flag(o, "allowCreate"),
            delete=_flag(o, "allowDelete"),
            view_all=_flag(o, "viewAllRecords"),
        )
        for o in root.findall(_MD + "objectPermissions")
    }
    fields = {
        _text(f, "field") or "": FieldAccess(readable=_flag(f, "readable"), editable=_flag(f, "editable"))
        for f in root.findall(_MD + "fieldPermissions")
    }
    users = frozenset(
        _text(u, "name") or "" for u in root.findall(_MD + "userPermissions") if _flag(u, "enabled")
    )
    return PermissionSetDecl(
        name=path.name.removesuffix(".permissionset-meta.xml"),
        label=_text(root, "label") or "",
        objects=MappingProxyType(objects),
        fields=MappingProxyType(fields),
        user_permissions=users,
    )


def _flow(path: Path) -> FlowDecl:
    root = _parse(path)
    start = root.find(_MD + "start")
    if start is None:
        raise MetadataError(f"{path}: a flow without <start> is not record-triggered")
    filters = tuple(
        FlowFilter(
            field=_text(f, "field") or "",
            operator=_text(f, "operator") or "",
            value=_value(f.find(_MD + "value")),
        )
        for f in start.findall(_MD + "filters")
    )
    assignments = tuple(
        FlowAssignment(
            target=_text(item, "assignToReference") or "",
            operator=_text(item, "operator") or "",
            value=_value(item.find(_MD + "value")),
        )
        for a in root.findall(_MD + "assignments")
        for item in a.findall(_MD + "assignmentItems")
    )
    creates = tuple(
        FlowRecordCreate(
            name=_text(c, "name") or "",
            object=_text(c, "object") or "",
            inputs=MappingProxyType(
                {
                    _text(i, "field") or "": _value(i.find(_MD + "value"))
                    for i in c.findall(_MD + "inputAssignments")
                }
            ),
            fault_target=_text(c.find(_MD + "faultConnector"), "targetReference"),
        )
        for c in root.findall(_MD + "recordCreates")
    )
    formulas = {_text(f, "name") or "": _text(f, "expression") or "" for f in root.findall(_MD + "formulas")}
    return FlowDecl(
        name=path.name.removesuffix(".flow-meta.xml"),
        label=_text(root, "label") or "",
        status=_text(root, "status") or "",
        object=_text(start, "object") or "",
        trigger_type=_text(start, "triggerType") or "",
        record_trigger_type=_text(start, "recordTriggerType") or "",
        only_when_changed=_flag(start, "doesRequireRecordChangedToMeetCriteria"),
        filter_logic=_text(start, "filterLogic") or "and",
        filters=filters,
        assignments=assignments,
        record_creates=creates,
        formulas=MappingProxyType(formulas),
    )


def load(source: Path = SOURCE_DIR) -> Project:
    """The project under ``source`` (``force-app/main/default``); MetadataError if it is not there."""
    if not (source / "objects").is_dir():
        raise MetadataError(
            f"{source} holds no Salesforce DX source (objects/): is the package installed from a "
            "checkout with salesforce/?"
        )
    objects = {o.name: o for o in (_object(d) for d in sorted((source / "objects").iterdir()) if d.is_dir())}
    permission_sets = {
        p.name: p
        for p in (
            _permission_set(f) for f in sorted((source / "permissionsets").glob("*.permissionset-meta.xml"))
        )
    }
    flows = {f.name: f for f in (_flow(p) for p in sorted((source / "flows").glob("*.flow-meta.xml")))}
    return Project(
        objects=MappingProxyType(objects),
        permission_sets=MappingProxyType(permission_sets),
        flows=MappingProxyType(flows),
    )


@functools.cache
def project() -> Project:
    """The shipped project, parsed once per process."""
    return load()
