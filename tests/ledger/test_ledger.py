"""The ledger's records and scripts on the real Redis (the fast tier)."""

from __future__ import annotations

import pytest

from provisioning.core.run_id import RunId
from provisioning.ledger import ClaimStatus, Ledger, Origin, Recorded, RunState, StepClaim
from provisioning.ledger.scripts import LUA_DIR
from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

ORDER = "801Dn0000HeJ6rrIQC"


# Which steps the Order records (the step table says it; the ledger is told).
OWNED = {"validate_payment": True, "activate_esim": True, "create_whmcs_order": True, "send_email": True}


def claim_step(ledger: Ledger, run: RunId, step: str, stamp: tuple[str, str] | None = None) -> StepClaim:
    return ledger.runs.claim(run, step, owned_by_order=OWNED.get(step, False), stamp=stamp)


def done(step: str, result: dict) -> Recorded:
    return Recorded(step, OWNED.get(step, False), result)


@pytest.fixture
def services(settings):
    svc = Services(settings)
    yield svc
    svc.redis.close()


def test_enqueue_says_publish_for_a_new_or_still_queued_run_and_not_for_one_that_began(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    assert ledger.runs.enqueue(run) is True
    assert ledger.runs.enqueue(run) is True  # still queued: its message may never have been sent
    ledger.runs.begin(run, {"id": ORDER})
    assert ledger.runs.enqueue(run) is False
    assert ledger.runs.enqueue_many([run, RunId(ORDER, "k2")]) == [False, True]
    assert ledger.orders.in_flight(ORDER) == [run, RunId(ORDER, "k2")]


def test_a_claim_takes_the_orders_lease_once_and_reads_what_the_step_needs(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.enqueue(run, Origin.RECONCILER)
    ledger.runs.begin(run, {"id": ORDER, "email": "a@example.test"})
    claim = claim_step(ledger, run, "validate_payment")
    assert claim.status is ClaimStatus.GO
    assert claim.attempts == 1
    assert claim.state is RunState.RUNNING
    assert claim.snapshot == {"id": ORDER, "email": "a@example.test"}
    assert claim.run is not None
    assert claim.run.origin is Origin.RECONCILER
    # Another run of the same Order, another worker: the Order's lease is taken.
    assert claim_step(ledger, RunId(ORDER, "k2"), "activate_esim").status is ClaimStatus.BUSY
    assert claim.lease is not None
    ledger.runs.end_step(run, done("validate_payment", {"whmcs_client_id": 1}), claim.lease, finish=False)
    assert not ledger.leases.is_held(ORDER)
    again = claim_step(ledger, run, "validate_payment")
    assert (again.status, again.result) == (ClaimStatus.DONE, {"whmcs_client_id": 1})
    # The Order's step is done for every run of the Order.
    assert ledger.orders.provisioning(ORDER).step("validate_payment").result == {"whmcs_client_id": 1}


def test_a_claim_stamps_a_marker_the_order_lacks_and_a_later_claim_keeps_the_first_value(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    first = claim_step(ledger, run, "update_salesforce", stamp=("activated_at", "2026-12-02T06:00:00.000Z"))
    assert first.provisioning is not None
    assert first.lease is not None
    assert first.provisioning.markers["activated_at"] == "2026-12-02T06:00:00.000Z"
    first.lease.release()
    # A retry (after a lost answer) and a later run of the Order read the value the first try fixed.
    again = claim_step(ledger, run, "update_salesforce", stamp=("activated_at", "2026-12-02T07:00:00.000Z"))
    assert again.provisioning is not None
    assert again.lease is not None
    assert again.provisioning.markers["activated_at"] == "2026-12-02T06:00:00.000Z"
    again.lease.release()
    # Nothing is stamped by a claim that does not take the lease.
    holder = claim_step(ledger, run, "send_email")
    assert holder.lease is not None
    busy = claim_step(ledger, RunId(ORDER, "k2"), "update_salesforce", stamp=("other", "x"))
    assert busy.status is ClaimStatus.BUSY
    assert ledger.orders.marker(ORDER, "other") is None


def test_a_steps_end_records_the_steps_with_nothing_to_do_and_the_writes_it_carries(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    claim = claim_step(ledger, run, "validate_payment")
    assert claim.lease is not None
    written = f"{ledger._keys.prefix}:test:written"
    ledger.runs.end_step(
        run,
        done("validate_payment", {"whmcs_client_id": 1}),
        claim.lease,
        finish=False,
        writes=[lambda pipe: pipe.sadd(written, "yes")],
        also_done=[done("activate_esim", {"sim": "physical"})],
    )
    assert services.redis.smembers(written) == {b"yes"}
    provisioning = ledger.orders.provisioning(ORDER)
    assert provisioning.step("activate_esim").result == {"sim": "physical"}
    assert provisioning.step("activate_esim").done
    # Its task, if one is sent anyway (an operator's resume), finds it done.
    assert claim_step(ledger, run, "activate_esim").status is ClaimStatus.DONE
    services.redis.delete(written)


def test_the_last_step_ends_the_run_drops_the_snapshot_and_sets_the_retention(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    claim = claim_step(ledger, run, "send_email")
    assert claim.lease is not None
    ledger.runs.end_step(run, done("send_email", {"message_id": "<m@x>"}), claim.lease, finish=True)
    record = ledger.runs.get(run)
    assert record is not None
    assert record.state is RunState.DONE
    keys = ledger._keys
    assert not services.redis.exists(keys.snapshot(ORDER))
    assert ledger.orders.in_flight(ORDER) == []
    assert 0 < services.redis.ttl(keys.run(run)) <= ledger.retention_s
    assert 0 < services.redis.ttl(keys.order(ORDER)) <= ledger.retention_s
    # In the operators' list of runs, as every ending is.
    assert ledger.registries.recent(limit=10) == [str(run)]


def test_a_failed_run_stays_until_superseded_and_then_leaves_every_registry(services: Services) -> None:
    ledger = services.ledger
    first, second = RunId(ORDER, "k1"), RunId(ORDER, "k2")
    ledger.runs.begin(first, {"id": ORDER})
    ledger.runs.fail(first, "validate_payment", "no valid payment method")
    assert services.redis.ttl(ledger._keys.run(first)) == -1
    assert [r.run_id for r in ledger.registries.failed()] == [first]
    assert ledger.registries.pending_writebacks(0) == [first]
    assert claim_step(ledger, first, "activate_esim").status is ClaimStatus.ENDED
    ledger.runs.supersede(first, by=second)
    record = ledger.runs.get(first)
    assert record is not None
    assert (record.state, record.superseded_by) == (RunState.SUPERSEDED, str(second))
    assert ledger.registries.failed() == []
    assert ledger.registries.pending_writebacks(0) == []


def test_a_new_generation_archives_the_provisioning_and_changes_the_effect_key(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    ledger.orders.set_marker(ORDER, "whmcs_intent", "1")
    assert ledger.orders.provisioning(ORDER).effect_key == ORDER
    assert ledger.orders.new_generation(ORDER) == 2
    current = ledger.orders.provisioning(ORDER)
    assert (current.gen, current.effect_key, current.markers) == (2, f"{ORDER}#2", {})
    archived = services.redis.hgetall(ledger._keys.archive(ORDER, 1))
    assert archived[b"x:whmcs_intent"] == b"1"


def test_a_refused_email_is_listed_until_it_is_delivered(services: Services) -> None:
    ledger = services.ledger
    ledger.orders.email_refused(ORDER, "RCPT TO refused: 550 5.1.1", {"outbox": "refused"})
    assert [order for order, _ in ledger.registries.undelivered()] == [ORDER]
    assert ledger.orders.provisioning(ORDER).email_error == "RCPT TO refused: 550 5.1.1"
    ledger.orders.email_delivered(ORDER)
    assert ledger.registries.undelivered() == []
    assert ledger.orders.provisioning(ORDER).email_error is None


def test_steps_end_and_runs_are_recorded_after_the_server_forgot_its_scripts(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    claim = claim_step(ledger, run, "create_whmcs_order")
    assert claim.lease is not None
    # A restart or a failover empties the script cache: the pipelines load the script and go on.
    services.redis.script_flush()
    ledger.runs.end_step(
        run,
        done("create_whmcs_order", {"whmcs_order_id": 7}),
        claim.lease,
        finish=True,
        markers={"whmcs_accepted": "1"},
    )
    provisioning = ledger.orders.provisioning(ORDER)
    assert provisioning.step("create_whmcs_order").result == {"whmcs_order_id": 7}
    assert provisioning.markers["whmcs_accepted"] == "1"
    assert not ledger.leases.is_held(ORDER)
    services.redis.script_flush()
    assert ledger.runs.enqueue_many([RunId(ORDER, "k2"), RunId(ORDER, "k3")]) == [True, True]
    # The run ended (end_run.lua, loaded again too); the two new ones are in flight.
    assert ledger.runs.get(run).state is RunState.DONE
    assert ledger.orders.in_flight(ORDER) == [RunId(ORDER, "k2"), RunId(ORDER, "k3")]


def test_every_ending_leaves_the_unfinished_runs_and_enters_the_operators_list(services: Services) -> None:
    ledger = services.ledger
    done_run, skipped, joined, failed = (RunId(ORDER, k) for k in ("d", "s", "j", "f"))
    for run in (done_run, skipped, joined, failed):
        ledger.runs.enqueue(run)
    ledger.runs.begin(done_run, {"id": ORDER})
    ledger.runs.finish(done_run, note="done; the welcome e-mail was not delivered: 550")
    ledger.runs.skip(skipped, "skipped: the Order is 'Activated', not 'Activating': nothing to do")
    ledger.runs.join(joined, done_run)
    ledger.runs.fail(failed, "create_whmcs_order", "Client Not Found")
    assert ledger.registries.unfinished() == 0
    assert set(ledger.registries.recent(limit=10)) == {str(r) for r in (done_run, skipped, joined, failed)}
    states = {str(r.run_id): r.state for r in ledger.runs.get_many([done_run, skipped, joined, failed])}
    assert states == {
        str(done_run): RunState.DONE,
        str(skipped): RunState.SKIPPED,
        str(joined): RunState.JOINED,
        str(failed): RunState.FAILED,
    }
    # Only the failure stays (until requeued): the others expire after the retention period.
    assert services.redis.ttl(ledger._keys.run(failed)) == -1
    assert all(
        0 < services.redis.ttl(ledger._keys.run(r)) <= ledger.retention_s for r in (done_run, skipped, joined)
    )
    assert [r.run_id for r in ledger.registries.failed()] == [failed]


def test_a_requeue_reopens_a_failed_run_with_a_fresh_budget_and_keeps_what_it_ended(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.runs.begin(run, {"id": ORDER})
    for _ in range(3):
        ledger.runs.record_attempt(run, "create_whmcs_order")
    ledger.runs.fail(run, "create_whmcs_order", "gave up after 3 attempts: 503")
    ledger.runs.reopen(run, by="alice")
    reopened = ledger.runs.get(run)
    assert reopened is not None
    assert reopened.state is RunState.RUNNING
    assert (
        reopened.own_steps.get("create_whmcs_order") is None
        or reopened.own_steps["create_whmcs_order"].attempts == 0
    )
    assert reopened.markers["requeued_by"] == "alice"
    assert reopened.markers["requeued_from"] == "create_whmcs_order: gave up after 3 attempts: 503"
    assert ledger.registries.failed() == []
    assert ledger.registries.pending_writebacks(0) == []


def test_every_script_says_its_keys_and_arguments_at_its_top() -> None:
    for script in sorted(LUA_DIR.glob("*.lua")):
        head = script.read_text().split("\n\n")[0] + script.read_text()[:3000]
        assert "KEYS[1]" in head, f"{script.name} does not document its KEYS at its top"
        uses_argv = "ARGV" in script.read_text().split("Returns", 1)[-1]
        assert not uses_argv or "ARGV" in head.split("Returns", 1)[0], f"{script.name}: document its ARGV"
