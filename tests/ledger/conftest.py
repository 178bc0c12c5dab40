"""A clock the tests move by hand (sessions and login counters take it as now)."""

from __future__ import annotations

import pytest

from tests.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)
