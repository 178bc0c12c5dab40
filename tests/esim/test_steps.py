"""The eSIM step in-process: what its inventory claim says when the stock runs low.

Real Redis and the simulators in this process, the real lifecycle and step table; the
log lines are the ones a worker writes (JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.runs.services import Services
from provisioning.sandbox.scenario import SeededOrder, seed_orders

pytestmark = pytest.mark.fast


@pytest.fixture
def with_threshold(stack_settings: Settings) -> Iterator[Callable[[int], Services]]:
    """Services whose ESIM_STOCK_WARN_THRESHOLD is the one given (a worker configured so)."""
    made: list[Services] = []

    def make(threshold: int) -> Services:
        made.append(Services(stack_settings.model_copy(update={"esim_stock_warn_threshold": threshold})))
        return made[-1]

    yield make
    for services in made:
        services.redis.close()


def _activate(services: Services, order: SeededOrder) -> str:
    """The Order's run up to its eSIM step, the real steps: the ICCID it claimed."""
    run_id = RunId.parse(order.run_id)
    run_step(services, run_id, CHAIN["validate_payment"])
    return str(run_step(services, run_id, CHAIN["activate_esim"]).result["iccid"])


def test_low_stock_is_logged_at_the_first_claim_below_the_threshold_and_again_when_stock_is_back(
    sandbox, services, with_threshold, log_lines
):
    orders = seed_orders(sandbox, services.inventory, count=4, esim_share=1.0, seed=71)
    free = services.inventory.stock().free
    warned = with_threshold(free - 1)

    _activate(warned, orders[0])  # leaves free - 1: at the threshold, not below
    assert log_lines.named("esim_stock_low") == []
    # (A claim above the threshold ends what an earlier test of this process left below it.)
    earlier = len(log_lines.named("esim_stock_low_recovered"))

    _activate(warned, orders[1])  # free - 2: below
    _activate(warned, orders[2])  # free - 3: still below, within the summary's interval
    (low,) = log_lines.named("esim_stock_low")
    assert (low["level"], low["free"], low["threshold"], low["failures"]) == (
        "warning",
        free - 2,
        free - 1,
        1,
    )
    assert log_lines.named("esim_stock_low_repeated") == []

    _activate(with_threshold(0), orders[3])  # a batch loaded, or the threshold lowered: enough again
    (back,) = log_lines.named("esim_stock_low_recovered")[earlier:]
    assert (back["level"], back["free"], back["failures"]) == ("info", free - 4, 2)
    assert len(log_lines.named("esim_stock_low")) == 1
