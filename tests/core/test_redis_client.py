"""The ledger's Redis client: the server REDIS_URL names, or the master Sentinel names, through a failover."""

from __future__ import annotations

import signal
from pathlib import Path

from provisioning.core.redis_client import describe, redis_from_settings
from provisioning.core.replication import ReplicaWait
from provisioning.core.settings import Settings
from provisioning.sandbox.redis_server import RedisServer, SentinelGroup


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_without_sentinels_the_client_is_the_server_redis_url_names(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        settings = _settings(redis_url=server.url(2))
        client = redis_from_settings(settings)
        client.set("k", "v")
        direct = server.client(2)
        assert direct.get("k") == b"v"
        assert describe(settings) == server.url(2)
        client.close()
        direct.close()


def test_with_sentinels_the_ledger_follows_a_failover_and_waits_for_replicas_only_while_there_are_some(
    tmp_path: Path,
) -> None:
    with SentinelGroup(tmp_path / "ha", master_name="ledger") as group:
        # REDIS_URL's host and port are ignored with sentinels; its db and password are the master's.
        settings = _settings(
            redis_url="redis://unused.invalid:1/3",
            redis_sentinels=group.sentinel_addresses,
            redis_sentinel_master="ledger",
        )
        assert "master 'ledger' of sentinels" in describe(settings)
        client = redis_from_settings(settings)
        confirm = ReplicaWait(redis=client, timeout_ms=1000, refresh_s=0.0)
        confirm.write(lambda pipe: pipe.set("before", "1"))
        old = group.primary
        assert old.client(3).get("before") == b"1"

        old.stop(signal.SIGKILL)
        new = group.wait_for_failover()
        assert new is group.replicas[0]
        # The same client, no restart: reads what was confirmed before, writes to the new master.
        assert client.get("before") == b"1"
        # The new master has no replica yet: the guarded write goes alone, no WAIT to time out.
        assert confirm.write(lambda pipe: pipe.set("after", "2")) == [True]
        assert confirm.replicas() == 0
        assert new.client(3).get("after") == b"2"

        # The old primary comes back with its AOF; the sentinels make it a replica of the new master.
        old.start()
        group.wait_for_replicas(1)
        assert old.role() == "slave"
        confirm.write(lambda pipe: pipe.set("rejoined", "3"))
        assert confirm.replicas() == 1
        assert old.client(3).get("rejoined") == b"3"
        client.close()
