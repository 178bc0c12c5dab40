"""The ledger's records and scripts on the real Redis (the fast tier)."""

from __future__ import annotations

import pytest

from provisioning.core.run_id import RunId
from provisioning.ledger import Origin, RunState
from provisioning.runs.services import Services
from provisioning.step.chain import Step

pytestmark = pytest.mark.fast

ORDER = "801Dn0000HeJ6rrIQC"


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
    assert ledger.enqueue(run) is True
    assert ledger.enqueue(run) is True  # still queued: its message may never have been sent
    ledger.start(run, {"id": ORDER})
    assert ledger.enqueue(run) is False
    assert ledger.enqueue_many([run, RunId(ORDER, "k2")]) == [False, True]
    assert ledger.runs_in_flight(ORDER) == [run, RunId(ORDER, "k2")]


def test_a_claim_takes_the_orders_lease_once_and_reads_what_the_step_needs(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.enqueue(run, Origin.RECONCILER)
    ledger.start(run, {"id": ORDER, "email": "a@example.test"})
    claim = ledger.claim_step(run, Step.VALIDATE_PAYMENT)
    assert claim.status == "go"
    assert claim.attempts == 1
    assert claim.state is RunState.RUNNING
    assert claim.snapshot == {"id": ORDER, "email": "a@example.test"}
    assert claim.run is not None
    assert claim.run.origin is Origin.RECONCILER
    # Another run of the same Order, another worker: the Order's lease is taken.
    assert ledger.claim_step(RunId(ORDER, "k2"), Step.ACTIVATE_ESIM).status == "busy"
    assert claim.lease is not None
    ledger.end_step(run, Step.VALIDATE_PAYMENT, {"whmcs_client_id": 1}, claim.lease, finish=False)
    assert not services.redis.exists(ledger.lease_key(ORDER))
    again = ledger.claim_step(run, Step.VALIDATE_PAYMENT)
    assert (again.status, again.result) == ("done", {"whmcs_client_id": 1})
    # The Order's step is done for every run of the Order.
    assert ledger.provisioning(ORDER).step(Step.VALIDATE_PAYMENT).result == {"whmcs_client_id": 1}


def test_a_claim_stamps_a_marker_the_order_lacks_and_a_later_claim_keeps_the_first_value(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.start(run, {"id": ORDER})
    first = ledger.claim_step(run, Step.UPDATE_SALESFORCE, stamp=("activated_at", "2026-12-02T06:00:00.000Z"))
    assert first.provisioning is not None
    assert first.lease is not None
    assert first.provisioning.markers["activated_at"] == "2026-12-02T06:00:00.000Z"
    first.lease.release()
    # A retry (after a lost answer) and a later run of the Order read the value the first try fixed.
    again = ledger.claim_step(run, Step.UPDATE_SALESFORCE, stamp=("activated_at", "2026-12-02T07:00:00.000Z"))
    assert again.provisioning is not None
    assert again.lease is not None
    assert again.provisioning.markers["activated_at"] == "2026-12-02T06:00:00.000Z"
    again.lease.release()
    # Nothing is stamped by a claim that does not take the lease.
    holder = ledger.claim_step(run, Step.SEND_EMAIL)
    assert holder.lease is not None
    busy = ledger.claim_step(RunId(ORDER, "k2"), Step.UPDATE_SALESFORCE, stamp=("other", "x"))
    assert busy.status == "busy"
    assert ledger.marker(ORDER, "other") is None


def test_a_steps_end_records_the_steps_with_nothing_to_do_and_the_writes_it_carries(
    services: Services,
) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.start(run, {"id": ORDER})
    claim = ledger.claim_step(run, Step.VALIDATE_PAYMENT)
    assert claim.lease is not None
    written = f"{ledger.prefix}:test:written"
    ledger.end_step(
        run,
        Step.VALIDATE_PAYMENT,
        {"whmcs_client_id": 1},
        claim.lease,
        finish=False,
        writes=[lambda pipe: pipe.sadd(written, "yes")],
        also_done={Step.ACTIVATE_ESIM: {"sim": "physical"}},
    )
    assert services.redis.smembers(written) == {b"yes"}
    provisioning = ledger.provisioning(ORDER)
    assert provisioning.step(Step.ACTIVATE_ESIM).result == {"sim": "physical"}
    assert provisioning.step(Step.ACTIVATE_ESIM).done
    # Its task, if one is sent anyway (an operator's resume), finds it done.
    assert ledger.claim_step(run, Step.ACTIVATE_ESIM).status == "done"
    services.redis.delete(written)


def test_the_last_step_ends_the_run_drops_the_snapshot_and_sets_the_retention(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.start(run, {"id": ORDER})
    claim = ledger.claim_step(run, Step.SEND_EMAIL)
    assert claim.lease is not None
    ledger.end_step(run, Step.SEND_EMAIL, {"message_id": "<m@x>"}, claim.lease, finish=True)
    record = ledger.get(run)
    assert record is not None
    assert record.state is RunState.DONE
    assert not services.redis.exists(ledger.snapshot_key(ORDER))
    assert services.redis.zscore(ledger.active_key, str(run)) is None
    assert 0 < services.redis.ttl(ledger.run_key(run)) <= ledger.retention_s
    assert 0 < services.redis.ttl(ledger.order_key(ORDER)) <= ledger.retention_s


def test_a_failed_run_stays_until_superseded_and_then_leaves_every_registry(services: Services) -> None:
    ledger = services.ledger
    first, second = RunId(ORDER, "k1"), RunId(ORDER, "k2")
    ledger.start(first, {"id": ORDER})
    ledger.fail(first, "validate_payment", "no valid payment method")
    assert services.redis.ttl(ledger.run_key(first)) == -1
    assert [r.run_id for r in ledger.failed_runs()] == [first]
    assert ledger.pending_writebacks(0) == [first]
    assert ledger.claim_step(first, Step.ACTIVATE_ESIM).status == "ended"
    ledger.supersede(first, by=second)
    record = ledger.get(first)
    assert record is not None
    assert (record.state, record.superseded_by) == (RunState.SUPERSEDED, str(second))
    assert ledger.failed_runs() == []
    assert ledger.pending_writebacks(0) == []


def test_a_new_generation_archives_the_provisioning_and_changes_the_effect_key(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.start(run, {"id": ORDER})
    ledger.set_marker(ORDER, "whmcs_intent", "1")
    assert ledger.provisioning(ORDER).effect_key == ORDER
    assert ledger.new_generation(ORDER) == 2
    current = ledger.provisioning(ORDER)
    assert (current.gen, current.effect_key, current.markers) == (2, f"{ORDER}#2", {})
    archived = services.redis.hgetall(ledger.archive_key(ORDER, 1))
    assert archived[b"x:whmcs_intent"] == b"1"


def test_a_refused_email_is_listed_until_it_is_delivered(services: Services) -> None:
    ledger = services.ledger
    ledger.email_refused(ORDER, "RCPT TO refused: 550 5.1.1")
    assert [order for order, _ in ledger.undelivered()] == [ORDER]
    assert ledger.provisioning(ORDER).email_error == "RCPT TO refused: 550 5.1.1"
    ledger.email_delivered(ORDER)
    assert ledger.undelivered() == []
    assert ledger.provisioning(ORDER).email_error is None


def test_steps_end_and_runs_are_recorded_after_the_server_forgot_its_scripts(services: Services) -> None:
    ledger = services.ledger
    run = RunId(ORDER, "k1")
    ledger.start(run, {"id": ORDER})
    claim = ledger.claim_step(run, Step.CREATE_WHMCS_ORDER)
    assert claim.lease is not None
    # A restart or a failover empties the script cache: the pipelines load the script and go on.
    services.redis.script_flush()
    ledger.end_step(
        run,
        Step.CREATE_WHMCS_ORDER,
        {"whmcs_order_id": 7},
        claim.lease,
        finish=False,
        markers={"whmcs_accepted": "1"},
    )
    provisioning = ledger.provisioning(ORDER)
    assert provisioning.step(Step.CREATE_WHMCS_ORDER).result == {"whmcs_order_id": 7}
    assert provisioning.markers["whmcs_accepted"] == "1"
    assert not services.redis.exists(ledger.lease_key(ORDER))
    services.redis.script_flush()
    assert ledger.enqueue_many([RunId(ORDER, "k2"), RunId(ORDER, "k3")]) == [True, True]
    assert ledger.runs_in_flight(ORDER) == [run, RunId(ORDER, "k2"), RunId(ORDER, "k3")]
