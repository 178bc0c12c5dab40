"""The floor's tasks can be made to wait (``bench.floor_io``): the wait is read from the environment."""

from __future__ import annotations

import pytest

from bench.floor_tasks import WAIT_ENV, parse_wait


@pytest.mark.parametrize(
    ("value", "wait"),
    [("", ("", 0.0)), ("ping:6", ("ping", 6.0)), ("sleep:0.01", ("sleep", 0.01))],
)
def test_a_wait_is_no_wait_some_round_trips_or_a_sleep(value: str, wait: tuple[str, float]) -> None:
    assert parse_wait(value) == wait


@pytest.mark.parametrize("value", ["ping", "nap:3", "sleep:", "ping:x"])
def test_a_malformed_wait_names_the_variable_and_the_forms_it_takes(value: str) -> None:
    with pytest.raises(ValueError, match=rf"{WAIT_ENV}=.*ping:<round trips> or sleep:<seconds>"):
        parse_wait(value)
