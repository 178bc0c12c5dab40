"""The operators' commands, run as a person would: status, failed, requeue (and --dry-run), quarantine."""

import json
import os
import subprocess
import sys
from pathlib import Path

from provisioning.ledger import RunState
from provisioning.runs import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, seed_orders, wait_until

CLI = str(Path(sys.executable).with_name("provisioning"))


def _cli(settings, *args):
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _state(services, run_id):
    run = services.ledger.get(run_id)
    return run.state if run else None


def test_failed_status_and_requeue_bring_a_fixed_order_to_activated_without_repeating_effects(
    sandbox, stack_settings, services, workers
):
    ok, bad = seed_orders(sandbox, services.inventory, count=2, esim_share=1.0, without_pay_method=1)
    workers(concurrency=4)
    app = make_publisher(stack_settings)
    publish_run(app, ok.run_id)
    publish_run(app, bad.run_id)
    wait_until(
        lambda: (
            _state(services, ok.run_id) is RunState.DONE and _state(services, bad.run_id) is RunState.FAILED
        )
    )

    failed = _cli(stack_settings, "failed", "--json")
    assert failed.returncode == 0
    rows = json.loads(failed.stdout)
    assert [(r["run_id"], r["step"]) for r in rows] == [(bad.run_id, "validate_payment")]
    assert "no valid payment method" in rows[0]["reason"]
    table = _cli(stack_settings, "failed")
    assert bad.run_id in table.stdout

    status = _cli(stack_settings, "status", ok.order_id, "--json")
    (run,) = json.loads(status.stdout)
    assert run["state"] == "done"
    assert run["steps"]["create_whmcs_order"]["result"]["whmcs_order_id"] >= 1
    assert "example.test" not in status.stdout  # no customer e-mail address in what operators see
    assert "Customer" not in status.stdout

    dry = _cli(stack_settings, "requeue", "--all", "--dry-run", "--json")
    assert json.loads(dry.stdout)[0]["action"] == "would requeue"
    assert _state(services, bad.run_id) is RunState.FAILED
    assert (
        sandbox.admin("salesforce").get(f"/__admin/orders/{bad.order_id}")["Activation_Status__c"] == "Failed"
    )

    not_failed = _cli(stack_settings, "requeue", ok.run_id)
    assert not_failed.returncode == 1
    assert "done, not failed" in not_failed.stdout
    assert _state(services, ok.run_id) is RunState.DONE

    sandbox.admin("whmcs").post(
        f"/__admin/clients/{bad.whmcs_client_id}/paymethods", {"type": "CreditCard", "expiry_date": "12/30"}
    )
    done = _cli(stack_settings, "requeue", "--all")
    assert done.returncode == 0, done.stderr
    assert "resumed at validate_payment" in done.stdout
    wait_until(lambda: _state(services, bad.run_id) is RunState.DONE)
    effects = count_effects(sandbox)
    assert effects.activated == effects.whmcs_orders == effects.emails == 2
    assert effects.esim_confirmed == 2
    assert _cli(stack_settings, "failed", "--json").stdout.strip() == "[]"


def test_quarantine_lists_rejected_events_with_reasons(stack_settings, services):
    services.ledger.quarantine(
        {"replay_id": 7, "uuid": "u", "reason": "OrderId__c is missing", "payload": {}, "received_at": 1.0}
    )
    out = _cli(stack_settings, "quarantine", "--json")
    assert json.loads(out.stdout)[0]["reason"] == "OrderId__c is missing"
    assert "OrderId__c is missing" in _cli(stack_settings, "quarantine").stdout


def test_failed_since_rejects_a_duration_it_cannot_read(stack_settings):
    out = _cli(stack_settings, "failed", "--since", "yesterday")
    assert out.returncode == 2
    assert "30m, 12h or 7d" in out.stderr
