"""The ICCID inventory on the real Redis: atomic claims per Order, loading, release, stock."""

from __future__ import annotations

import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from provisioning.core.errors import TransientError
from provisioning.core.iccid import make_iccid
from provisioning.ledger.inventory import (
    EsimInventory,
    InventoryClaimError,
    InventoryEmpty,
    InventoryUnavailable,
    Stock,
)


def iccids(count: int, start: int = 0) -> list[str]:
    return [make_iccid(f"898829911{n:09d}") for n in range(start, start + count)]


A, B, C = iccids(3)
# Luhn-wrong: the last digit of a valid one, changed.
BAD_CHECK = A[:-1] + str((int(A[-1]) + 1) % 10)


@pytest.fixture
def inventory(redis_client: redis.Redis, namespace: str) -> EsimInventory:
    return EsimInventory.on(redis_client, namespace)


def mark_used(inventory: EsimInventory, redis_client: redis.Redis, iccid: str) -> None:
    """What an eSIM step's end does (its writes' pipeline)."""
    pipe = redis_client.pipeline(transaction=False)
    inventory.queue_mark_used(pipe, iccid)
    pipe.execute()


def test_load_adds_only_iccids_it_has_not_seen(inventory: EsimInventory) -> None:
    assert inventory.load([A, B]) == 2
    assert inventory.load([A, B, C + "F"]) == 1
    assert inventory.stock() == Stock(free=3, claimed=0, used=0)


def test_load_refuses_a_malformed_iccid(inventory: EsimInventory) -> None:
    with pytest.raises(ValueError, match="malformed ICCID"):
        inventory.load([A, BAD_CHECK])
    assert inventory.stock().free == 0


def test_a_run_claims_the_same_iccid_every_time(inventory: EsimInventory) -> None:
    inventory.load(iccids(5))
    first = inventory.claim("order-1:default")
    assert inventory.claim("order-1:default") == first
    assert inventory.claimed_by("order-1:default") == first
    assert inventory.claim("order-2:default") != first
    assert inventory.claimed_by("order-3:default") is None
    assert inventory.stock() == Stock(free=3, claimed=2, used=0)


def test_fifty_threads_claiming_for_distinct_runs_get_distinct_iccids(
    redis_client: redis.Redis, namespace: str
) -> None:
    loaded = iccids(60)
    EsimInventory.on(redis_client, namespace).load(loaded)
    claims: dict[str, str] = {}
    barrier = threading.Barrier(50)

    def claim(n: int) -> None:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        inventory = EsimInventory.on(client, namespace)
        barrier.wait()
        claims[f"run-{n}"] = inventory.claim(f"run-{n}")
        client.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claims) == 50
    assert len(set(claims.values())) == 50
    assert set(claims.values()) <= set(loaded)
    assert EsimInventory.on(redis_client, namespace).stock() == Stock(free=10, claimed=50, used=0)


def test_an_empty_inventory_is_a_transient_error_that_says_what_to_do(inventory: EsimInventory) -> None:
    inventory.load([A])
    inventory.claim("run-1")
    with pytest.raises(InventoryEmpty) as empty:
        inventory.claim("run-2")
    assert isinstance(empty.value, TransientError)
    assert "provisioning esim load FILE" in str(empty.value)
    # The run that holds a claim still gets it.
    assert inventory.claim("run-1") == A


def test_marking_used_is_idempotent_and_keeps_the_claim(
    inventory: EsimInventory, redis_client: redis.Redis
) -> None:
    inventory.load([A, B])
    iccid = inventory.claim("run-1")
    mark_used(inventory, redis_client, iccid)
    mark_used(inventory, redis_client, iccid)
    assert inventory.claim("run-1") == iccid
    assert inventory.stock() == Stock(free=1, claimed=0, used=1)


def test_release_gives_a_claimed_iccid_back_but_never_a_used_one(
    inventory: EsimInventory, redis_client: redis.Redis
) -> None:
    inventory.load([A])
    iccid = inventory.claim("run-1")
    assert inventory.release("run-1") == iccid
    assert inventory.release("run-1") is None
    assert inventory.claimed_by("run-1") is None
    assert inventory.stock() == Stock(free=1, claimed=0, used=0)
    assert inventory.claim("run-2") == iccid
    mark_used(inventory, redis_client, iccid)
    with pytest.raises(InventoryClaimError, match="is used"):
        inventory.release("run-2")
    assert inventory.stock() == Stock(free=0, claimed=0, used=1)


def test_a_reloaded_batch_does_not_bring_back_used_or_claimed_iccids(
    inventory: EsimInventory, redis_client: redis.Redis
) -> None:
    inventory.load([A, B])
    mark_used(inventory, redis_client, inventory.claim("run-1"))
    inventory.claim("run-2")
    assert inventory.load([A, B, C]) == 1
    assert inventory.stock() == Stock(free=1, claimed=1, used=1)


def test_a_claim_says_how_many_iccids_are_left_free_in_the_same_round_trip(inventory: EsimInventory) -> None:
    inventory.load(iccids(3))
    iccid, free = inventory.claim_counting("run-1")
    assert free == 2
    assert inventory.claim_counting("run-1") == (iccid, 2)  # a repeat takes nothing more
    assert inventory.claim_counting("run-2")[1] == 1


def test_a_client_that_decodes_responses_works_the_same(namespace: str) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    inventory = EsimInventory.on(client, namespace)
    inventory.load([A])
    assert inventory.claim("run-1") == A
    assert inventory.claimed_by("run-1") == A
    client.close()


def test_keys_follow_the_documented_names(
    inventory: EsimInventory, redis_client: redis.Redis, namespace: str
) -> None:
    inventory.load([A, B])
    mark_used(inventory, redis_client, inventory.claim("run-1"))
    assert redis_client.scard(f"{namespace}:esim:free") == 1
    assert redis_client.hget(f"{namespace}:esim:claims", "run-1") in (A.encode(), B.encode())
    assert redis_client.scard(f"{namespace}:esim:used") == 1


def test_redis_not_answering_is_a_transient_inventory_error() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    inventory = EsimInventory.on(client, "unreachable")
    with pytest.raises(InventoryUnavailable) as failed:
        inventory.claim("run-1")
    assert isinstance(failed.value, TransientError)


def test_with_replicas_a_claim_is_confirmed_or_unavailable_and_a_retry_gets_the_same_iccid(
    replicated_redis,
) -> None:
    from provisioning.core.replication import ReplicaWait
    from provisioning.sandbox.scenario import wait_until

    primary, replica = replicated_redis
    client = primary.client()
    inventory = EsimInventory.on(client, "ha", ReplicaWait(redis=client, timeout_ms=1000, refresh_s=0.0))
    inventory.load([A, B])
    replica.pause()
    try:
        with pytest.raises(InventoryUnavailable, match="REDIS_WAIT_TIMEOUT_MS") as caught:
            inventory.claim("order-1")
    finally:
        replica.resume()
    wait_until(primary.replicas_caught_up, timeout_s=30)
    assert isinstance(caught.value, TransientError)
    first = client.hget("ha:esim:claims", "order-1").decode()  # on the primary, not yet confirmed
    assert inventory.claim("order-1") == first  # the retry: the same ICCID, now on the replica
    assert replica.client().hget("ha:esim:claims", "order-1").decode() == first
    assert inventory.stock() == Stock(free=1, claimed=1, used=0)
    client.close()
