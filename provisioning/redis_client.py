"""The Redis connection every process builds once for the ledger, the leases and the inventory."""

from __future__ import annotations

import redis

from provisioning.settings import Settings

# Redis calls fail instead of hanging when Redis stops answering.
REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_HEALTH_CHECK_INTERVAL_S = 30
# Enough pooled Redis connections for a worker with 100 threads.
REDIS_MAX_CONNECTIONS = 200


def redis_from_settings(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        str(settings.redis_url),
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=REDIS_HEALTH_CHECK_INTERVAL_S,
        max_connections=REDIS_MAX_CONNECTIONS,
        retry_on_timeout=True,
    )
