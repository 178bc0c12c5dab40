"""A repeating failure is logged once, summarized once per interval, and its recovery once."""

from __future__ import annotations

from typing import Any

import pytest

from provisioning.core.repeating import RepeatingFailure


class Lines:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def failure(lines: Lines, clock: Clock) -> RepeatingFailure:
    return RepeatingFailure(lines, "source_failed", interval_s=60.0, clock=clock)  # type: ignore[arg-type]


def test_a_failure_tried_every_second_for_ten_minutes_makes_one_error_and_one_line_a_minute(
    failure: RepeatingFailure, lines: Lines, clock: Clock
) -> None:
    for _ in range(600):
        failure.failed("NOT_FOUND", remedy="deploy the event")
        clock.now += 1.0
    levels = [level for level, _, _ in lines.lines]
    assert levels[0] == "error"
    assert lines.lines[0][2] == {"failures": 1, "remedy": "deploy the event"}
    summaries = [fields for level, event, fields in lines.lines if event == "source_failed_repeated"]
    assert len(summaries) == 9  # one per full minute after the first line
    assert len(lines.lines) == 10
    assert summaries[0]["since_last_line"] == 60
    assert summaries[-1]["failures"] == 541
    assert summaries[-1]["remedy"] == "deploy the event"
    assert failure.failures == 600


def test_another_failure_is_a_first_failure_again(
    failure: RepeatingFailure, lines: Lines, clock: Clock
) -> None:
    failure.failed("NOT_FOUND")
    clock.now += 1
    failure.failed("PERMISSION_DENIED")
    assert [(level, fields["failures"]) for level, _, fields in lines.lines] == [("error", 1), ("error", 1)]


def test_the_recovery_is_one_line_with_the_count_and_only_after_a_failure(
    failure: RepeatingFailure, lines: Lines, clock: Clock
) -> None:
    assert failure.recovered() is False
    assert lines.lines == []
    for _ in range(3):
        failure.failed("NOT_FOUND")
        clock.now += 10
    assert failure.failing
    assert failure.recovered(channel="/event/X__e") is True
    assert failure.recovered() is False
    level, event, fields = lines.lines[-1]
    assert (level, event) == ("info", "source_failed_recovered")
    assert fields == {"failures": 3, "failed_for_s": 30.0, "channel": "/event/X__e"}
    assert not failure.failing
    failure.failed("NOT_FOUND")
    assert lines.lines[-1][0] == "error"


def test_a_failure_that_may_cure_itself_starts_at_warning(failure: RepeatingFailure, lines: Lines) -> None:
    failure.failed("UNAVAILABLE", level="warning")
    assert lines.lines == [("warning", "source_failed", {"failures": 1})]
    with pytest.raises(ValueError, match="error or warning"):
        failure.failed("UNAVAILABLE", level="info")
