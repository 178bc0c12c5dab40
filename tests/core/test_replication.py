"""Writes that guard an effect wait for a replica (WAIT) when there are replicas, and only then."""

from __future__ import annotations

import time

import pytest
import redis

from provisioning.core.errors import TransientError
from provisioning.core.replication import REPLICAS_NEEDED, ReplicaUnconfirmed, ReplicaWait
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.core.settings import Settings
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.runs.services import Services
from provisioning.sandbox.redis_server import RedisServer
from provisioning.sandbox.scenario import effects_by_order, seed_orders, wait_until

# The production default: a busy machine can stall a replica's acknowledgement for a few 100 ms.
TIMEOUT_MS = 1000


def _waits(server: RedisServer) -> int:
    """WAIT commands the server has run (INFO commandstats)."""
    client = server.client()
    try:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    finally:
        client.close()


def test_with_a_replica_a_guarded_write_returns_once_the_replica_holds_it(replicated_redis) -> None:
    primary, replica = replicated_redis
    client = primary.client()
    confirm = ReplicaWait(redis=client, timeout_ms=TIMEOUT_MS)
    assert confirm.replicas() == 1
    before = _waits(primary)
    results = confirm.write(lambda pipe: pipe.hset("order", "x:whmcs_intent", "1"))
    assert results == [1]
    # Read from the replica at once: the write is there before write() returned.
    on_replica = replica.client()
    assert on_replica.hget("order", "x:whmcs_intent") == b"1"
    assert _waits(primary) == before + 1
    on_replica.close()
    client.close()


def test_without_replicas_a_guarded_write_sends_no_wait(tmp_path) -> None:
    with RedisServer(tmp_path / "alone") as server:
        client = server.client()
        confirm = ReplicaWait(redis=client, timeout_ms=TIMEOUT_MS)
        assert confirm.write(lambda pipe: pipe.set("k", "v")) == [True]
        assert confirm.replicas() == 0
        assert _waits(server) == 0
        assert client.get("k") == b"v"
        client.close()


def test_a_paused_replica_makes_a_guarded_write_a_transient_error_after_the_timeout(replicated_redis) -> None:
    primary, replica = replicated_redis
    client = primary.client()
    confirm = ReplicaWait(redis=client, timeout_ms=TIMEOUT_MS)
    confirm.replicas()
    replica.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ReplicaUnconfirmed) as caught:
            confirm.write(lambda pipe: pipe.hset("order", "x:outbox", "sending"))
        elapsed = time.monotonic() - started
    finally:
        replica.resume()
    assert isinstance(caught.value, TransientError)
    assert "REDIS_WAIT_TIMEOUT_MS" in str(caught.value)
    assert TIMEOUT_MS / 1000 <= elapsed < TIMEOUT_MS / 1000 + 2
    # Resumed, the replica catches up and the next write is confirmed.
    wait_until(primary.replicas_caught_up, timeout_s=30)
    assert confirm.write(lambda pipe: pipe.hset("order", "x:outbox", "sending")) == [0]
    client.close()


def test_the_replicas_are_read_once_per_refresh_and_again_after_an_unconfirmed_write(
    replicated_redis,
) -> None:
    primary, replica = replicated_redis
    client = primary.client()
    now = [0.0]
    infos: list[str] = []

    class Counting(redis.Redis):
        def info(self, section=None, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            infos.append(str(section))
            return super().info(section, *args, **kwargs)

    counting = Counting.from_url(primary.url(0))
    confirm = ReplicaWait(redis=counting, timeout_ms=TIMEOUT_MS, refresh_s=10.0, clock=lambda: now[0])
    for _ in range(5):
        confirm.write(lambda pipe: pipe.set("k", "v"))
    assert infos == ["replication"]
    now[0] = 10.0
    confirm.write(lambda pipe: pipe.set("k", "v"))
    assert len(infos) == 2
    replica.pause()
    try:
        with pytest.raises(ReplicaUnconfirmed):
            confirm.write(lambda pipe: pipe.set("k", "v"))
    finally:
        replica.resume()
    wait_until(primary.replicas_caught_up, timeout_s=30)
    confirm.write(lambda pipe: pipe.set("k", "v"))
    assert len(infos) == 3  # read again at once, not 10 s later
    assert REPLICAS_NEEDED == 1
    counting.close()
    client.close()


# -- the steps' guarded writes, in-process, on a primary whose replica stops acknowledging -------


@pytest.fixture
def replicated_services(stack_settings, replicated_redis):
    primary, _ = replicated_redis
    values = {**stack_settings.model_dump(), "redis_url": primary.url(0), "redis_wait_timeout_ms": TIMEOUT_MS}
    services = Services(Settings(_env_file=None, **values))  # type: ignore[call-arg]
    yield services
    services.redis.close()


def _calls(sandbox, simulator: str) -> dict[str, int]:
    return dict(sandbox.admin(simulator).get("/__admin/calls")["calls"])


def test_with_the_replica_paused_no_guarded_step_acts_and_each_acts_once_when_it_is_back(
    sandbox, replicated_services, replicated_redis
) -> None:
    primary, replica = replicated_redis
    services = replicated_services
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=83)
    run_id = RunId.parse(order.run_id)
    run_step(services, run_id, CHAIN["validate_payment"])

    def unconfirmed(step: str) -> Wait:
        replica.pause()
        try:
            with pytest.raises(Wait) as caught:
                run_step(services, run_id, CHAIN[step])
        finally:
            replica.resume()
        # Back: the replica catches up before the retry (on a busy machine, more than the timeout).
        wait_until(primary.replicas_caught_up, timeout_s=30)
        assert isinstance(caught.value.__cause__, TransientError)
        return caught.value

    retry = unconfirmed("activate_esim")
    assert "REDIS_WAIT_TIMEOUT_MS" in retry.reason
    assert "downloadOrder" not in _calls(sandbox, "smdp")  # the claim was not confirmed: nothing ordered
    run_step(services, run_id, CHAIN["activate_esim"])

    unconfirmed("create_whmcs_order")
    assert "AddOrder" not in _calls(sandbox, "whmcs")
    run_step(services, run_id, CHAIN["create_whmcs_order"])
    run_step(services, run_id, CHAIN["update_salesforce"])

    unconfirmed("send_email")
    assert sandbox.admin("smtp").get("/__admin/messages/summary")["count"] == 0
    # Nothing was sent: the outbox is back where it was, so the retry is no "resend".
    assert services.ledger.orders.marker(order.order_id, "outbox") == "pending"
    run_step(services, run_id, CHAIN["send_email"])

    assert effects_by_order(sandbox)[order.order_id].problems() == []
    assert _calls(sandbox, "whmcs")["AddOrder"] == 1
    assert _calls(sandbox, "smdp")["downloadOrder"] == 1
    assert services.ledger.orders.marker(order.order_id, "email_resends") is None


def test_where_an_acl_forbids_info_nothing_waits_and_the_write_goes_through(replicated_redis) -> None:
    primary, _ = replicated_redis
    admin = primary.client()
    admin.acl_setuser(
        "ledger", enabled=True, passwords=["+ledger-pw"], keys=["*"], commands=["+@all", "-info"]
    )
    limited = redis.Redis(host=primary.host, port=primary.port, username="ledger", password="ledger-pw")
    confirm = ReplicaWait(redis=limited, timeout_ms=TIMEOUT_MS)
    assert confirm.replicas() == 0
    assert confirm.write(lambda pipe: pipe.set("k", "v")) == [True]
    assert admin.get("k") == b"v"
    limited.close()
    admin.close()
