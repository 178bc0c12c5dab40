"""Stock hygiene: profiles released and never downloaded are listed, and reclaimed on confirmation."""

from __future__ import annotations

import time

import pytest

from provisioning.core.run_id import RunId
from provisioning.ledger.esim_status import EsimState
from provisioning.ops.actions import reclaim_esims, stale_esims
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.sandbox.scenario import seed_orders

pytestmark = pytest.mark.fast

MONTH_S = 31 * 86400


def test_a_profile_never_downloaded_is_stale_after_the_reclaim_days_and_goes_back_to_stock_once(
    sandbox, services
):
    orders = seed_orders(sandbox, services.inventory, count=2, esim_share=1.0, seed=31)
    for order in orders:
        for name in CHAIN.names[:2]:
            run_step(services, RunId.parse(order.run_id), CHAIN[name])
    iccids = [
        services.ledger.orders.provisioning(o.order_id).step("activate_esim").result["iccid"] for o in orders
    ]
    # The second was downloaded (the SM-DP+ said so): not stale.
    services.ledger.esim_status.note(
        iccids[1], 3, int(time.time() * 1000), "Executed-Success", EsimState.DOWNLOADED, ""
    )
    assert stale_esims(services) == []  # released just now
    later = time.time() + MONTH_S
    assert [p.iccid for p in stale_esims(services, now=later)] == [iccids[0]]
    free = services.inventory.stock().free

    outcomes = reclaim_esims(services, [iccids[0], iccids[1]], user="ops-ann")
    assert [(o.target, o.action) for o in outcomes] == [(iccids[0], "reclaimed"), (iccids[1], "skipped")]
    assert sandbox.admin("smdp").get(f"/__admin/profiles/{iccids[0]}")["state"] == "available"
    assert services.inventory.stock().free == free + 1
    assert services.ledger.esim_status.get(iccids[0]).state is EsimState.CANCELLED
    assert stale_esims(services, now=later) == []
    again = reclaim_esims(services, [iccids[0]], user="ops-ann")
    assert [o.action for o in again] == ["skipped"]
    assert services.inventory.stock().free == free + 1
