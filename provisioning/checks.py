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


class Degraded(Exception):
    """Reachable and working, but not as it should be for production: a WARN with what to set."""


def ledger_durability(client: redis.Redis) -> tuple[bool, str]:
    """(safe, what it is): whether a write the ledger was told is done survives a Redis restart.

    The ledger decides whether an effect already happened; a lost write means a second WHMCS
    order or eSIM profile. AOF with ``appendfsync everysec`` loses at most about a second,
    ``always`` nothing; RDB snapshots alone lose everything since the last one.
    """
    info = client.info("persistence")
    replication = client.info("replication")
    replicas = int(replication.get("connected_slaves", 0))
    try:
        fsync = str(client.config_get("appendfsync").get("appendfsync", "?"))
        save = str(client.config_get("save").get("save", "")).strip()
    except redis.exceptions.ResponseError:  # CONFIG disabled (managed Redis): INFO is all we know
        fsync, save = "?", "?"
    aof = bool(int(info.get("aof_enabled", 0)))
    role = replication.get("role", "master")
    where = f"role {role}, {replicas} replica(s)"
    if aof and fsync in ("always", "everysec"):
        loss = "nothing" if fsync == "always" else "at most ~1 s of writes"
        return True, f"AOF on (appendfsync {fsync}: a crash loses {loss}); {where}"
    if aof:
        return False, (
            f"AOF on but appendfsync {fsync}: a crash can lose acknowledged ledger writes; "
            f"set appendfsync everysec (or always); {where}"
        )
    kept = f"RDB snapshots only (save {save!r})" if save and save != "?" else "no persistence at all"
    return False, (
        f"{kept}: a restart loses acknowledged ledger writes (a second WHMCS order or eSIM profile "
        f"can follow); set appendonly yes and appendfsync everysec; {where}"
    )


def _ledger(settings: Settings) -> str:
    client = redis.Redis.from_url(
        str(settings.redis_url), socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
    )
    try:
        safe, detail = ledger_durability(client)
    finally:
        client.close()
    if not safe:
        raise Degraded(detail)
    return detail


def _broker(settings: Settings) -> str:
    with Connection(settings.celery_broker_url, connect_timeout=PROBE_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)
    return redact_url(settings.celery_broker_url)


Probe = Callable[[Settings], str]


def probes(settings: Settings) -> list[tuple[str, Probe | None]]:
    """(name, probe) for every dependency; probe None when it is not configured."""

    return [
        ("redis", _redis),
        ("ledger durability", _ledger),
        ("broker", _broker),
        *external_probes(settings),
    ]


def run_checks(settings: Settings) -> list[CheckResult]:
    results = [CheckResult("settings", "OK", "valid")]
    for name, probe in probes(settings):
        if probe is None:
            results.append(CheckResult(name, "SKIP", "not configured"))
            continue
        try:
            detail = probe(settings)
        except (NotRunning, Degraded) as exc:
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
