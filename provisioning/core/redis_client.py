"""The Redis connection every process builds once for the ledger, the leases and the inventory.

With ``REDIS_SENTINELS`` the client is Sentinel's ``master_for``: every new
connection asks the sentinels where the master is, and a connection still open to a
master that was demoted (READONLY) is dropped, so a process follows a failover
without a restart. ``REDIS_URL`` then gives only the db, the user and the password.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import SSLConnection, parse_url
from redis.exceptions import NoScriptError
from redis.sentinel import Sentinel, SentinelManagedSSLConnection

from provisioning.core.settings import Settings, redact_url

# Redis calls fail instead of hanging when Redis stops answering.
REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_HEALTH_CHECK_INTERVAL_S = 30
# Enough pooled Redis connections for a worker with 100 threads.
REDIS_MAX_CONNECTIONS = 200
# A sentinel that does not answer within this long is skipped for the next one.
SENTINEL_SOCKET_TIMEOUT_S = 2.0


def redis_from_settings(
    settings: Settings,
    *,
    socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S,
    connect_timeout_s: float = REDIS_CONNECT_TIMEOUT_S,
) -> redis.Redis:
    """The ledger's Redis: the server REDIS_URL names, or the master the sentinels name."""
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL_S,
        "max_connections": REDIS_MAX_CONNECTIONS,
        "retry_on_timeout": True,
    }
    if not settings.sentinel_addresses:
        return redis.Redis.from_url(str(settings.redis_url), **common)
    assert settings.redis_sentinel_master is not None  # Settings requires it with REDIS_SENTINELS
    # From REDIS_URL only what is the master's own: the db, the user, the password, TLS.
    parsed = parse_url(str(settings.redis_url))  # type: ignore[no-untyped-call]
    own = {k: v for k, v in parsed.items() if k not in ("host", "port", "path")}
    if own.pop("connection_class", None) is SSLConnection:
        own["connection_class"] = SentinelManagedSSLConnection
    client: redis.Redis = sentinel_from_settings(settings).master_for(
        settings.redis_sentinel_master, **common, **own
    )
    return client


def sentinel_from_settings(settings: Settings, *, timeout_s: float = SENTINEL_SOCKET_TIMEOUT_S) -> Sentinel:
    """A client of the sentinels themselves (``REDIS_SENTINELS``, ``REDIS_SENTINEL_PASSWORD``)."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    return Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_kwargs)


def describe(settings: Settings) -> str:
    """Where the ledger's Redis is, fit for logs (no password)."""
    if settings.sentinel_addresses:
        return f"master {settings.redis_sentinel_master!r} of sentinels {settings.redis_sentinels}"
    return redact_url(settings.redis_url)


def queue_script(pipe: Any, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue ``script`` in ``pipe`` as a bare EVALSHA; run the pipeline with :func:`execute_scripted`.

    redis-py checks the script cache (SCRIPT EXISTS, one more round trip) before every
    pipeline that holds a ``Script``; the cache is nearly always warm, so that round trip
    is paid only when the server answers NOSCRIPT (after a restart or a failover).
    """
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def execute_scripted(pipe: Any, scripts: dict[int, tuple[Script, Sequence[str], Sequence[Any]]]) -> list[Any]:
    """Run ``pipe``; ``scripts`` maps a command's index to the script queued there by :func:`queue_script`.

    A script the server did not know is loaded and run again on its own (the commands queued
    after it did run); any other error is raised, the first one, as ``pipe.execute()`` would.
    """
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for index, (script, keys, args) in scripts.items():
        if isinstance(replies[index], NoScriptError):
            replies[index] = script(keys=list(keys), args=list(args))
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
