"""The floor's tasks can be made to wait (``bench.floor_io``), read from the environment; its pools from ``--pools``."""

from __future__ import annotations

import argparse

import pytest

from bench.floor import parse_pools
from bench.floor_tasks import WAIT_ENV, parse_wait


@pytest.mark.parametrize(
    ("value", "wait"),
    [("", ("", 0.0)), ("ping:6", ("ping", 6.0)), ("sleep:0.01", ("sleep", 0.01))],
)
def test_a_wait_is_no_wait_some_round_trips_or_a_sleep(value: str, wait: tuple[str, float]) -> None:
    assert parse_wait(value) == wait


@pytest.mark.parametrize("value", ["ping", "nap:3", "sleep:", "ping:x", "ping:1.5", "sleep:-1"])
def test_a_malformed_wait_names_the_variable_and_the_forms_it_takes(value: str) -> None:
    with pytest.raises(
        ValueError, match=rf"{WAIT_ENV}=.*ping:<round trips> \(a whole number\) or sleep:<seconds>"
    ):
        parse_wait(value)


def test_pools_are_read_as_pool_and_concurrency_pairs() -> None:
    assert parse_pools("threads:8, prefork:2,solo:1") == [("threads", 8), ("prefork", 2), ("solo", 1)]


@pytest.mark.parametrize("value", ["threads", "threads:0", "threads:x", "gevent:100", "threads:8,"])
def test_a_malformed_pool_names_itself_and_the_form_it_takes(value: str) -> None:
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"expected pool:concurrency.*threads, prefork, solo"
    ):
        parse_pools(value)
