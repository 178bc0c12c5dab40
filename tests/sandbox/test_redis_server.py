"""The private redis-server helper: a free port, its own data, AOF, stops by signal, restarts in place."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from provisioning.sandbox.redis_server import RedisServer


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url(0), socket_timeout=5)


def test_a_server_starts_on_its_own_port_and_answers(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        assert server.port != 6379
        assert server.url(3) == f"redis://127.0.0.1:{server.port}/3"
        client = _client(server)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("save") == {"save": ""}
        client.close()
    assert not server.alive()
    assert not server.pings()


def test_with_aof_and_fsync_always_a_write_survives_a_sigkill_and_a_restart_on_the_same_port(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always").start()
    try:
        port = server.port
        _client(server).set("acknowledged", "1")
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        assert not server.pings()
        server.start()
        assert server.port == port
        assert _client(server).get("acknowledged") == b"1"
    finally:
        server.stop()


def test_without_aof_a_restart_comes_back_empty(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        _client(server).set("k", "v")
        assert server.stop(signal.SIGTERM) == 0
        server.start()
        assert _client(server).get("k") is None
    finally:
        server.stop()


def test_starting_a_running_server_twice_is_refused(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server, pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_fsync_without_aof_is_refused_with_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendonly=True"):
        RedisServer(tmp_path / "redis", appendfsync="always")


def test_a_server_that_cannot_start_says_why_with_its_log(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "taken") as first:
        second = RedisServer(tmp_path / "second", port=first.port)
        with pytest.raises(RuntimeError, match="did not start") as caught:
            second.start(timeout_s=5)
        assert "Address already in use" in str(caught.value) or "bind" in str(caught.value).lower()
        assert not second.alive()


def test_a_replica_copies_its_primary_and_a_paused_one_holds_its_port_but_answers_nothing(
    tmp_path: Path,
) -> None:
    from provisioning.sandbox.redis_server import REPLICATION_OPTIONS
    from provisioning.sandbox.scenario import wait_until

    with RedisServer(tmp_path / "primary", options=REPLICATION_OPTIONS) as primary:
        replica = RedisServer(tmp_path / "replica", replica_of=primary.address).start()
        try:
            assert replica.role() == "slave"
            primary.client().set("k", "v")
            wait_until(lambda: replica.client().get("k") == b"v", timeout_s=10)
            replica.pause()
            with pytest.raises(redis.exceptions.TimeoutError):
                redis.Redis.from_url(replica.url(0), socket_timeout=0.3).ping()
            replica.resume()
            assert replica.pings()
            # A paused server still stops on SIGTERM (it gets SIGCONT with it).
            replica.pause()
            assert replica.stop() == 0
        finally:
            replica.stop()
