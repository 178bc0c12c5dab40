"""The simulated org's data: Orders with their Account, bill-to Contact and OrderItems.

The objects' custom fields (names, types, lengths, picklist values) come from the ``salesforce/``
DX project (:mod:`provisioning.salesforce.metadata`), as a deploy of it would make them; the
standard fields are Salesforce's own, the few the service and the sandbox use. Values are stored
as Salesforce returns them: datetimes as ``2024-05-01T10:00:00.000+0000``, ``Quantity`` as a
double.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from provisioning.core.errors import PicklableError
from provisioning.salesforce.metadata import FieldDecl, project
from provisioning.sandbox.salesforce import ids


class ApiError(PicklableError):
    """A Salesforce REST error: answered as ``[{"message", "errorCode", "fields"?}]``."""

    def __init__(self, status: int, error_code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields

    def body(self) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {"message": self.message, "errorCode": self.error_code}
        if self.fields is not None:
            entry["fields"] = self.fields
        return [entry]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    label: str
    kind: str  # a describe type: id, string, picklist, datetime, date, boolean, reference, double, ...
    updateable: bool = False
    length: int = 255
    values: tuple[str, ...] = ()
    custom: bool = False
    nillable: bool = True
    default_value: str | None = None
    reference_to: tuple[str, ...] = ()


def custom_field(decl: FieldDecl) -> FieldSpec:
    """A custom field of the salesforce/ project as the org has it once deployed."""
    return FieldSpec(
        decl.name,
        decl.label,
        decl.describe_type,
        updateable=True,
        # A picklist's values may be 255 characters long; a date/time has no length.
        length=decl.length or (255 if decl.describe_type in ("picklist", "string", "textarea") else 0),
        values=decl.picklist_values,
        custom=True,
        nillable=not decl.required,
        default_value=decl.default_value,
    )


def _with_custom(sobject: str, standard: tuple[FieldSpec, ...]) -> dict[str, FieldSpec]:
    declared = project().objects.get(sobject)
    custom = [custom_field(f) for f in declared.fields.values()] if declared is not None else []
    return {f.name: f for f in (*standard, *custom)}


def _system(*, reference: str = "User") -> tuple[FieldSpec, ...]:
    return (
        FieldSpec("CreatedDate", "Created Date", "datetime", nillable=False),
        FieldSpec("CreatedById", "Created By ID", "reference", length=18, reference_to=(reference,)),
    )


ACTIVATION_STATUSES = project().objects["Order"].fields["Activation_Status__c"].picklist_values
SIM_TYPES = project().objects["Order"].fields["SIM_Type__c"].picklist_values

# Each object's fields: Salesforce's standard ones the sandbox keeps, then the project's custom ones.
ORDER_FIELDS: dict[str, FieldSpec] = _with_custom(
    "Order",
    (
        FieldSpec("Id", "Order ID", "id", length=18, nillable=False),
        FieldSpec("OrderNumber", "Order Number", "string", length=30, nillable=False),
        FieldSpec("Status", "Status", "picklist", True, 40, ("Draft", "Activated"), nillable=False),
        FieldSpec("EffectiveDate", "Order Start Date", "date", True, 0, nillable=False),
        FieldSpec("AccountId", "Account ID", "reference", length=18, reference_to=("Account",)),
        FieldSpec("BillToContactId", "Bill To Contact ID", "reference", True, 18, reference_to=("Contact",)),
        FieldSpec("CreatedDate", "Created Date", "datetime", length=0, nillable=False),
        FieldSpec("LastModifiedDate", "Last Modified Date", "datetime", length=0, nillable=False),
        FieldSpec("SystemModstamp", "System Modstamp", "datetime", length=0, nillable=False),
        FieldSpec("IsDeleted", "Deleted", "boolean", length=0, nillable=False),
    ),
)
ACCOUNT_SPECS = _with_custom(
    "Account",
    (
        FieldSpec("Id", "Account ID", "id", length=18, nillable=False),
        FieldSpec("Name", "Account Name", "string"),
    ),
)
CONTACT_SPECS = _with_custom(
    "Contact",
    (
        FieldSpec("Id", "Contact ID", "id", length=18, nillable=False),
        FieldSpec("Email", "Email", "email", True, 80),
        FieldSpec("FirstName", "First Name", "string", True, 40),
        FieldSpec("LastName", "Last Name", "string", True, 80, nillable=False),
    ),
)
ORDER_ITEM_SPECS = _with_custom(
    "OrderItem",
    (
        FieldSpec("Id", "Order Product ID", "id", length=18, nillable=False),
        FieldSpec("OrderId", "Order ID", "reference", length=18, nillable=False, reference_to=("Order",)),
        FieldSpec("Quantity", "Quantity", "double", True, 0, nillable=False),
        FieldSpec("UnitPrice", "Unit Price", "currency", True, 0),
        FieldSpec("Product2Id", "Product ID", "reference", length=18, reference_to=("Product2",)),
    ),
)
PRODUCT_SPECS = _with_custom(
    "Product2",
    (
        FieldSpec("Id", "Product ID", "id", length=18, nillable=False),
        FieldSpec("Name", "Product Name", "string", True, nillable=False),
        FieldSpec("ProductCode", "Product Code", "string", True),
    ),
)
ACCOUNT_FIELDS = tuple(ACCOUNT_SPECS)
CONTACT_FIELDS = tuple(CONTACT_SPECS)
ORDER_ITEM_FIELDS = tuple(ORDER_ITEM_SPECS)
PRODUCT_FIELDS = tuple(PRODUCT_SPECS)


def event_specs(sobject: str) -> dict[str, FieldSpec]:
    """A Platform Event's fields: the standard ones every event has, then the project's."""
    standard = (
        FieldSpec("ReplayId", "Replay ID", "string", length=255),
        *_system(),
        FieldSpec("EventUuid", "Event UUID", "string", length=36),
    )
    return _with_custom(sobject, standard)


# Every object the sandbox describes, and its fields.
OBJECT_FIELDS: dict[str, dict[str, FieldSpec]] = {
    "Order": ORDER_FIELDS,
    "Account": ACCOUNT_SPECS,
    "Contact": CONTACT_SPECS,
    "OrderItem": ORDER_ITEM_SPECS,
    "Product2": PRODUCT_SPECS,
    **{event.name: event_specs(event.name) for event in project().events()},
}

# Friendly seed keys (admin API) -> Order API names.
FRIENDLY_ORDER_KEYS = {
    "id": "Id",
    "order_number": "OrderNumber",
    "status": "Status",
    "effective_date": "EffectiveDate",
    "activation_status": "Activation_Status__c",
    "sim_type": "SIM_Type__c",
    "eid": "EID__c",
    "whmcs_order_id": "WHMCS_Order_ID__c",
    "esim_iccid": "ESIM_ICCID__c",
    "activation_error": "Activation_Error__c",
    "activated_at": "Activated_At__c",
    "esim_status": "ESIM_Status__c",
    "esim_status_at": "ESIM_Status_At__c",
}
SEED_EXTRA_KEYS = (
    "whmcs_client_id",
    "account_name",
    "account",
    "email",
    "first_name",
    "last_name",
    "contact",
    "items",
)
ITEM_KEYS = ("quantity", "whmcs_product_id", "product_name", "unit_price")


def sf_datetime(moment: dt.datetime | None = None) -> str:
    """A datetime as the REST API writes it: ``2024-05-01T10:00:00.000+0000``."""
    moment = (moment or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def parse_datetime(text: str) -> dt.datetime:
    """ISO 8601 as Salesforce accepts it (``Z``, ``+00:00`` or ``+0000``); naive means UTC."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    elif len(value) > 5 and value[-5] in "+-" and value[-4:].isdigit() and "T" in value:
        value = value[:-2] + ":" + value[-2:]
    if "T" not in value:
        raise ValueError("a datetime needs a time")
    moment = dt.datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def coerce(spec: FieldSpec, value: Any) -> Any:
    """The stored form of ``value`` for field ``spec``, or the ApiError Salesforce would answer."""
    if value is None:
        return None
    if spec.kind == "datetime":
        if isinstance(value, str):
            try:
                return sf_datetime(parse_datetime(value))
            except ValueError:
                pass
        raise _parser_error("datetime", value)
    if spec.kind == "date":
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value).isoformat()
            except ValueError:
                pass
        raise _parser_error("date", value)
    if spec.kind == "boolean":
        if isinstance(value, bool):
            return value
        raise _parser_error("boolean", value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _parser_error("string", value)
    text = str(value)
    if spec.kind == "picklist" and spec.values and text not in spec.values:
        raise ApiError(
            400,
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            f"{spec.label}: bad value for restricted picklist field: {text}",
            [spec.name],
        )
    if len(text) > spec.length:
        raise ApiError(
            400,
            "STRING_TOO_LONG",
            f"{spec.label}: data value too large: {text} (max length={spec.length})",
            [spec.name],
        )
    return text


def _parser_error(kind: str, value: Any) -> ApiError:
    return ApiError(
        400,
        "JSON_PARSER_ERROR",
        f"Cannot deserialize instance of {kind} from VALUE_STRING value {value} "
        "or request may be missing a required field at [line:1, column:1]",
    )


@dataclass
class Product:
    Id: str
    Name: str
    ProductCode: str
    WHMCS_Product_ID__c: str | None


@dataclass
class OrderItem:
    Id: str
    Quantity: float
    UnitPrice: float
    product: Product


@dataclass
class Order:
    fields: dict[str, Any]
    account: dict[str, Any] | None
    contact: dict[str, Any] | None
    items: list[OrderItem]
    patches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.fields["Id"])

    def related(self, relationship: str) -> dict[str, Any] | None:
        return self.account if relationship == "Account" else self.contact


class OrderStore:
    """Every Order of the org, keyed by the 15-character Id."""

    def __init__(self, rng: random.Random, id_factory: ids.IdFactory) -> None:
        self._rng = rng
        self._ids = id_factory
        self._orders: dict[str, Order] = {}
        self._products: dict[str, Product] = {}
        self._next_number = 100

    def __iter__(self) -> Iterator[Order]:
        return iter(list(self._orders.values()))

    def __len__(self) -> int:
        return len(self._orders)

    def clear(self) -> None:
        self._orders.clear()

    def get(self, record_id: str) -> Order | None:
        return self._orders.get(ids.key15(record_id))

    # -- seeding ----------------------------------------------------------------------------

    def seed(self, data: dict[str, Any]) -> Order:
        """Create one Order from friendly keys (or Order API names); raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError("an order is a JSON object")
        known = set(FRIENDLY_ORDER_KEYS) | set(SEED_EXTRA_KEYS) | set(ORDER_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown order keys {unknown}; known: {sorted(known)}")
        values = {FRIENDLY_ORDER_KEYS.get(k, k): v for k, v in data.items() if k not in SEED_EXTRA_KEYS}
        record_id = values.pop("Id", None)
        if record_id is None:
            record_id = self._ids.new(ids.PREFIX_ORDER)
        elif not (ids.is_valid_id(record_id) and record_id.startswith(ids.PREFIX_ORDER)):
            raise ValueError(f"not a valid Order Id: {record_id!r}")
        record_id = ids.to18(record_id)
        if self.get(record_id) is not None:
            raise ValueError(f"an Order with Id {record_id} exists")
        now = sf_datetime()
        self._next_number += 1
        sim_type = values.get("SIM_Type__c", "eSIM")
        fields: dict[str, Any] = {name: None for name in ORDER_FIELDS}
        fields.update(
            Id=record_id,
            OrderNumber=f"{self._next_number:08d}",
            Status="Draft",
            EffectiveDate=dt.date.today().isoformat(),
            Activation_Status__c="Activating",
            SIM_Type__c=sim_type,
            EID__c=self._eid() if sim_type == "eSIM" else None,
            CreatedDate=now,
            LastModifiedDate=now,
            SystemModstamp=now,
            IsDeleted=False,
        )
        for name, value in values.items():
            try:
                fields[name] = coerce(ORDER_FIELDS[name], value)
            except ApiError as exc:
                raise ValueError(exc.message) from None
        account = None
        if data.get("account", True) is not None:
            account = {
                "Id": self._ids.new(ids.PREFIX_ACCOUNT),
                "Name": str(data.get("account_name") or f"Customer {self._next_number}"),
                "WHMCS_Client_ID__c": _text_or_none(data.get("whmcs_client_id", "1")),
            }
        contact = None
        if data.get("contact", True) is not None:
            contact = {
                "Id": self._ids.new(ids.PREFIX_CONTACT),
                "Email": _text_or_none(data.get("email", f"customer{self._next_number}@example.com")),
                "FirstName": _text_or_none(data.get("first_name", "Alex")),
                "LastName": str(data.get("last_name") or "Example"),
            }
        fields["AccountId"] = account["Id"] if account else None
        fields["BillToContactId"] = contact["Id"] if contact else None
        items = [self._item(item) for item in _items(data.get("items", [{}]))]
        order = Order(fields=fields, account=account, contact=contact, items=items)
        self._orders[ids.key15(record_id)] = order
        return order

    def _item(self, data: dict[str, Any]) -> OrderItem:
        unknown = sorted(set(data) - set(ITEM_KEYS))
        if unknown:
            raise ValueError(f"unknown item keys {unknown}; known: {list(ITEM_KEYS)}")
        product_id = _text_or_none(data.get("whmcs_product_id", "1"))
        product = self._products.get(str(product_id))
        if product is None:
            product = Product(
                Id=self._ids.new(ids.PREFIX_PRODUCT),
                Name=str(data.get("product_name") or f"Plan {product_id}"),
                ProductCode=f"PLAN-{product_id}",
                WHMCS_Product_ID__c=product_id,
            )
            self._products[str(product_id)] = product
        try:
            quantity = float(data.get("quantity", 1))
            price = float(data.get("unit_price", 10.0))
        except (TypeError, ValueError):
            raise ValueError("quantity and unit_price are numbers") from None
        return OrderItem(
            Id=self._ids.new(ids.PREFIX_ORDER_ITEM), Quantity=quantity, UnitPrice=price, product=product
        )

    def _eid(self) -> str:
        # 32 digits whose ISO 7064 mod 97-10 check holds (int(eid) % 97 == 1).
        body = "89049032" + "".join(self._rng.choice("0123456789") for _ in range(22))
        check = 98 - (int(body + "00") % 97)
        return f"{body}{check:02d}"

    # -- updates ----------------------------------------------------------------------------

    def update(self, order: Order, changes: dict[str, Any], *, source: str) -> None:
        """Apply already validated ``changes`` (API names) and remember the write."""
        now = sf_datetime()
        order.fields.update(changes)
        order.fields["LastModifiedDate"] = now
        order.fields["SystemModstamp"] = now
        order.patches.append({"at": now, "source": source, "fields": dict(changes)})

    @staticmethod
    def validate_patch(body: Any) -> dict[str, Any]:
        """The stored values of a REST PATCH body, or the ApiError Salesforce would answer."""
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "JSON_PARSER_ERROR",
                "Cannot deserialize instance of Order from START_ARRAY value [line:1, column:1]",
            )
        changes: dict[str, Any] = {}
        lowered = {name.lower(): spec for name, spec in ORDER_FIELDS.items()}
        for key, value in body.items():
            if key == "attributes":
                continue
            spec = lowered.get(str(key).lower())
            if spec is None:
                raise ApiError(400, "INVALID_FIELD", f"No such column '{key}' on sobject of type Order")
            if not spec.updateable:
                raise ApiError(
                    400,
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {spec.name}. Please check the security settings of "
                    "this field and verify that it is read/write for your profile or permission set.",
                    [spec.name],
                )
            changes[spec.name] = coerce(spec, value)
        return changes


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _items(value: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("items is a list of objects")
    return value


# -- rendering --------------------------------------------------------------------------------


def attributes(sobject: str, record_id: str, version: str) -> dict[str, str]:
    return {"type": sobject, "url": f"/services/data/v{version}/sobjects/{sobject}/{record_id}"}


def order_record(order: Order, version: str, names: Iterable[str] | None = None) -> dict[str, Any]:
    """``GET sobjects/Order/{id}``: every field (or ``names``), no relationships."""
    record: dict[str, Any] = {"attributes": attributes("Order", order.id, version)}
    for name in names if names is not None else ORDER_FIELDS:
        record[name] = order.fields[name]
    return record


def admin_view(order: Order) -> dict[str, Any]:
    """The admin API's view of one Order: API names, relationships nested, writes listed."""
    view = dict(order.fields)
    view["Account"] = dict(order.account) if order.account else None
    view["BillToContact"] = dict(order.contact) if order.contact else None
    view["OrderItems"] = [
        {
            "Id": item.Id,
            "Quantity": item.Quantity,
            "UnitPrice": item.UnitPrice,
            "Product2": {
                "Id": item.product.Id,
                "Name": item.product.Name,
                "ProductCode": item.product.ProductCode,
                "WHMCS_Product_ID__c": item.product.WHMCS_Product_ID__c,
            },
        }
        for item in order.items
    ]
    view["patches"] = list(order.patches)
    return view
