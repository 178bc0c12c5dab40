"""``provisioning check``: reach every configured dependency, one result each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from kombu.connection import Connection

from provisioning.service_checks import NotRunning, external_probes
from provisioning.settings import Settings, redact_url

# Each probe gives up after this long, so `check` answers quickly when something is down.
PROBE_TIMEOUT_S = 3.0


@dataclass
class CheckResult:
    name: str
    status: str  # OK, FAIL, WARN or SKIP
    detail: str


def _redis(settings: Settings) -> str:
    client = redis.Redis.from_url(
        str(settings.redis_url), socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
    )
    try:
        client.ping()
    finally:
        client.close()
    return redact_url(settings.redis_url)


def _broker(settings: Settings) -> str:
    with Connection(settings.celery_broker_url, connect_timeout=PROBE_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)
    return redact_url(settings.celery_broker_url)


Probe = Callable[[Settings], str]


def probes(settings: Settings) -> list[tuple[str, Probe | None]]:
    """(name, probe) for every dependency; probe None when it is not configured."""

    return [("redis", _redis), ("broker", _broker), *external_probes(settings)]


def run_checks(settings: Settings) -> list[CheckResult]:
    results = [CheckResult("settings", "OK", "valid")]
    for name, probe in probes(settings):
        if probe is None:
            results.append(CheckResult(name, "SKIP", "not configured"))
            continue
        try:
            detail = probe(settings)
        except NotRunning as exc:
            results.append(CheckResult(name, "WARN", str(exc)))
        except Exception as exc:  # every failure becomes a FAIL line, never a traceback
            where = {
                "redis": redact_url(settings.redis_url),
                "broker": redact_url(settings.celery_broker_url),
            }
            prefix = f"{where[name]}: " if name in where else ""
            results.append(CheckResult(name, "FAIL", f"{prefix}{type(exc).__name__}: {_short(exc)}"))
        else:
            results.append(CheckResult(name, "OK", detail))
    return results


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]
