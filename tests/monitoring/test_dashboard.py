"""The Grafana dashboard: it shows what operators need, and queries only series our targets export."""

from __future__ import annotations

import json

import prometheus_client

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
