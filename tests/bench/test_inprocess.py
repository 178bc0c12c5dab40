"""The overhead goal's in-process term (``bench.inprocess``): the steps of real runs, no Celery, in a
process of their own, in one thread or several."""

from __future__ import annotations

import pytest

from bench.inprocess import measure
from provisioning.ledger import RunState
from provisioning.runs.services import Services
from provisioning.sandbox.scenario import count_effects, seed_orders


@pytest.mark.parametrize("threads", [1, 3])
def test_every_run_is_done_once_and_its_cpu_and_tasks_are_reported_per_run(
    sandbox, stack_settings, threads: int
) -> None:
    services = Services(stack_settings)
    orders = seed_orders(sandbox, services.inventory, count=7, esim_share=0.5, seed=25)
    cpu_ms, tasks = measure(stack_settings, [o.run_id for o in orders], threads=threads)
    runs = services.ledger.runs.get_many([o.run_id for o in orders])
    assert [r.state for r in runs] == [RunState.DONE] * len(orders)
    # The first run warms the child's connections up and is not counted: a task per step of the
    # six others, five for an eSIM Order and four for a physical one.
    esim = sum(1 for o in orders[1:] if o.esim)
    assert tasks == pytest.approx((5 * esim + 4 * (len(orders) - 1 - esim)) / (len(orders) - 1))
    assert 0 < cpu_ms < 1000
    assert count_effects(sandbox).whmcs_orders == len(orders)
    services.redis.close()
