"""The listener process: events in, tasks out, none lost, with standby, stop and outages."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import requests

from provisioning.core.replay_id import ReplayId
from provisioning.ledger import RunState
from provisioning.runs.services import Services
from provisioning.sandbox.redis_server import RedisServer
from provisioning.sandbox.salesforce import ids
from provisioning.sandbox.scenario import count_effects, event_payload, publish_events_admin, seed_orders
from provisioning.sandbox.scenario import wait_until as wait_for


def _done(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run is not None and run.state is RunState.DONE


def _stored_checkpoint(services, settings):
    return services.ledger.listener.checkpoint(
        settings.sf_provision_event_channel, settings.sf_events_transport
    )


def _checkpoint(services, settings):
    """The stored checkpoint, as the bus's replay id (each transport stores its own opaque bytes)."""
    raw = _stored_checkpoint(services, settings)
    if raw is None:
        return None
    return int(raw) if settings.sf_events_transport == "cometd" else int.from_bytes(raw, "big")


def _log_lines(proc, event):
    return [json.loads(line) for line in proc.log_text().splitlines() if f'"event": "{event}"' in line]


def _lock_holder(services, settings):
    state = services.ledger.listener.state(settings.sf_provision_event_channel)
    return state.lock_token if state.lock_held else None


@pytest.fixture(params=["pubsub", "cometd"])
def listen_settings(request, stack_settings):
    """The listener suite runs on both transports: same leadership, ledger, checkpoints and recovery."""
    return stack_settings.model_copy(
        update={"listener_health_port": 0, "listener_lock_ttl_s": 3, "sf_events_transport": request.param}
    )


def test_malformed_events_are_quarantined_with_reasons_and_every_good_one_is_processed(
    sandbox, listen_settings, services, workers, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=4, esim_share=0.5)
    sandbox.admin("salesforce").post("/__admin/calls/reset")
    workers(concurrency=4)
    listener = listeners(listen_settings)
    account_id = ids.IdFactory(random.Random(3)).new(ids.PREFIX_ACCOUNT)
    bad = [
        {"IdemKey__c": "no-order-id"},
        {"OrderId__c": "801Dn0000HeJ6rrIQX", "IdemKey__c": "bad-checksum"},
        {"OrderId__c": "not-an-id"},
        {"OrderId__c": orders[0].order_id, "IdemKey__c": "x" * 81},
        {"OrderId__c": account_id, "IdemKey__c": "an-account"},
    ]
    payloads = [
        event_payload(orders[0]),
        *bad[:2],
        event_payload(orders[1]),
        *bad[2:],
        event_payload(orders[2]),
        event_payload(orders[3]),
    ]
    publish_events_admin(sandbox, payloads)
    wait_for(lambda: all(_done(services, o.run_id) for o in orders))
    wait_for(lambda: len(services.ledger.registries.quarantined()) == 5)
    reasons = sorted(e["reason"] for e in services.ledger.registries.quarantined())
    assert any("OrderId__c is missing" in r for r in reasons)
    assert sum("not a valid Salesforce Id" in r for r in reasons) == 2
    assert any("IdemKey__c is longer than 80" in r for r in reasons)
    assert any(f"{account_id} is the Id of another kind of record (key prefix 001)" in r for r in reasons)
    # The Account's Id cost nothing in Salesforce: one query per good Order, none for it.
    assert sandbox.admin("salesforce").get("/__admin/calls")["calls"].get("query") == 4
    # Each entry names its replay id (in its transport's form, as --replay-from takes it) and the transport.
    for entry in services.ledger.registries.quarantined():
        assert entry["transport"] == listen_settings.sf_events_transport
        assert ReplayId.parse(entry["replay_id"], entry["transport"])
    assert count_effects(sandbox).whmcs_orders == 4
    base = f"http://127.0.0.1:{listener.health_port}"
    assert requests.get(base + "/healthz", timeout=5).json() == {
        "ok": True,
        "leader": True,
        "transport": listen_settings.sf_events_transport,
        "subscribed": True,
        "stalled": False,
        "can_publish": True,
        "reason": None,
    }
    metrics = requests.get(base + "/metrics", timeout=5).text
    assert "listener_events_received_total 9.0" in metrics
    assert "listener_events_quarantined_total 5.0" in metrics
    assert "listener_events_published_total 4.0" in metrics
    assert "listener_is_leader 1.0" in metrics
    assert "listener_stream_events_total" in metrics
    assert "listener_batches_total" in metrics


def test_sigterm_exits_0_within_5_seconds_with_the_checkpoint_written_and_the_lock_released(
    sandbox, listen_settings, services, workers, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=3, esim_share=0.0)
    listener = listeners(listen_settings)
    replay_ids = publish_events_admin(sandbox, [event_payload(o) for o in orders])
    wait_for(lambda: _checkpoint(services, listen_settings) == replay_ids[-1])
    assert _lock_holder(services, listen_settings) is not None
    started = time.monotonic()
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert _checkpoint(services, listen_settings) == replay_ids[-1]
    assert _lock_holder(services, listen_settings) is None


def test_a_standby_takes_over_within_the_lock_expiry_and_resumes_from_the_checkpoint(
    sandbox, listen_settings, services, workers, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=6, esim_share=0.0)
    workers(concurrency=4)
    first = listeners(listen_settings, name="first")
    second = listeners(listen_settings, name="second", wait="standby")
    publish_events_admin(sandbox, [event_payload(o) for o in orders[:3]])
    wait_for(lambda: all(_done(services, o.run_id) for o in orders[:3]))
    assert "batch_handled" not in second.log_text()
    standby_health = f"http://127.0.0.1:{second.health_port}/healthz"
    assert requests.get(standby_health, timeout=5).status_code == 503
    first.kill()
    killed_at = time.monotonic()
    second.wait_for_log("listener_leader", listen_settings.listener_lock_ttl_s + 5)
    assert time.monotonic() - killed_at <= listen_settings.listener_lock_ttl_s + 5
    wait_for(lambda: requests.get(standby_health, timeout=5).status_code == 200, timeout_s=30)
    publish_events_admin(sandbox, [event_payload(o) for o in orders[3:]])
    wait_for(lambda: all(_done(services, o.run_id) for o in orders))
    # It resumed after the checkpoint: none of the first three was published again.
    published = [run for line in _log_lines(second, "batch_handled") for run in line["published"]]
    assert sorted(published) == sorted(o.run_id for o in orders[3:])
    assert count_effects(sandbox).whmcs_orders == 6


def test_a_thousand_events_survive_three_listener_kills_with_one_whmcs_order_each(
    sandbox, listen_settings, services, workers, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=1000, esim_share=0.5, seed=99)
    workers(concurrency=16, name="w1")
    workers(concurrency=16, name="w2")
    listener = listeners(listen_settings)
    for chunk in range(4):
        publish_events_admin(sandbox, [event_payload(o) for o in orders[chunk * 250 : (chunk + 1) * 250]])
        if chunk < 3:
            wait_for(lambda: _stored_checkpoint(services, listen_settings) is not None)
            time.sleep(0.5)
            listener.kill()
            listener = listeners(listen_settings)
    wait_for(lambda: all(_done(services, o.run_id) for o in orders), timeout_s=600, poll_s=2)
    effects = count_effects(sandbox)
    assert effects.activated == 1000
    assert effects.whmcs_orders == 1000
    assert effects.duplicate_whmcs_orders == 0


def test_the_reconciler_finishes_a_run_whose_worker_died_and_whose_message_never_came_back(
    sandbox, listen_settings, services, workers, listeners
):
    # A visibility timeout far beyond the test: the broker will not redeliver the lost message.
    settings = listen_settings.model_copy(
        update={"celery_visibility_timeout_s": 3600, "reconcile_interval_s": 1, "reconcile_idle_s": 3}
    )
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0)
    sandbox.admin("whmcs").post("/__admin/faults", {"latency_ms": 1500, "operations": ["AddOrder"]})
    victim = workers(settings, name="victim", concurrency=2)
    listeners(settings)
    publish_events_admin(sandbox, [event_payload(order)])
    wait_for(
        lambda: sandbox.admin("whmcs").get("/__admin/calls")["calls"].get("AddOrder", 0) >= 1, timeout_s=60
    )
    victim.kill()
    sandbox.admin("whmcs").post("/__admin/faults", {})
    workers(settings, name="rescuer", concurrency=2)
    wait_for(lambda: _done(services, order.run_id), timeout_s=90)
    effects = count_effects(sandbox)
    assert effects.whmcs_orders == 1
    assert effects.emails == 1


def test_redis_stopped_for_30_seconds_mid_stream_loses_no_event(
    sandbox, listen_settings, workers, listeners, tmp_path: Path
):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        settings = listen_settings.model_copy(
            update={
                "redis_url": server.url(0),
                "celery_broker_url": server.url(1),
                "reconcile_interval_s": 2,
                "reconcile_idle_s": 20,
            }
        )
        services = Services(settings)
        orders = seed_orders(sandbox, services.inventory, count=60, esim_share=0.0)
        worker = workers(settings, concurrency=8)
        listeners(settings)
        publish_events_admin(sandbox, [event_payload(o) for o in orders[:20]])
        wait_for(lambda: sum(_done(services, o.run_id) for o in orders[:20]) >= 5)
        server.stop(signal.SIGTERM)
        publish_events_admin(sandbox, [event_payload(o) for o in orders[20:]])
        time.sleep(30)
        server.start()
        # Celery's Redis transport can exit on a broker outage ("Unrecoverable error"); workers run
        # under a supervisor that restarts them (docs/operations.md), which this stands in for.
        if not worker.alive():
            workers(settings, concurrency=8, name="w-restarted")
        wait_for(lambda: all(_done(services, o.run_id) for o in orders), timeout_s=240, poll_s=1)
        assert count_effects(sandbox).whmcs_orders == 60
    finally:
        server.stop()


def _logged_replay_id(replay_id: int, transport: str) -> str:
    """The sandbox's replay id as our logs print it (the sandbox's own encodings: tests only)."""
    return str(replay_id) if transport == "cometd" else replay_id.to_bytes(8, "big").hex()


def test_the_checkpoint_is_logged_in_its_transport_s_form_and_replay_from_takes_it_back(
    sandbox, listen_settings, services, listeners
):
    orders = seed_orders(sandbox, services.inventory, count=3, esim_share=0.0)
    listener = listeners(listen_settings)
    (first_id,) = publish_events_admin(sandbox, [event_payload(orders[0])])
    wait_for(lambda: _checkpoint(services, listen_settings) == first_id)
    logged = _log_lines(listener, "batch_handled")[-1]["checkpoint"]
    assert logged == _logged_replay_id(first_id, listen_settings.sf_events_transport)
    later = publish_events_admin(sandbox, [event_payload(o) for o in orders[1:]])
    wait_for(lambda: _checkpoint(services, listen_settings) == later[-1])
    listener.stop()

    again = listeners(listen_settings, extra=["--replay-from", logged])
    wait_for(lambda: sum(line["events"] for line in _log_lines(again, "batch_handled")) >= 2)
    (subscribing,) = _log_lines(again, "listener_subscribing")
    assert subscribing["replay_from"] == logged
    replayed = [
        run for line in _log_lines(again, "batch_handled") for run in line["published"] + line["duplicates"]
    ]
    assert sorted(replayed) == sorted(o.run_id for o in orders[1:])


def test_the_other_transport_s_checkpoint_is_named_once_as_ignored_in_its_own_form(
    sandbox, listen_settings, services, listeners
):
    mine = listen_settings.sf_events_transport
    other, stored, shown = (
        ("pubsub", bytes.fromhex("00000000000018af"), "00000000000018af")
        if mine == "cometd"
        else ("cometd", b"8230", "8230")
    )
    channel = listen_settings.sf_provision_event_channel
    pipe = services.redis.pipeline()
    services.ledger.listener.queue_checkpoint(pipe, channel, other, stored)
    pipe.execute()
    listener = listeners(listen_settings)
    (line,) = _log_lines(listener, "listener_other_checkpoint_ignored")
    assert (line["transport"], line["checkpoint"], line["using"]) == (other, shown, mine)
    assert line["starts_from"] == "LATEST"
    assert f"a {other} replay id cannot start a {mine} subscription" in line["reason"]
    (subscribing,) = _log_lines(listener, "listener_subscribing")
    assert subscribing["replay_from"] == "LATEST"
    assert services.ledger.listener.checkpoint(channel, other) == stored  # left for a switch back
