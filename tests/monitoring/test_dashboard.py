"""The Grafana dashboard: it shows what operators need, and queries only series our targets export."""

from __future__ import annotations

import json
import re

import prometheus_client

from provisioning.ops.exporter import LedgerCollector, exported_names
from provisioning.runs.services import Services
from tests.monitoring.promql import (
    DASHBOARD,
    FLOWER_METRICS,
    dashboard_queries,
    exported_metric_names,
    metric_names,
)


def test_every_series_the_dashboard_queries_is_one_we_or_flower_export(settings):
    known = exported_metric_names(settings)
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        missing = metric_names(expr) - known
        assert not missing, f"panel {title!r} queries {missing}, which no target exports"


def test_the_dashboard_has_the_panels_operators_asked_for():
    titles = " | ".join(title for title, _ in dashboard_queries()).lower()
    for wanted in ("funnel", "failures by step", "latency", "lag", "checkpoint", "esim", "throughput"):
        assert wanted in titles, wanted
    exprs = " ".join(expr for _, expr in dashboard_queries())
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.95," in exprs


def test_the_dashboard_shows_each_step_task_and_each_systems_limits_breakers_and_api_budget(settings):
    dash = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"]}

    def queried_by(fragment: str) -> str:
        titles = [title for title in by_title if fragment in title.lower()]
        assert titles, f"no panel titled with {fragment!r}"
        return " ".join(expr for title in titles for expr in by_title[title])

    # Per step task, by its name: successes, failures and retries (Flower's events, by task).
    for kind, fragment in (
        ("succeeded", "succeeded"),
        ("failed", "failed per second"),
        ("retried", "retried"),
    ):
        exprs = queried_by(f"step tasks {fragment}")
        assert re.search(rf'flower_events_total\{{type="task-{kind}"', exprs), kind
        assert "sum by (task)" in exprs
    # The external systems: rate-limit waits, circuit breaker state, the Salesforce API budget.
    wanted = {
        "rate-limit waits": {"provisioning_step_waits_total"},
        "circuit breaker state": {"provisioning_breaker_state"},
        "salesforce api usage": {
            "provisioning_salesforce_api_requests_used",
            "provisioning_salesforce_api_requests_limit",
        },
    }
    ours = exported_names(LedgerCollector(Services(settings)))
    for fragment, names in wanted.items():
        exprs = queried_by(fragment)
        assert names <= metric_names(exprs), fragment
        # Served by `provisioning metrics` itself (not only by some target).
        assert names <= ours, names - ours
    assert 'cause="rate_limited"' in queried_by("rate-limit waits")
    assert "by (system)" in queried_by("circuit breaker state")


def test_the_dashboards_panels_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    taken: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_the_dashboard_is_importable_json_with_a_datasource_variable_and_unique_panel_ids():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "sf-provisioning"
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_flower_series_we_rely_on_are_the_ones_flower_defines():
    from flower.events import get_prometheus_metrics

    get_prometheus_metrics()
    registry = prometheus_client.REGISTRY
    defined = {
        name
        for collector in list(registry._collector_to_names)  # flower registers on the default registry
        for name in registry._collector_to_names[collector]
    }
    assert defined >= FLOWER_METRICS
