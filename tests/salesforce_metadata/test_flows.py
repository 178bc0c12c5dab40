"""The two approval flows: when they start, what each does, the idempotency key, and the flow scanner.

The key's formula is evaluated here by a tiny evaluator of the few formula functions it uses (TEXT of
a date/time is ``YYYY-MM-DD HH:MM:SSZ`` in GMT, as Salesforce documents), so a change to it that
breaks the listener's contract (at most 80 characters) or its newness per approval fails here.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from provisioning.core.run_id import RunId
from provisioning.core.settings import DEFAULT_PROVISION_EVENT
from provisioning.listener.validation import IDEM_KEY_MAX_CHARS
from tests.salesforce_metadata.project import (
    MD,
    SCAN_FLOWS,
    SF_PROJECT,
    SOURCE,
    child,
    children,
    parse,
    require_tools,
)

FLOWS = SOURCE / "flows"
BEFORE_SAVE = FLOWS / "Order_SetActivatingOnApproval.flow-meta.xml"
AFTER_SAVE = FLOWS / "Order_PublishProvisionRequest.flow-meta.xml"
SCAN_TIMEOUT_S = 120.0


def start_of(path: Path) -> dict[str, object]:
    (start,) = children(parse(path), "start")
    return {
        "object": child(start, "object"),
        "recordTriggerType": child(start, "recordTriggerType"),
        "triggerType": child(start, "triggerType"),
        "changed": child(start, "doesRequireRecordChangedToMeetCriteria"),
        "logic": child(start, "filterLogic"),
        "filters": sorted(
            (child(f, "field"), child(f, "operator"), child(f.find(MD + "value"), "stringValue"))
            for f in children(start, "filters")
        ),
    }


@pytest.mark.fast
def test_both_flows_start_when_an_order_is_updated_to_status_activated_and_only_then():
    before, after = start_of(BEFORE_SAVE), start_of(AFTER_SAVE)
    assert before.pop("triggerType") == "RecordBeforeSave"
    assert after.pop("triggerType") == "RecordAfterSave"
    assert (
        before
        == after
        == {
            "object": "Order",
            "recordTriggerType": "Update",
            # Only when the update makes the condition true: an edit of an activated Order starts nothing.
            "changed": "true",
            "logic": "and",
            "filters": [("Status", "EqualTo", "Activated")],
        }
    )
    for path in (BEFORE_SAVE, AFTER_SAVE):
        assert child(parse(path), "status") == "Active", path.name


@pytest.mark.fast
def test_the_before_save_flow_marks_the_order_activating_and_the_after_save_flow_never_updates_it():
    before = parse(BEFORE_SAVE)
    assigned = {
        child(item, "assignToReference"): item.find(MD + "value")
        for assignment in children(before, "assignments")
        for item in children(assignment, "assignmentItems")
    }
    assert child(assigned["$Record.Activation_Status__c"], "stringValue") == "Activating"
    assert child(assigned["$Record.Activation_Error__c"], "elementReference") == "$GlobalConstant.EmptyString"
    after = parse(AFTER_SAVE)
    assert children(after, "recordUpdates") == [], "an after-save update of the Order would save it twice"
    objects = sorted(child(c, "object") or "" for c in children(after, "recordCreates"))
    assert objects == sorted([DEFAULT_PROVISION_EVENT, "Task"])


@pytest.mark.fast
def test_a_failed_publish_goes_to_the_task_for_the_approver_and_does_not_roll_the_approval_back():
    after = parse(AFTER_SAVE)
    creates = {child(c, "object"): c for c in children(after, "recordCreates")}
    fault = creates[DEFAULT_PROVISION_EVENT].find(MD + "faultConnector")
    assert fault is not None
    assert child(fault, "targetReference") == child(creates["Task"], "name")


# -- the idempotency key ---------------------------------------------------------------------------

Value = str | dt.datetime


def salesforce_text(value: Value) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return value


FUNCTIONS: Mapping[str, Callable[..., Value]] = {
    "TEXT": salesforce_text,
    "SUBSTITUTE": lambda text, old, new: salesforce_text(text).replace(old, new),
}
TOKEN = re.compile(r'\s*(?:(?P<string>"[^"]*")|(?P<merge>\{![^}]+\})|(?P<name>[A-Z]+)|(?P<op>[(),&]))')


def evaluate(expression: str, merge_fields: Mapping[str, Value]) -> Value:
    """Evaluate a formula of string literals, ``&``, merge fields and the FUNCTIONS above."""
    tokens = [m for m in TOKEN.finditer(expression)]
    assert "".join(m.group(0) for m in tokens).strip() == expression.strip(), (
        "a part of the formula is not understood"
    )
    position = 0

    def take() -> re.Match[str]:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def term() -> Value:
        token = take()
        if token.group("string"):
            return token.group("string")[1:-1]
        if token.group("merge"):
            return merge_fields[token.group("merge")[2:-1]]
        name = token.group("name")
        assert name in FUNCTIONS, f"the test's evaluator does not know {name}"
        assert take().group("op") == "("
        args = [concatenation()]
        while (separator := take().group("op")) == ",":
            args.append(concatenation())
        assert separator == ")"
        return FUNCTIONS[name](*args)

    def concatenation() -> Value:
        value = term()
        while position < len(tokens) and tokens[position].group("op") == "&":
            take()
            value = salesforce_text(value) + salesforce_text(term())
        return value

    result = concatenation()
    assert position == len(tokens)
    return result


def idem_key_formula() -> str:
    flow = parse(AFTER_SAVE)
    creates = next(
        c for c in children(flow, "recordCreates") if child(c, "object") == DEFAULT_PROVISION_EVENT
    )
    reference = next(
        child(a.find(MD + "value"), "elementReference")
        for a in children(creates, "inputAssignments")
        if child(a, "field") == "IdemKey__c"
    )
    formula = next(f for f in children(flow, "formulas") if child(f, "name") == reference)
    assert child(formula, "dataType") == "String"
    return child(formula, "expression") or ""


@pytest.mark.fast
def test_the_idempotency_key_is_short_enough_for_the_listener_and_new_for_each_approval():
    formula = idem_key_formula()
    approved = dt.datetime(2026, 12, 5, 8, 51, 0, tzinfo=dt.UTC)
    key = evaluate(formula, {"$Record.LastModifiedDate": approved})
    assert key == "approval-20261205T085100Z"
    again = evaluate(formula, {"$Record.LastModifiedDate": approved + dt.timedelta(seconds=1)})
    assert again != key
    assert isinstance(key, str)
    assert len(key) <= IDEM_KEY_MAX_CHARS
    # It makes a run id that parses back to the same Order and key (no ':' or spaces in it).
    run = RunId.for_event("8015g00000ABCDEAA5", key)
    assert RunId.parse(str(run)) == run
    assert re.fullmatch(r"[A-Za-z0-9-]+", key)


@pytest.mark.fast
def test_the_formula_evaluator_refuses_what_it_does_not_understand():
    with pytest.raises(AssertionError):
        evaluate('LEFT("approval", 3)', {})
    with pytest.raises(AssertionError):
        evaluate('"a" + "b"', {})


# -- Lightning Flow Scanner ------------------------------------------------------------------------


def scan(*files: Path) -> tuple[int, dict[str, object]]:
    require_tools()
    result = subprocess.run(
        ["node", str(SCAN_FLOWS), *map(str, files)],
        cwd=SF_PROJECT,
        capture_output=True,
        text=True,
        timeout=SCAN_TIMEOUT_S,
        check=False,
    )
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(
            f"scan-flows printed no JSON (exit {result.returncode}): {result.stderr}"
        ) from None


def test_every_flow_passes_every_default_rule_of_the_flow_scanner_with_none_waived():
    code, report = scan()
    assert report["errors"] == []
    assert {f["flow"] for f in report["flows"]} == {
        "Order_SetActivatingOnApproval",
        "Order_PublishProvisionRequest",
        "Order_PublishCancelRequest",
    }
    violations = {f["flow"]: f["violations"] for f in report["flows"] if f["violations"]}
    assert violations == {}
    assert code == 0
    # The default rule set ran, including the rules these flows are shaped by.
    assert {
        "MissingFaultPath",
        "RecursiveAfterUpdate",
        "SameRecordFieldUpdates",
        "TriggerOrder",
        "FlowDescription",
    } <= set(report["rules"])


def test_the_flow_scanner_flags_the_publishing_flow_without_its_fault_path(tmp_path):
    broken = tmp_path / AFTER_SAVE.name
    broken.write_text(
        re.sub(r"\s*<faultConnector>.*?</faultConnector>", "", AFTER_SAVE.read_text(), flags=re.S)
    )
    code, report = scan(broken)
    assert code == 1
    (flow,) = report["flows"]
    assert "MissingFaultPath" in {v["rule"] for v in flow["violations"]}
