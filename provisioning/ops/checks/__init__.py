"""``provisioning check``: every problem of the configuration in one run, one line each.

The settings first: each invalid one is a line of its own, and the rest are still used
(``load_settings_leniently``). Then a probe per dependency, which reaches it with the
settings it uses. A probe whose settings are invalid is not run, nor one that needs a
probe that failed (the events need the Salesforce login, the ledger's durability needs
Redis, the workers' ping needs the broker): the problem is said once, where it is, and
the lines after it say what could not be checked because of it. A detail is never cut:
``format_results`` wraps it to the terminal's width.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from urllib.parse import urlsplit

import redis
from kombu.connection import Connection

import celeryconfig
from provisioning.core.redis_client import describe, redis_from_settings, sentinel_from_settings
from provisioning.core.settings import ConfigError, Settings, redact_url
from provisioning.ledger import Ledger
from provisioning.ledger.limits import BreakerState
from provisioning.ops.checks.external import NotRunning, Probe, ProbeFn, external_probes
from provisioning.ops.checks.results import CheckResult
from provisioning.step.spec import System

__all__ = ["CheckResult", "format_results", "probes", "run_checks"]

# Each probe gives up after this long, so `check` answers quickly when something is down.
PROBE_TIMEOUT_S = 3.0
REDIS_PORT = 6379
# Below this many columns for the details, the table is wrapped as if the terminal were wider.
MIN_DETAIL_WIDTH = 30


def _probe_client(settings: Settings) -> redis.Redis:
    return redis_from_settings(settings, socket_timeout_s=PROBE_TIMEOUT_S, connect_timeout_s=PROBE_TIMEOUT_S)


def _redis(settings: Settings) -> str:
    client = _probe_client(settings)
    try:
        client.ping()
        master = settings.redis_sentinel_master
        if settings.sentinel_addresses and master is not None:  # Settings requires both or neither
            sentinel = sentinel_from_settings(settings, timeout_s=PROBE_TIMEOUT_S)
            host, port = sentinel.discover_master(master)
            return f"{describe(settings)}: master at {host}:{port}"
    finally:
        client.close()
    return describe(settings)


class Degraded(Exception):
    """Reachable and working, but not as it should be for production: a WARN with what to set."""


def ledger_durability(client: redis.Redis) -> tuple[bool, str]:
    """(safe, what it is): whether a write the ledger was told is done survives a restart or a failover.

    The ledger decides whether an effect already happened; a lost write means a second WHMCS
    order or eSIM profile. AOF with ``appendfsync everysec`` loses at most about a second
    (on a crash of the machine), ``always`` nothing; RDB snapshots alone lose everything since
    the last one. An evicted key is a lost write too, and so is one on a replica that is
    promoted by a failover and then restarts without an AOF of its own.
    """
    info = client.info("persistence")
    replication = client.info("replication")
    replicas = int(replication.get("connected_slaves", 0))
    fsync, save, policy, maxmemory = _config(client, "appendfsync", "save", "maxmemory-policy", "maxmemory")
    aof = bool(int(info.get("aof_enabled", 0)))
    role = replication.get("role", "master")
    problems: list[str] = []
    if role != "master":
        problems.append(
            f"REDIS_URL points at a {role}, which refuses the ledger's writes; point it at the primary "
            "or set REDIS_SENTINELS and REDIS_SENTINEL_MASTER"
        )
    if aof and fsync in ("always", "everysec"):
        loss = "nothing" if fsync == "always" else "at most ~1 s of writes"
        summary = f"AOF on (appendfsync {fsync}: a crash loses {loss})"
    elif aof:
        summary = f"AOF on, appendfsync {fsync}"
        problems.append(
            f"AOF on but appendfsync {fsync}: a crash can lose acknowledged ledger writes; "
            "set appendfsync everysec (or always)"
        )
    else:
        kept = f"RDB snapshots only (save {save!r})" if save and save != "?" else "no persistence at all"
        summary = kept
        problems.append(
            f"{kept}: a restart loses acknowledged ledger writes (a second WHMCS order or eSIM profile "
            "can follow); set appendonly yes and appendfsync everysec"
        )
    if maxmemory not in ("0", "?") and policy not in ("noeviction", "?"):
        problems.append(
            f"maxmemory-policy {policy} evicts keys when memory runs out: an evicted ledger key is a lost "
            "write; set maxmemory-policy noeviction"
        )
    for address, problem in _replica_persistence(client, replication):
        if problem:
            problems.append(
                f"replica {address} {problem}: promoted by a failover, a restart of it loses acknowledged "
                "writes; set appendonly yes and appendfsync everysec there too"
            )
    if replicas:
        where = (
            f"role {role}, {replicas} replica(s): writes that guard an external effect wait for one (WAIT)"
        )
    else:
        where = f"role {role}, 0 replica(s): no failover possible"
    # The persistence summary, unless a problem above already says it.
    said = any(p.startswith(summary) for p in problems)
    detail = "; ".join([*problems, where] if said else [*problems, summary, where])
    return not problems, detail


def _config(client: redis.Redis, *names: str) -> list[str]:
    """CONFIG GET of each name ("?" where CONFIG is disabled, as on managed Redis: INFO is all we know)."""
    try:
        return [str(client.config_get(name).get(name, "")).strip() for name in names]
    except redis.exceptions.ResponseError:
        return ["?" for _ in names]


def _replica_persistence(client: redis.Redis, replication: dict[str, object]) -> list[tuple[str, str]]:
    """(address, problem or "") for each replica INFO names, asked with the primary's credentials."""
    kwargs = client.connection_pool.connection_kwargs
    out = []
    for key, value in sorted(replication.items()):
        if not (key.startswith("slave") and isinstance(value, dict) and "ip" in value):
            continue
        address = f"{value['ip']}:{value['port']}"
        replica = redis.Redis(
            host=str(value["ip"]),
            port=int(value["port"]),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
        )
        try:
            aof = bool(int(replica.info("persistence").get("aof_enabled", 0)))
            (fsync,) = _config(replica, "appendfsync")
        except redis.exceptions.RedisError:
            out.append((address, ""))  # not reachable from here: its persistence is unknown, not wrong
            continue
        finally:
            replica.close()
        if not aof:
            out.append((address, "keeps no AOF"))
        elif fsync == "no":
            out.append((address, "has appendfsync no"))
        else:
            out.append((address, ""))
    return out


def _ledger(settings: Settings) -> str:
    client = _probe_client(settings)
    try:
        safe, detail = ledger_durability(client)
    finally:
        client.close()
    if not safe:
        raise Degraded(detail)
    return detail


def _circuits(settings: Settings) -> str:
    """Each external system's circuit breaker as every worker sees it (the ledger keeps them), and the
    rate limits set: an open circuit is a WARN (its steps wait; nothing fails because of it)."""
    client = _probe_client(settings)
    try:
        ledger = Ledger(redis=client, prefix=settings.ledger_prefix, retention_s=0, lease_ttl_s=1)
        views = ledger.limits.breakers([s.value for s in System])
    finally:
        client.close()
    limits = {
        "salesforce": settings.rate_limit_salesforce,
        "whmcs": settings.rate_limit_whmcs,
        "smdp": settings.rate_limit_smdp,
        "smtp": settings.rate_limit_smtp,
    }
    rates = ", ".join(f"{name} {rate}" for name, rate in limits.items() if rate) or "none"
    trouble = [v for v in views if v.state is not BreakerState.CLOSED]
    if trouble:
        said = "; ".join(
            f"{v.system} {v.state.value}"
            + (f" for {v.open_for_s:.0f} s more" if v.open_for_s is not None else ": one probe is trying it")
            + f" after {v.failures} transient failures in a row"
            for v in trouble
        )
        raise Degraded(
            f"{said}: its steps wait (no budget spent) until a probe succeeds; rate limits: {rates}"
        )
    return f"every circuit closed ({', '.join(v.system for v in views)}); rate limits: {rates}"


def sentinel_health(settings: Settings) -> tuple[bool, str]:
    """(healthy, what it is): every sentinel answers, they agree on the master, a failover can happen."""
    assert settings.redis_sentinel_master is not None
    name = settings.redis_sentinel_master
    sentinel = sentinel_from_settings(settings, timeout_s=PROBE_TIMEOUT_S)
    views: list[dict[str, object]] = []
    unreachable: list[str] = []
    try:
        for node in sentinel.sentinels:
            where = f"{node.connection_pool.connection_kwargs['host']}:{node.connection_pool.connection_kwargs['port']}"
            try:
                view = node.sentinel_master(name)
            except redis.exceptions.ResponseError as exc:
                raise RuntimeError(f"sentinel {where}: {exc} (is REDIS_SENTINEL_MASTER right?)") from None
            except redis.exceptions.RedisError:
                unreachable.append(where)
                continue
            if isinstance(view, dict):
                views.append(view)
    finally:
        for node in sentinel.sentinels:
            node.close()
    if not views:
        raise RuntimeError(f"no sentinel answered ({', '.join(unreachable)})")
    masters = {f"{v['ip']}:{v['port']}" for v in views}
    quorum = int(str(views[0].get("quorum", 0)))
    replicas = max(int(str(v.get("num-slaves", 0))) for v in views)
    known = 1 + max(int(str(v.get("num-other-sentinels", 0))) for v in views)
    problems = []
    if unreachable:
        problems.append(f"sentinel(s) {', '.join(unreachable)} did not answer")
    if len(masters) > 1:
        problems.append(f"the sentinels disagree on the master ({', '.join(sorted(masters))})")
    if any("down" in str(v.get("flags", "")) for v in views):
        problems.append("a sentinel sees the master down")
    if replicas == 0:
        problems.append("the master has no replica: a failover has nothing to promote; add a replica")
    if len(views) < quorum or known < 3:
        problems.append(
            f"{len(views)} of {known} sentinels answer, quorum {quorum}: run at least three sentinels "
            "on separate hosts, with a quorum of a majority"
        )
    detail = (
        f"master {name!r} at {', '.join(sorted(masters))}; {len(views)}/{known} sentinels answer, "
        f"quorum {quorum}; {replicas} replica(s)"
    )
    return not problems, "; ".join([*problems, detail])


def _sentinel(settings: Settings) -> str:
    healthy, detail = sentinel_health(settings)
    if not healthy:
        raise Degraded(detail)
    return detail


def _broker(settings: Settings) -> str:
    options = celeryconfig.build(settings)["broker_transport_options"]
    with Connection(
        settings.celery_broker_url, connect_timeout=PROBE_TIMEOUT_S, transport_options=options
    ) as conn:
        conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)
    return redact_url(settings.celery_broker_url)


REDIS_SETTINGS = ("redis_url", "redis_sentinels", "redis_sentinel_master", "redis_sentinel_password")


def broker_settings(settings: Settings) -> tuple[str, ...]:
    """The settings the broker's connection is made of (a sentinel:// broker's master name too)."""
    used: tuple[str, ...] = ("celery_broker_url", "celery_queue_type", "celery_visibility_timeout_s")
    if settings.broker_is_sentinel:
        used += ("celery_broker_sentinel_master", "redis_sentinel_master", "redis_sentinel_password")
    return used


def probes(settings: Settings) -> list[Probe]:
    """Every dependency's probe, in the order of the table (a probe after the ones it needs)."""
    sentinel: ProbeFn | None = _sentinel if settings.sentinel_addresses else None
    return [
        # The sentinels first: without them the ledger cannot find its master.
        Probe("sentinel", sentinel, uses=REDIS_SETTINGS),
        Probe("redis", _redis, uses=REDIS_SETTINGS, needs=("sentinel",), where=describe),
        Probe("ledger durability", _ledger, uses=REDIS_SETTINGS, needs=("redis",)),
        Probe("circuits", _circuits, uses=REDIS_SETTINGS, needs=("redis",)),
        Probe(
            "broker",
            _broker,
            uses=broker_settings(settings),
            # The ledger's Redis, with another db: its failure is the same one, said once.
            needs=("redis",) if _broker_is_the_ledgers_redis(settings) else (),
            where=lambda s: redact_url(s.celery_broker_url),
        ),
        *external_probes(settings, broker_settings=broker_settings(settings)),
    ]


def _broker_is_the_ledgers_redis(settings: Settings) -> bool:
    broker = settings.celery_broker_url
    if settings.sentinel_addresses or not broker.startswith(("redis://", "rediss://")):
        return False
    ledger, other = urlsplit(str(settings.redis_url)), urlsplit(broker)
    return ledger.hostname is not None and (ledger.hostname, ledger.port or REDIS_PORT) == (
        other.hostname,
        other.port or REDIS_PORT,
    )


def run_checks(settings: Settings, config_error: ConfigError | None = None) -> list[CheckResult]:
    """One result per invalid setting (or one OK), then one per probe; ``config_error`` from
    ``load_settings_leniently``: the probes that use one of its settings are not run."""
    if config_error is None:
        results = [CheckResult("settings", "OK", "valid")]
        unusable: frozenset[str] = frozenset()
    else:
        results = [CheckResult("settings", "FAIL", f"{var}: {why}") for var, why in config_error.problems]
        unusable = config_error.fields
    # Probes that failed, or were not run because one they need failed: what needs them is not run
    # either. (One not run for an invalid setting blocks nothing: what needs it uses that setting.)
    blocked: dict[str, str] = {}
    for probe in probes(settings):
        invalid = [name.upper() for name in probe.uses if name in unusable]
        if invalid:
            results.append(
                CheckResult(probe.name, "SKIP", f"not checked: {_listed(invalid)} invalid (above)")
            )
            continue
        if probe.run is None:
            results.append(CheckResult(probe.name, "SKIP", "not configured"))
            continue
        cause = next((name for name in probe.needs if name in blocked), None)
        if cause is not None:
            blocked[probe.name] = "could not be checked"
            results.append(CheckResult(probe.name, "SKIP", f"not checked: {cause} {blocked[cause]} (above)"))
            continue
        try:
            detail = probe.run(settings)
        except (NotRunning, Degraded) as exc:
            results.append(CheckResult(probe.name, "WARN", _text(exc)))
        except Exception as exc:  # every failure becomes a FAIL line, never a traceback
            blocked[probe.name] = "failed"
            prefix = f"{probe.where(settings)}: " if probe.where is not None else ""
            results.append(CheckResult(probe.name, "FAIL", f"{prefix}{type(exc).__name__}: {_text(exc)}"))
        else:
            if isinstance(detail, str):
                results.append(CheckResult(probe.name, "OK", detail))
            else:
                # A probe of many items (the Salesforce org's): one line each, as it says them.
                results.extend(detail)
                if any(r.status == "FAIL" for r in detail):
                    blocked[probe.name] = "failed"
    return results


def format_results(results: Iterable[CheckResult], width: int) -> list[str]:
    """The table's lines: status, name, then the detail wrapped to ``width`` columns, never cut (a
    word longer than the column, a URL say, overflows it)."""
    results = list(results)
    name_width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        head = f"{r.status:<4}  {r.name:<{name_width}}  "
        wrapper = textwrap.TextWrapper(
            width=max(width, len(head) + MIN_DETAIL_WIDTH),
            initial_indent=head,
            subsequent_indent=" " * len(head),
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines += wrapper.wrap(r.detail) or [head.rstrip()]
    return lines


def _listed(names: list[str]) -> str:
    return names[0] + " is" if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]} are"


def _text(exc: BaseException) -> str:
    """The whole message on one line (the table wraps it)."""
    return " ".join(str(exc).split())
