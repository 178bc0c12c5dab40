"""`provisioning salesforce check` (and its lines in `provisioning check`) against the sandbox's org, as deployed
and with pieces taken away: each problem named on a line of its own with its fix, exit 0 only when all hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.settings import Settings
from provisioning.ops.checks.salesforce_org import _type_problems
from provisioning.salesforce.client import OrderFieldNames, SalesforceClient
from provisioning.salesforce.metadata import project
from provisioning.sandbox.runner import Sandbox

CLI = str(Path(sys.executable).with_name("provisioning"))
CHANNEL = "/event/OrderProvisionRequested__e"


def run(sandbox: Sandbox, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_"))}
    full.update(sandbox.env(), COLUMNS="200", **env)
    return subprocess.run(
        [CLI, *args], env=full, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False
    )


def lines(out: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The table by item name: {name: "STATUS  detail"}, a wrapped detail's lines joined again."""
    table: dict[str, str] = {}
    name = ""
    for line in out.stdout.splitlines():
        if line.startswith(" ") and name:
            table[name] += " " + line.strip()
            continue
        status, rest = line[:6].strip(), line[6:]
        name, _, detail = rest.partition("  ")
        name = name.strip()
        table[name] = f"{status}  {detail.strip()}"
    return table


def org(sandbox: Sandbox, **knobs: list[str]) -> None:
    sandbox.admin("salesforce").post("/__admin/org", knobs)


def expected_items() -> set[str]:
    client = SalesforceClient(auth=None, session=None, field_names=OrderFieldNames())  # type: ignore[arg-type]
    fields = {f"field {u.sobject}.{u.name}" for u in client.fields_used()}
    (event,) = project().events()
    fields |= {f"field {event.name}.{name}" for name in event.fields}
    flows = {f"flow {name}" for name in project().flows}
    return {"login", *fields, f"event {CHANNEL}", *flows, "api budget"}


@pytest.mark.parametrize("transport", ["pubsub", "cometd"])
def test_the_check_passes_against_the_sandbox_with_one_line_per_item(
    sandbox: Sandbox, tmp_path: Path, transport: str
) -> None:
    out = run(sandbox, tmp_path, "salesforce", "check", SF_EVENTS_TRANSPORT=transport)
    assert out.returncode == 0, out.stdout + out.stderr
    table = lines(out)
    assert set(table) == expected_items()
    assert all(line.startswith("OK") for line in table.values()), out.stdout
    assert (
        "Picklist (Pending, Activating, Activated, Failed, Cancelling, Cancelled) (SF_FIELD_ACTIVATION_STATUS),"
        " read and written" in (table["field Order.Activation_Status__c"])
    )
    assert "daily API requests left (Sforce-Limit-Info: api-usage=" in table["api budget"]
    assert ("Pub/Sub GetTopic" if transport == "pubsub" else "CometD") in table[f"event {CHANNEL}"]


def test_a_removed_field_fails_the_check_naming_it_its_setting_and_its_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    org(sandbox, removed_fields=["Order.EID__c"])
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 1
    line = lines(out)["field Order.EID__c"]
    assert line.startswith("FAIL")
    assert "Order.EID__c is not in the org, or the integration user may not read it" in line
    assert "objects/Order/fields/EID__c.field-meta.xml" in line
    assert "SF_FIELD_EID" in line
    assert [name for name, line in lines(out).items() if line.startswith("FAIL")] == ["field Order.EID__c"]


def test_a_missing_edit_permission_fails_naming_the_field_and_the_permission_set(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    org(sandbox, read_only_fields=["Order.WHMCS_Order_ID__c"])
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 1
    line = lines(out)["field Order.WHMCS_Order_ID__c"]
    assert line.startswith("FAIL")
    assert "grant Edit on Order.WHMCS_Order_ID__c in the permission set Provisioning_Integration" in line


@pytest.mark.parametrize("transport", ["pubsub", "cometd"])
def test_an_event_the_user_may_not_read_fails_saying_to_grant_read_on_it(
    sandbox: Sandbox, tmp_path: Path, transport: str
) -> None:
    org(sandbox, unreadable_objects=["OrderProvisionRequested__e"])
    out = run(sandbox, tmp_path, "salesforce", "check", SF_EVENTS_TRANSPORT=transport)
    assert out.returncode == 1
    table = lines(out)
    for name in (f"event {CHANNEL}", "object OrderProvisionRequested__e"):
        assert table[name].startswith("FAIL"), out.stdout
        assert "grant Read on the Platform Event OrderProvisionRequested__e" in table[name]


@pytest.mark.parametrize("transport", ["pubsub", "cometd"])
def test_a_misspelled_channel_or_field_setting_is_named_not_found_at_run_time(
    sandbox: Sandbox, tmp_path: Path, transport: str
) -> None:
    wrong = "/event/OrderProvisonRequested__e"
    out = run(
        sandbox,
        tmp_path,
        "salesforce",
        "check",
        SF_EVENTS_TRANSPORT=transport,
        SF_PROVISION_EVENT_CHANNEL=wrong,
        SF_FIELD_SIM_TYPE="SIM_Typ__c",
    )
    assert out.returncode == 1
    table = lines(out)
    assert table[f"event {wrong}"].startswith("FAIL")
    assert "The org has no Platform Event /event/OrderProvisonRequested__e" in table[f"event {wrong}"]
    assert "set SF_PROVISION_EVENT_CHANNEL to the channel of an event it has" in table[f"event {wrong}"]
    assert table["object OrderProvisonRequested__e"].startswith("FAIL")
    assert table["field Order.SIM_Typ__c"].startswith("FAIL")
    assert "SF_FIELD_SIM_TYPE" in table["field Order.SIM_Typ__c"]


def test_an_inactive_flow_fails_naming_the_flow_and_how_to_activate_it(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    org(sandbox, inactive_flows=["Order_PublishProvisionRequest"])
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 1
    table = lines(out)
    assert table["flow Order_PublishProvisionRequest"].startswith("FAIL  deployed but inactive")
    assert table["flow Order_SetActivatingOnApproval"].startswith("OK")


def test_every_problem_is_a_line_of_its_own_in_one_run(sandbox: Sandbox, tmp_path: Path) -> None:
    org(
        sandbox,
        removed_fields=["Order.EID__c", "Product2.WHMCS_Product_ID__c"],
        unreadable_fields=["Contact.Email"],
        read_only_fields=["Order.Activated_At__c"],
        inactive_flows=["Order_SetActivatingOnApproval"],
    )
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 1
    failed = sorted(name for name, line in lines(out).items() if line.startswith("FAIL"))
    assert failed == [
        "field Contact.Email",
        "field Order.Activated_At__c",
        "field Order.EID__c",
        "field Product2.WHMCS_Product_ID__c",
        "flow Order_SetActivatingOnApproval",
    ]


def test_a_budget_nearly_spent_is_a_warning_and_still_exits_0(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.admin("salesforce").post("/__admin/limits", {"api_used": 95_000})
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 0, out.stdout
    assert lines(out)["api budget"].startswith("WARN  4,9")


def test_a_refused_login_is_one_line_and_nothing_else_is_asked(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.admin("salesforce").post("/__admin/app", {"foreign_certificate": True})
    out = run(sandbox, tmp_path, "salesforce", "check")
    assert out.returncode == 1
    table = lines(out)
    assert table["login"].startswith("FAIL  SalesforceAuthError")
    assert table["org"] == "SKIP  not checked: login failed (above)"
    assert len(table) == 2


def test_a_key_file_that_holds_no_key_is_the_login_s_failure_not_a_traceback(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("not a key\n")
    out = run(sandbox, tmp_path, "salesforce", "check", SF_PRIVATE_KEY_FILE=str(garbage))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert lines(out)["login"].startswith("FAIL  SalesforceAuthError:")
    assert "is not an unencrypted PEM private key" in lines(out)["login"]


def test_a_missing_key_file_is_a_setting_problem_exit_2(sandbox: Sandbox, tmp_path: Path) -> None:
    out = run(sandbox, tmp_path, "salesforce", "check", SF_PRIVATE_KEY_FILE=str(tmp_path / "missing.key"))
    assert out.returncode == 2
    assert "SF_PRIVATE_KEY_FILE" in out.stderr


def test_provisioning_check_includes_the_org_s_lines(sandbox: Sandbox, tmp_path: Path) -> None:
    org(sandbox, removed_fields=["Order.EID__c"])
    out = run(
        sandbox,
        tmp_path,
        "check",
        REDIS_URL="redis://127.0.0.1:6379/0",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
    )
    assert out.returncode == 1
    table = lines(out)
    assert table["salesforce"].startswith("OK")
    assert table["field Order.EID__c"].startswith("FAIL")
    assert table["flow Order_PublishProvisionRequest"].startswith("OK")
    # The login and the subscription are said once, by the probes above them.
    assert "login" not in table
    assert f"event {CHANNEL}" not in table


def test_a_check_without_the_salesforce_settings_says_which_are_missing(tmp_path: Path) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SF_")}
    out = subprocess.run(
        [CLI, "salesforce", "check"],
        env=full,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "SF_LOGIN_URL" in out.stderr


# -- types: what salesforce/ declares against what describe says ----------------------------------


def field(**found: Any) -> dict[str, Any]:
    return {"type": "string", "length": 255, "picklistValues": [], **found}


@pytest.mark.fast
def test_a_number_field_may_hold_a_text_id_the_service_only_reads_but_not_one_it_writes() -> None:
    client_id = project().field("Account", "WHMCS_Client_ID__c")
    order_id = project().field("Order", "WHMCS_Order_ID__c")
    assert client_id is not None
    assert order_id is not None
    assert _type_problems(client_id, field(type="double"), writes=False) == []
    assert _type_problems(order_id, field(type="double"), writes=True) == [
        "it is a double field, salesforce/ declares Text(20)"
    ]


@pytest.mark.fast
def test_a_shorter_text_field_than_the_service_writes_and_a_picklist_without_its_values_are_problems() -> (
    None
):
    iccid = project().field("Order", "ESIM_ICCID__c")
    status = project().field("Order", "Activation_Status__c")
    assert iccid is not None
    assert status is not None
    assert _type_problems(iccid, field(length=19), writes=True) == [
        "it is Text(19), the service writes up to 22 characters (salesforce/ declares Text(22))"
    ]
    values = [{"value": v, "active": True} for v in ("Pending", "Activating")]
    (problem,) = _type_problems(status, field(type="picklist", picklistValues=values), writes=True)
    assert "lacks Activated, Failed" in problem
    assert _type_problems(status, field(type="string"), writes=True) != []


@pytest.mark.fast
def test_the_fields_checked_follow_the_settings() -> None:
    settings = Settings(_env_file=None, sf_field_eid="Chip_EID__c")
    client = SalesforceClient(auth=None, session=None, field_names=OrderFieldNames.from_settings(settings))  # type: ignore[arg-type]
    names = {(u.sobject, u.name) for u in client.fields_used()}
    assert ("Order", "Chip_EID__c") in names
    assert ("Order", "EID__c") not in names
