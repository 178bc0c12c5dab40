"""The operators' commands, run as a person would: status, failed, requeue (and --dry-run), quarantine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.ledger import RunState
from provisioning.runs.publishing import make_publisher, publish_run
from provisioning.sandbox.scenario import count_effects, seed_orders, wait_until

CLI = str(Path(sys.executable).with_name("provisioning"))


def _cli(settings, *args):
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _state(services, run_id):
    run = services.ledger.runs.get(run_id)
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
    order = json.loads(status.stdout)
    (run,) = order["runs"]
    assert run["state"] == "done"
    assert run["started_by"] == "an event"
    assert run["steps"]["create_whmcs_order"]["result"]["whmcs_order_id"] >= 1
    assert order["effects"]["whmcs_order_id"] == str(
        run["steps"]["create_whmcs_order"]["result"]["whmcs_order_id"]
    )
    assert order["effects"]["email"] == "sent"
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
    services.ledger.registries.quarantine(
        [{"replay_id": 7, "uuid": "u", "reason": "OrderId__c is missing", "payload": {}, "received_at": 1.0}]
    )
    out = _cli(stack_settings, "quarantine", "--json")
    assert json.loads(out.stdout)[0]["reason"] == "OrderId__c is missing"
    assert "OrderId__c is missing" in _cli(stack_settings, "quarantine").stdout


def test_failed_since_rejects_a_duration_it_cannot_read(stack_settings):
    out = _cli(stack_settings, "failed", "--since", "yesterday")
    assert out.returncode == 2
    assert "30m, 12h or 7d" in out.stderr


def test_a_refused_welcome_email_leaves_the_order_activated_and_resend_email_delivers_it_once_fixed(
    sandbox, stack_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=41)
    salesforce = sandbox.admin("salesforce")
    salesforce.patch(f"/__admin/orders/{order.order_id}", {"email": "customer0@mailbox.invalid"})
    workers(concurrency=2)
    publish_run(make_publisher(stack_settings), order.run_id)
    wait_until(lambda: _state(services, order.run_id) is RunState.DONE)

    view = salesforce.get(f"/__admin/orders/{order.order_id}")
    assert view["Activation_Status__c"] == "Activated"
    assert view["WHMCS_Order_ID__c"]
    assert "welcome e-mail was not delivered" in view["Activation_Error__c"]
    assert "550" in view["Activation_Error__c"]
    assert services.ledger.registries.failed() == []
    listed = json.loads(_cli(stack_settings, "emails", "--json").stdout)
    assert [row["order_id"] for row in listed] == [order.order_id]
    assert "550" in listed[0]["reply"]
    assert "mailbox.invalid" not in json.dumps(listed)  # the reply never quotes the address
    assert sandbox.admin("smtp").get("/__admin/messages")["count"] == 0

    still_bad = _cli(stack_settings, "resend-email", order.order_id)
    assert still_bad.returncode == 1
    assert "refused" in still_bad.stdout

    salesforce.patch(f"/__admin/orders/{order.order_id}", {"email": "customer0@example.test"})
    dry = _cli(stack_settings, "resend-email", "--all", "--dry-run", "--json")
    assert json.loads(dry.stdout)[0]["action"] == "would send"
    sent = _cli(stack_settings, "resend-email", "--all")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "delivered" in sent.stdout
    messages = sandbox.admin("smtp").get("/__admin/messages")["messages"]
    assert len(messages) == 1
    assert messages[0]["rcpt_tos"] == ["customer0@example.test"]
    assert messages[0]["message_id"].startswith(f"<{order.order_id}.")
    view = salesforce.get(f"/__admin/orders/{order.order_id}")
    assert view["Activation_Status__c"] == "Activated"
    assert view["Activation_Error__c"] is None
    assert json.loads(_cli(stack_settings, "emails", "--json").stdout) == []
    again = _cli(stack_settings, "resend-email", order.order_id)
    assert again.returncode == 1
    assert "sent, not refused: nothing to resend" in again.stdout
    assert sandbox.admin("smtp").get("/__admin/messages")["count"] == 1


def test_reprovision_makes_new_effects_only_on_an_operators_request_with_a_reason(
    sandbox, stack_settings, services, workers
):
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=42)
    workers(concurrency=2)
    publish_run(make_publisher(stack_settings), order.run_id)
    wait_until(lambda: _state(services, order.run_id) is RunState.DONE)
    first = sandbox.admin("salesforce").get(f"/__admin/orders/{order.order_id}")

    no_reason = _cli(stack_settings, "reprovision", order.order_id)
    assert no_reason.returncode == 2
    assert "--reason" in no_reason.stderr
    dry = _cli(stack_settings, "reprovision", order.order_id, "--reason", "lost phone", "--dry-run", "--json")
    assert json.loads(dry.stdout)["action"] == "would reprovision"
    assert count_effects(sandbox).whmcs_orders == 1

    done = _cli(stack_settings, "reprovision", order.order_id, "--reason", "replacement eSIM, ticket 4711")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = f"{order.order_id}:reprovision-2"
    wait_until(lambda: _state(services, run_id) is RunState.DONE)
    second = sandbox.admin("salesforce").get(f"/__admin/orders/{order.order_id}")
    assert second["Activation_Status__c"] == "Activated"
    assert second["WHMCS_Order_ID__c"] != first["WHMCS_Order_ID__c"]
    assert second["ESIM_ICCID__c"] != first["ESIM_ICCID__c"]
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == 2
    assert effects.esim_confirmed == 2
    assert effects.emails == effects.distinct_message_ids == 2
    status = json.loads(_cli(stack_settings, "status", order.order_id, "--json").stdout)
    runs = {r["run_id"]: r for r in status["runs"]}
    assert runs[run_id]["started_by"].startswith("an operator (replacement eSIM, ticket 4711 (by ")
    assert status["effects"]["provisioning"] == "2"


def test_runs_lists_runs_by_state_step_age_and_order_as_the_console_does(sandbox, stack_settings, services):
    from provisioning.core.errors import PermanentError, TransientError
    from provisioning.core.retry import Wait
    from provisioning.core.run_id import RunId
    from provisioning.runs.lifecycle import RunFailed, run_step
    from tests.steps import at

    class Refused(PermanentError):
        pass

    class Flaky(TransientError):
        pass

    def refuse(ctx):
        raise Refused("no valid payment method")

    def flaky(ctx):
        raise Flaky("WHMCS answered 503")

    failing, waiting = seed_orders(sandbox, services.inventory, count=2, esim_share=1.0, seed=43)
    with pytest.raises(RunFailed):
        run_step(services, RunId.parse(failing.run_id), at("validate_payment", refuse))
    # Begun, its first step to be tried again: running at validate_payment.
    with pytest.raises(Wait):
        run_step(services, RunId.parse(waiting.run_id), at("validate_payment", flaky))

    def listed(*args):
        out = _cli(stack_settings, "runs", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [(row["run_id"], row["state"], row["step"]) for row in json.loads(out.stdout)]

    assert sorted(listed()) == sorted(
        [(failing.run_id, "failed", "validate_payment"), (waiting.run_id, "running", "validate_payment")]
    )
    assert listed("--state", "failed") == [(failing.run_id, "failed", "validate_payment")]
    assert listed("--order", waiting.order_id) == [(waiting.run_id, "running", "validate_payment")]
    assert listed("--older-than", "1h") == []
    assert len(listed("--newer-than", "1h", "--step", "validate_payment")) == 2
    table = _cli(stack_settings, "runs", "--state", "failed")
    assert failing.run_id in table.stdout
    bad = _cli(stack_settings, "runs", "--older-than", "soon")
    assert bad.returncode == 2
    assert "like 30m, 12h or 7d" in bad.stderr
