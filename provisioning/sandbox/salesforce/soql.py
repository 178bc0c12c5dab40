"""The SOQL subset of our Order queries (the worker's, and the reconciler's backfill).

``SELECT <fields and Account./BillToContact. paths>, (SELECT <item fields> FROM OrderItems)
FROM Order [WHERE <field> <op> <literal> [AND ...]] [ORDER BY <field> [ASC|DESC]] [LIMIT n]``,
where a literal is a quoted string, a number, a datetime (``2024-05-01T10:00:00Z``,
unquoted, as in SOQL) or ``null``. Keywords and field names are
case-insensitive, as in SOQL; results use the API names' own case. Anything
else is refused with the error code Salesforce uses (``MALFORMED_QUERY``,
``INVALID_FIELD``, ``INVALID_TYPE``, ``INVALID_QUERY_FILTER_OPERATOR``). A field the org does
not have, or the integration user may not read (``hidden``: the org's knobs and its permission
set), is an ``INVALID_FIELD`` "No such column" as on Salesforce; an object it may not read is an
``INVALID_TYPE``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from provisioning.sandbox.salesforce import ids
from provisioning.sandbox.salesforce.model import (
    ACCOUNT_FIELDS,
    CONTACT_FIELDS,
    ORDER_FIELDS,
    ORDER_ITEM_FIELDS,
    PRODUCT_FIELDS,
    ApiError,
    Order,
    OrderItem,
    OrderStore,
    attributes,
    parse_datetime,
)

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')"
    r"|(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))"
    r"|(?P<num>\d+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<op>!=|<=|>=|[(),=<>]))"
)
_NO_COLUMN = (
    "No such column '{field}' on entity '{entity}'. If you are attempting to use a custom field, be sure to "
    "append the '__c' after the custom field name. Please reference your WSDL or the describe call for the "
    "appropriate names."
)
_NO_RELATIONSHIP = (
    "Didn't understand relationship '{name}' in {where}. If you are attempting to use a custom relationship, "
    "be sure to append the '__r' after the custom relationship name. Please reference your WSDL or the "
    "describe call for the appropriate names."
)
# relationship name -> (sobject, its fields), per parent object.
_Relationships = dict[str, tuple[str, tuple[str, ...]]]
_ORDER_RELATIONSHIPS: _Relationships = {
    "Account": ("Account", ACCOUNT_FIELDS),
    "BillToContact": ("Contact", CONTACT_FIELDS),
}
_ITEM_RELATIONSHIPS: _Relationships = {"Product2": ("Product2", PRODUCT_FIELDS)}


@dataclass(frozen=True)
class _Schema:
    """The fields a query may name: the model's, less the ``hidden`` ones (object, field)."""

    order: tuple[str, ...]
    order_relationships: _Relationships
    item: tuple[str, ...]
    item_relationships: _Relationships

    @classmethod
    def without(cls, hidden: frozenset[tuple[str, str]]) -> _Schema:
        def visible(sobject: str, names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(n for n in names if (sobject, n) not in hidden)

        def related(relationships: _Relationships) -> _Relationships:
            return {name: (obj, visible(obj, names)) for name, (obj, names) in relationships.items()}

        return cls(
            order=visible("Order", tuple(ORDER_FIELDS)),
            order_relationships=related(_ORDER_RELATIONSHIPS),
            item=visible("OrderItem", ORDER_ITEM_FIELDS),
            item_relationships=related(_ITEM_RELATIONSHIPS),
        )


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    pos: int


@dataclass(frozen=True)
class FieldRef:
    """A selected field: ``("Quantity",)`` or ``("Product2", "WHMCS_Product_ID__c")`` in API case."""

    path: tuple[str, ...]


@dataclass
class SubQuery:
    relationship: str
    fields: list[FieldRef] = field(default_factory=list)


@dataclass(frozen=True)
class Condition:
    """``field op value`` on an Order field (API case); ``value`` already typed for the field."""

    field: str
    op: str
    value: Any


@dataclass
class Query:
    text: str
    fields: list[FieldRef | SubQuery]
    where_id: str | None
    limit: int | None
    conditions: list[Condition] = field(default_factory=list)
    order_by: tuple[str, bool] | None = None  # (field, descending)


def _error(code: str, detail: str, query: str, pos: int) -> ApiError:
    flat = " ".join(query.split("\n"))
    return ApiError(400, code, f"\n{flat}\n{' ' * pos}^\nERROR at Row:1:Column:{pos + 1}\n{detail}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[Token] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise _error("MALFORMED_QUERY", f"unexpected token: '{text[pos:].split()[0]}'", text, pos)
            kind = match.lastgroup or "op"
            self.tokens.append(Token(kind, match.group(kind), match.start(kind)))
            pos = match.end()
        self.i = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self, expected: str | None = None) -> Token:
        token = self.peek()
        if token is None:
            raise _error("MALFORMED_QUERY", "unexpected token: <EOF>", self.text, len(self.text))
        if expected is not None and token.text.upper() != expected:
            raise _error("MALFORMED_QUERY", f"unexpected token: '{token.text}'", self.text, token.pos)
        self.i += 1
        return token

    def at(self, keyword: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "name" and token.text.upper() == keyword

    def field_list(self, allow_subquery: bool) -> list[Token | list[Token]]:
        items: list[Token | list[Token]] = []
        while True:
            token = self.peek()
            if allow_subquery and token is not None and token.text == "(":
                self.next()
                self.next("SELECT")
                inner = self.field_list(allow_subquery=False)
                self.next("FROM")
                relationship = self.next()
                self.next(")")
                items.append([relationship, *[t for t in inner if isinstance(t, Token)]])
            else:
                token = self.next()
                if token.kind != "name" or token.text.upper() in ("FROM", "SELECT"):
                    raise _error("MALFORMED_QUERY", f"unexpected token: '{token.text}'", self.text, token.pos)
                items.append(token)
            separator = self.peek()
            if separator is None or separator.text != ",":
                return items
            self.next()


def parse(
    text: str,
    hidden: frozenset[tuple[str, str]] = frozenset(),
    unreadable: frozenset[str] = frozenset(),
) -> Query:
    """Parse and check one query against the Order schema less ``hidden`` fields; raises ApiError."""
    schema = _Schema.without(hidden)
    if not text or not text.strip():
        raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
    p = _Parser(text)
    p.next("SELECT")
    raw_fields = p.field_list(allow_subquery=True)
    p.next("FROM")
    sobject = p.next()
    if sobject.text.lower() != "order":
        raise _error(
            "MALFORMED_QUERY", f"the sandbox only serves FROM Order, not '{sobject.text}'", text, sobject.pos
        )
    if "Order" in unreadable:
        raise _error("INVALID_TYPE", "sObject type 'Order' is not supported.", text, sobject.pos)
    where_id: str | None = None
    limit: int | None = None
    conditions: list[Condition] = []
    order_by: tuple[str, bool] | None = None
    if p.at("WHERE"):
        p.next()
        while True:
            conditions.append(_condition(p, text, schema.order))
            if not p.at("AND"):
                break
            p.next()
        if len(conditions) == 1 and conditions[0].field == "Id" and conditions[0].op == "=":
            where_id = conditions[0].value
            conditions = []
    if p.at("ORDER"):
        p.next()
        p.next("BY")
        column = p.next()
        name = _match(column.text, schema.order)
        if name is None:
            raise _error(
                "INVALID_FIELD", _NO_COLUMN.format(field=column.text, entity="Order"), text, column.pos
            )
        descending = False
        if p.at("ASC") or p.at("DESC"):
            descending = p.next().text.upper() == "DESC"
        order_by = (name, descending)
    if p.at("LIMIT"):
        p.next()
        number = p.next()
        if number.kind != "num":
            raise _error("MALFORMED_QUERY", f"unexpected token: '{number.text}'", text, number.pos)
        limit = int(number.text)
    extra = p.peek()
    if extra is not None:
        raise _error("MALFORMED_QUERY", f"unexpected token: '{extra.text}'", text, extra.pos)
    fields: list[FieldRef | SubQuery] = []
    for item in raw_fields:
        if isinstance(item, list):
            relationship, *inner = item
            if relationship.text.lower() != "orderitems":
                detail = _NO_RELATIONSHIP.format(name=relationship.text, where="FROM part of query call")
                raise _error("INVALID_TYPE", detail, text, relationship.pos)
            sub = SubQuery("OrderItems")
            for token in inner:
                sub.fields.append(_resolve(token, "OrderItem", schema.item, schema.item_relationships, text))
            fields.append(sub)
        else:
            fields.append(_resolve(item, "Order", schema.order, schema.order_relationships, text))
    return Query(
        text=text, fields=fields, where_id=where_id, limit=limit, conditions=conditions, order_by=order_by
    )


_OPERATORS = {"=", "!=", "<", "<=", ">", ">="}


def _condition(p: _Parser, text: str, order_fields: tuple[str, ...]) -> Condition:
    column = p.next()
    name = _match(column.text, order_fields)
    if column.kind != "name" or name is None:
        raise _error("INVALID_FIELD", _NO_COLUMN.format(field=column.text, entity="Order"), text, column.pos)
    operator = p.next()
    if operator.text not in _OPERATORS:
        raise _error("MALFORMED_QUERY", f"unexpected token: '{operator.text}'", text, operator.pos)
    literal = p.next()
    spec = ORDER_FIELDS[name]
    value: Any
    if literal.kind == "name" and literal.text.lower() == "null":
        value = None
    elif spec.kind == "datetime":
        if literal.kind != "datetime":
            detail = f"value of filter criterion for field '{name}' must be of type dateTime and should not be enclosed in quotes"
            raise _error("INVALID_QUERY_FILTER_OPERATOR", detail, text, literal.pos)
        value = parse_datetime(literal.text)
    elif spec.kind == "id":
        value = re.sub(r"\\(.)", r"\1", literal.text[1:-1]) if literal.kind == "str" else ""
        if not ids.is_valid_id(value):
            raise _error("INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {value}", text, literal.pos)
    elif literal.kind == "str":
        value = re.sub(r"\\(.)", r"\1", literal.text[1:-1])
    elif literal.kind == "num":
        value = float(literal.text)
    else:
        raise _error("MALFORMED_QUERY", f"unexpected token: '{literal.text}'", text, literal.pos)
    if operator.text not in ("=", "!=") and spec.kind not in ("datetime", "date", "double"):
        raise _error(
            "INVALID_QUERY_FILTER_OPERATOR",
            f"invalid operator on field '{name}': {operator.text}",
            text,
            operator.pos,
        )
    return Condition(name, operator.text, value)


def _holds(order: Order, condition: Condition) -> bool:
    actual = order.fields.get(condition.field)
    expected = condition.value
    if condition.field == "Id" and actual is not None:
        actual, expected = ids.key15(str(actual)), ids.key15(str(expected))
    elif isinstance(expected, dt.datetime) and actual is not None:
        actual = parse_datetime(str(actual))
    if condition.op in ("=", "!="):
        return bool(actual == expected) == (condition.op == "=")
    if actual is None or expected is None:
        return False
    compare: dict[str, bool] = {
        "<": actual < expected,
        "<=": actual <= expected,
        ">": actual > expected,
        ">=": actual >= expected,
    }
    return compare[condition.op]


def _resolve(
    token: Token,
    entity: str,
    own: tuple[str, ...],
    relationships: _Relationships,
    text: str,
) -> FieldRef:
    parts = token.text.split(".")
    if len(parts) == 1:
        name = _match(parts[0], own)
        if name is None:
            raise _error("INVALID_FIELD", _NO_COLUMN.format(field=parts[0], entity=entity), text, token.pos)
        return FieldRef((name,))
    relationship = _match(parts[0], tuple(relationships))
    if relationship is None or len(parts) > 2:
        detail = _NO_RELATIONSHIP.format(
            name=parts[0] if relationship is None else parts[1], where="field path"
        )
        raise _error("INVALID_FIELD", detail, text, token.pos)
    target, target_fields = relationships[relationship]
    name = _match(parts[1], target_fields)
    if name is None:
        raise _error("INVALID_FIELD", _NO_COLUMN.format(field=parts[1], entity=target), text, token.pos)
    return FieldRef((relationship, name))


def _match(name: str, candidates: tuple[str, ...]) -> str | None:
    lowered = name.lower()
    return next((c for c in candidates if c.lower() == lowered), None)


# -- execution --------------------------------------------------------------------------------


def execute(query: Query, store: OrderStore, version: str) -> list[dict[str, Any]]:
    """The query's records (the simulator pages them)."""
    if query.where_id is not None:
        found = store.get(query.where_id)
        orders = [found] if found is not None and query.where_id.startswith(ids.PREFIX_ORDER) else []
    else:
        orders = [o for o in store if all(_holds(o, c) for c in query.conditions)]
    if query.order_by is not None:
        name, descending = query.order_by
        orders.sort(
            key=lambda o: (o.fields.get(name) is None, str(o.fields.get(name) or "")), reverse=descending
        )
    if query.limit is not None:
        orders = orders[: query.limit]
    return [_order_row(order, query, version) for order in orders]


def _order_row(order: Order, query: Query, version: str) -> dict[str, Any]:
    row: dict[str, Any] = {"attributes": attributes("Order", order.id, version)}
    for ref in query.fields:
        if isinstance(ref, SubQuery):
            items = [_item_row(item, ref, order, version) for item in order.items]
            row["OrderItems"] = {"totalSize": len(items), "done": True, "records": items} if items else None
        elif len(ref.path) == 1:
            row[ref.path[0]] = order.fields[ref.path[0]]
        else:
            relationship, name = ref.path
            related = order.related(relationship)
            _put_related(
                row,
                relationship,
                "Account" if relationship == "Account" else "Contact",
                related,
                name,
                version,
            )
    return row


def _item_row(item: OrderItem, sub: SubQuery, order: Order, version: str) -> dict[str, Any]:
    values = {
        "Id": item.Id,
        "OrderId": order.id,
        "Quantity": item.Quantity,
        "UnitPrice": item.UnitPrice,
        "Product2Id": item.product.Id,
    }
    product = {
        "Id": item.product.Id,
        "Name": item.product.Name,
        "ProductCode": item.product.ProductCode,
        "WHMCS_Product_ID__c": item.product.WHMCS_Product_ID__c,
    }
    row: dict[str, Any] = {"attributes": attributes("OrderItem", item.Id, version)}
    for ref in sub.fields:
        if len(ref.path) == 1:
            row[ref.path[0]] = values[ref.path[0]]
        else:
            _put_related(row, ref.path[0], "Product2", product, ref.path[1], version)
    return row


def _put_related(
    row: dict[str, Any],
    relationship: str,
    sobject: str,
    related: dict[str, Any] | None,
    name: str,
    version: str,
) -> None:
    if related is None:
        row[relationship] = None
        return
    nested = row.get(relationship)
    if nested is None:
        nested = row[relationship] = {"attributes": attributes(sobject, related["Id"], version)}
    nested[name] = related[name]
