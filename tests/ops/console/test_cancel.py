"""Cancelling an Order from the console: operators only, CSRF-protected, the dry run's confirmation first."""

from __future__ import annotations

import re

import pytest

from provisioning.core.run_id import RunId
from provisioning.ledger import RunState
from provisioning.ops.console.app import create_app
from provisioning.runs.cancellation import cancellation_run
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.sandbox.scenario import seed_orders
from tests.ops.console.conftest import console_settings, csrf_token, login


@pytest.fixture
def app(stack_settings, console_users, services):
    return create_app(console_settings(stack_settings, console_users), services=services)


@pytest.fixture
def order(sandbox, services):
    (seeded,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=91)
    run_id = RunId.parse(seeded.run_id)
    for name in ("validate_payment", "activate_esim"):
        run_step(services, run_id, CHAIN[name])
    return seeded


def _text(response) -> str:
    return response.get_data(as_text=True)


def test_a_viewer_sees_the_orders_esim_but_no_cancel_button_and_cannot_cancel(app, services, order):
    client = app.test_client()
    login(client, "victor")
    page = client.get(f"/orders/{order.order_id}")
    assert "released since" in _text(page)
    assert 'id="cancel-order"' not in _text(page)
    answer = client.post(
        f"/orders/{order.order_id}/cancel/dry-run",
        data={"reason": "r", "csrf_token": csrf_token(_text(page))},
    )
    assert answer.status_code == 403
    assert services.ledger.orders.provisioning(order.order_id).cancel is None


def test_an_operator_cancels_after_a_dry_run_and_only_with_its_confirmation(app, services, order):
    client = app.test_client()
    login(client, "olivia")
    page = client.get(f"/orders/{order.order_id}")
    assert 'id="cancel-order"' in _text(page)
    token = csrf_token(_text(page))
    no_csrf = client.post(f"/orders/{order.order_id}/cancel", data={"reason": "fraud", "confirmation": "x"})
    assert no_csrf.status_code == 400
    forged = client.post(
        f"/orders/{order.order_id}/cancel", data={"reason": "fraud", "confirmation": "x", "csrf_token": token}
    )
    assert forged.status_code == 400
    assert services.ledger.orders.provisioning(order.order_id).cancel is None

    dry = client.post(
        f"/orders/{order.order_id}/cancel/dry-run", data={"reason": "fraud", "csrf_token": token}
    )
    assert dry.status_code == 200
    assert "would cancel" in _text(dry)
    assert "return it to stock" in _text(dry)
    assert services.ledger.orders.provisioning(order.order_id).cancel is None
    confirmation = re.search(r'name="confirmation" value="([^"]+)"', _text(dry)).group(1)
    # The confirmation covers this reason only.
    other_reason = client.post(
        f"/orders/{order.order_id}/cancel",
        data={"reason": "something else", "confirmation": confirmation, "csrf_token": token},
    )
    assert other_reason.status_code == 400
    done = client.post(
        f"/orders/{order.order_id}/cancel",
        data={"reason": "fraud", "confirmation": confirmation, "csrf_token": token},
    )
    assert done.status_code == 200
    cancel = services.ledger.orders.provisioning(order.order_id).cancel
    assert (cancel.reason, cancel.by) == ("fraud", "console:olivia")
    assert services.ledger.runs.get(cancellation_run(order.order_id, 1)).state is RunState.QUEUED
    after = _text(client.get(f"/orders/{order.order_id}"))
    assert 'id="cancel-order"' not in after
    assert "by console:olivia: fraud" in after
