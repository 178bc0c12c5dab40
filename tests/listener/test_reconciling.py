"""The leader's backfill sweep when Salesforce keeps refusing it: later and later, one line, then one more."""

from __future__ import annotations

from typing import Any

import pytest

from provisioning.core.settings import Settings
from provisioning.listener import reconciling
from provisioning.listener.metrics import ListenerMetrics
from provisioning.listener.reconciling import Reconciler
from provisioning.salesforce.errors import SalesforceAuthError, SalesforceConnectionError

pytestmark = pytest.mark.fast

EVERY_S = 1.0
CAP_S = 8.0


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Lines:
    recorded = Lines()
    monkeypatch.setattr(reconciling, "log", recorded)
    return recorded


@pytest.fixture
def reconciler(lines: Lines) -> Reconciler:
    settings = Settings(_env_file=None, sf_refused_retry_max_s=CAP_S)  # type: ignore[call-arg]
    metrics = ListenerMetrics(dict)
    return Reconciler(settings, services=None, publisher=None, metrics=metrics, idle_s=60)  # type: ignore[arg-type]


def test_a_refused_backfill_waits_longer_each_time_up_to_the_cap_and_logs_once_with_the_remedy(
    reconciler: Reconciler, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = SalesforceAuthError(
        "Salesforce login refused", error_code="invalid_grant", remedy="upload the cert"
    )

    def backfill(*_: Any) -> list[Any]:
        raise refused

    monkeypatch.setattr(reconciling, "backfill_orders", backfill)
    waits = [reconciler.backfill(EVERY_S) for _ in range(10)]
    assert all(EVERY_S <= w <= CAP_S for w in waits)
    assert min(waits[4:]) >= CAP_S / 2  # at the cap: 4 to 8 s, never the 1 s interval again
    assert [(level, event) for level, event, _ in lines.lines] == [("error", "backfill_sweep_failed")]
    assert lines.lines[0][2]["remedy"] == "upload the cert"
    assert reconciler.metrics.backfill_failures._value.get() == 10

    monkeypatch.setattr(reconciling, "backfill_orders", lambda *_: [])
    assert reconciler.backfill(EVERY_S) == EVERY_S
    level, event, fields = lines.lines[-1]
    assert (level, event, fields["failures"]) == ("info", "backfill_sweep_failed_recovered", 10)
    assert reconciler.backfill(EVERY_S) == EVERY_S
    assert len(lines.lines) == 2


def test_a_backfill_that_fails_transiently_starts_at_warning(
    reconciler: Reconciler, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    def backfill(*_: Any) -> list[Any]:
        raise SalesforceConnectionError("Salesforce query: connection refused")

    monkeypatch.setattr(reconciling, "backfill_orders", backfill)
    reconciler.backfill(EVERY_S)
    assert [(level, event) for level, event, _ in lines.lines] == [("warning", "backfill_sweep_failed")]
