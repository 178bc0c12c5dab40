"""The alert rules: valid for promtool, unit-tested with promtool, linked to the runbook, on exported series."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.monitoring.promql import (
    ALERT_TESTS,
    ALERTS,
    RUNBOOK,
    exported_metric_names,
    load_rules,
    markdown_anchors,
    metric_names,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
REQUIRED_ALERTS = {
    "NoLeaderListener",
    "ListenerStalled",
    "BreakerOpen",
    "SalesforceApiBudgetLow",
    "ListenerLagging",
    "OrdersWaitingInActivating",
    "StepFailureRateHigh",
    "EsimStockLow",
    "FailedRunsGrowing",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ALERTS.parent
    )


def test_promtool_accepts_the_rules():
    checked = _promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_rules_unit_tests_pass_under_promtool():
    tested = _promtool("test", "rules", ALERT_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_fails_a_broken_expectation_so_the_unit_tests_can_fail(tmp_path):
    broken = yaml.safe_load(ALERT_TESTS.read_text())
    broken["rule_files"] = [str(ALERTS)]
    case = next(t for t in broken["tests"] if t["name"] == "the listener lags ten minutes behind")
    case["alert_rule_test"][1]["exp_alerts"] = []
    path = tmp_path / "broken.test.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _promtool("test", "rules", str(path)).returncode != 0


def test_every_alert_the_brief_asks_for_exists_and_each_is_tested_firing():
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts >= REQUIRED_ALERTS
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == alerts


def test_every_alert_has_a_severity_a_summary_and_a_runbook_link_to_an_anchor_that_exists():
    anchors = markdown_anchors(RUNBOOK.read_text())
    for rule in (r for r in load_rules() if "alert" in r):
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in docs/operations.md"


def test_every_series_the_rules_read_is_exported(settings):
    known = exported_metric_names(settings)
    for rule in load_rules():
        missing = metric_names(rule["expr"]) - known
        assert not missing, (
            f"{rule.get('alert') or rule.get('record')} reads {missing}, which nothing exports"
        )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (step) (rate(a_total{x="b"}[5m])) / on (step) b_count', {"a_total", "b_count"}),
        ("time() - max(c_seconds) > 1e3", {"c_seconds"}),
        ("histogram_quantile(0.95, sum by (le) (rate(d_bucket[$__rate_interval])))", {"d_bucket"}),
        ("e:ratio:30m > 2 * e:ratio:1d + 0.05 and f offset 1h", {"e:ratio:30m", "e:ratio:1d", "f"}),
    ],
)
def test_series_names_are_read_from_promql_without_functions_labels_or_durations(expr, names):
    assert metric_names(expr) == names


def test_the_example_prometheus_configuration_is_valid_and_scrapes_the_jobs_the_alerts_name():
    checked = _promtool("check", "config", "prometheus.example.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((ALERTS.parent / "prometheus.example.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {"provisioning", "listener", "flower"}
