"""What the rules and the dashboard query, and what our targets export: shared by the monitoring tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from provisioning.core.settings import Settings
from provisioning.listener.metrics import ListenerMetrics
from provisioning.ops.exporter import LedgerCollector, exported_names
from provisioning.runs.services import Services
from provisioning.salesforce.pubsub.client import COUNTER_NAMES as PUBSUB_COUNTERS
from provisioning.salesforce.streaming import StreamCounters

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "monitoring" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "provisioning-dashboard.json"
RUNBOOK = ROOT / "docs" / "operations.md"

# Grafana's variables, as the dashboard's queries use them, with values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m"}
# What Flower 2.x exports on /metrics (checked against flower's own definitions in the tests).
FLOWER_METRICS = {
    "flower_events_total",
    "flower_task_runtime_seconds_bucket",
    "flower_task_runtime_seconds_sum",
    "flower_task_runtime_seconds_count",
    "flower_task_prefetch_time_seconds",
    "flower_worker_prefetched_tasks",
    "flower_worker_online",
    "flower_worker_number_of_currently_executing_tasks",
}
# Prometheus's own series.
PROMETHEUS_SERIES = {"up"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan", "atan2",
}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\()?")


def grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads (functions, keywords, labels and durations left out)."""
    text = grafana_to_promql(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    return {
        m.group(1) for m in _NAME.finditer(text) if m.group(2) is None and m.group(1).lower() not in _KEYWORDS
    }


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def exported_metric_names(settings: Settings) -> set[str]:
    """Every series name our targets export: provisioning metrics, a listener, Flower, Prometheus itself,
    and the recording rules of alerts.yml."""
    ours = exported_names(LedgerCollector(Services(settings)))
    # Either transport's counters: the names a listener exports depend on SF_EVENTS_TRANSPORT.
    both = {**StreamCounters()(), **dict.fromkeys(PUBSUB_COUNTERS, 0)}
    listener_text = generate_latest(ListenerMetrics(lambda: both).registry).decode()
    listener = {s.name for f in text_string_to_metric_families(listener_text) for s in f.samples}
    recorded = {rule["record"] for rule in load_rules() if "record" in rule}
    return ours | listener | FLOWER_METRICS | PROMETHEUS_SERIES | recorded


def markdown_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors
