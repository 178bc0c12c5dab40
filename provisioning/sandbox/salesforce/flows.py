"""The record-triggered flows of ``salesforce/``, run by the sandbox as Salesforce runs them on a save.

The sandbox follows the flow files instead of a rewrite of them: for a save of an Order, each
active flow whose start matches (its object, an update, its filters true now and, with
``doesRequireRecordChangedToMeetCriteria``, not true before) runs; a before-save flow's
assignments change the record being saved, an after-save flow's record creates happen after it
(a Platform Event is published; a create that is only another's fault path is not taken). Values
are literals, ``$Record`` fields, ``$GlobalConstant.EmptyString`` (stored as null, as Salesforce
stores an empty text) and formulas, evaluated by :func:`evaluate` (string literals, ``&``, merge
fields, ``TEXT`` and ``SUBSTITUTE``: what the project's formula uses). Anything else in a flow the
sandbox cannot follow is a :class:`FlowNotSupported` when the simulator starts, never a flow
silently half-run.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from provisioning.core.errors import PicklableError
from provisioning.salesforce.metadata import FlowDecl, FlowRecordCreate, FlowValue

BEFORE_SAVE = "RecordBeforeSave"
AFTER_SAVE = "RecordAfterSave"
_UPDATES = ("Update", "CreateAndUpdate")
_OPERATORS = ("EqualTo", "NotEqualTo", "IsNull")
_TOKEN = re.compile(r'\s*(?:(?P<string>"[^"]*")|(?P<merge>\{![^}]+\})|(?P<name>[A-Z]+)|(?P<op>[(),&]))')

Value = str | dt.datetime | None
# A merge field's value ($Record.LastModifiedDate -> a datetime).
Resolve = Callable[[str], Value]


class FlowNotSupported(PicklableError):
    """The flow uses something the sandbox does not run."""


@dataclass(frozen=True)
class Create:
    """A record an after-save flow creates: its object and its fields' values."""

    flow: str
    object: str
    values: dict[str, Any]


def check(flow: FlowDecl) -> None:
    """FlowNotSupported unless the sandbox can run ``flow`` as written."""
    if flow.trigger_type not in (BEFORE_SAVE, AFTER_SAVE):
        raise FlowNotSupported(f"{flow.name}: trigger type {flow.trigger_type}")
    if flow.filter_logic not in ("and", "or"):
        raise FlowNotSupported(f"{flow.name}: filter logic {flow.filter_logic}")
    for f in flow.filters:
        if f.operator not in _OPERATORS:
            raise FlowNotSupported(f"{flow.name}: filter operator {f.operator}")
    for a in flow.assignments:
        if a.operator != "Assign" or not a.target.startswith("$Record."):
            raise FlowNotSupported(f"{flow.name}: assignment {a.operator} to {a.target}")
    for formula in flow.formulas.values():
        tokens(formula)


def starts(flow: FlowDecl, sobject: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether ``flow`` starts for an update of a ``sobject`` record from ``before`` to ``after``."""
    if flow.object != sobject or flow.record_trigger_type not in _UPDATES:
        return False
    met = _filters_met(flow, after)
    return met and not (flow.only_when_changed and _filters_met(flow, before))


def _filters_met(flow: FlowDecl, record: Mapping[str, Any]) -> bool:
    results = []
    for f in flow.filters:
        value = record.get(f.field)
        if f.operator == "IsNull":
            results.append((value is None) == (f.value.text == "true"))
        else:
            equal = value is not None and str(value) == f.value.text
            results.append(equal if f.operator == "EqualTo" else not equal)
    if not results:
        return True
    return all(results) if flow.filter_logic == "and" else any(results)


def assign(flow: FlowDecl, record: dict[str, Any], resolve: Resolve) -> dict[str, Any]:
    """A before-save flow's assignments, applied to ``record``; the fields it changed."""
    changed: dict[str, Any] = {}
    for a in flow.assignments:
        name = a.target.removeprefix("$Record.")
        value = value_of(flow, a.value, resolve)
        record[name] = changed[name] = value if value != "" else None
    return changed


def creates(flow: FlowDecl, resolve: Resolve) -> list[Create]:
    """An after-save flow's record creates on its main path (a fault path's create is not taken)."""
    fault_targets = {c.fault_target for c in flow.record_creates if c.fault_target}
    return [_create(flow, c, resolve) for c in flow.record_creates if c.name not in fault_targets]


def _create(flow: FlowDecl, create: FlowRecordCreate, resolve: Resolve) -> Create:
    values = {name: value_of(flow, value, resolve) for name, value in create.inputs.items()}
    return Create(flow=flow.name, object=create.object, values={k: _text(v) for k, v in values.items()})


def value_of(flow: FlowDecl, value: FlowValue, resolve: Resolve) -> Value:
    """A flow value: a literal, ``$Record.X``, ``$GlobalConstant.EmptyString`` or a formula's result."""
    if not value.is_reference:
        if value.kind != "stringValue":
            raise FlowNotSupported(f"{flow.name}: a {value.kind} value")
        return value.text
    if value.text == "$GlobalConstant.EmptyString":
        return ""
    if value.text.startswith("$Record."):
        return resolve(value.text)
    if value.text in flow.formulas:
        return evaluate(flow.formulas[value.text], resolve)
    raise FlowNotSupported(f"{flow.name}: a reference to {value.text}")


# -- formulas ----------------------------------------------------------------------------------


def _text(value: Value) -> str | None:
    """As a formula's TEXT: a date/time is ``YYYY-MM-DD HH:MM:SSZ`` in GMT."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return value


_FUNCTIONS: Mapping[str, Callable[..., Value]] = {
    "TEXT": _text,
    "SUBSTITUTE": lambda text, old, new: (_text(text) or "").replace(str(old), str(new)),
}


def tokens(expression: str) -> list[re.Match[str]]:
    found = list(_TOKEN.finditer(expression))
    if "".join(m.group(0) for m in found).strip() != expression.strip():
        raise FlowNotSupported(f"a formula the sandbox does not understand: {expression}")
    for m in found:
        if m.group("name") and m.group("name") not in _FUNCTIONS:
            raise FlowNotSupported(f"formula function {m.group('name')}")
    return found


def evaluate(expression: str, resolve: Resolve) -> Value:
    """A formula of string literals, ``&``, merge fields, TEXT and SUBSTITUTE."""
    found = tokens(expression)
    position = 0

    def take() -> re.Match[str]:
        nonlocal position
        if position >= len(found):
            raise FlowNotSupported(f"a formula ends too early: {expression}")
        position += 1
        return found[position - 1]

    def term() -> Value:
        token = take()
        if token.group("string"):
            return token.group("string")[1:-1]
        if token.group("merge"):
            return resolve(token.group("merge")[2:-1])
        name = token.group("name")
        if name is None or take().group("op") != "(":
            raise FlowNotSupported(f"a formula the sandbox does not understand: {expression}")
        args = [concatenation()]
        while (separator := take().group("op")) == ",":
            args.append(concatenation())
        if separator != ")":
            raise FlowNotSupported(f"a formula the sandbox does not understand: {expression}")
        return _FUNCTIONS[name](*args)

    def concatenation() -> Value:
        value = term()
        while position < len(found) and found[position].group("op") == "&":
            take()
            value = (_text(value) or "") + (_text(term()) or "")
        return value

    result = concatenation()
    if position != len(found):
        raise FlowNotSupported(f"a formula the sandbox does not understand: {expression}")
    return result
