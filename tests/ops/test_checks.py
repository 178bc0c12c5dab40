import itertools
import os
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).with_name("provisioning"))


def _entries(out):
    """Each result of the table as one line: a wrapped detail's lines joined again."""
    entries = []
    for line in out.stdout.splitlines():
        if line.startswith(" ") and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line)
    return entries


def _line(out, name):
    return next(entry for entry in _entries(out) if entry[6:].startswith(f"{name} "))


def _run(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_"))}
    full.update(env)
    return subprocess.run(
        [CLI, "check"], env=full, capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )


def test_check_passes_when_redis_and_the_broker_answer(tmp_path):
    out = _run(tmp_path, REDIS_URL="redis://127.0.0.1:6379/0", CELERY_BROKER_URL="redis://127.0.0.1:6379/1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _line(out, "redis").startswith("OK    redis")
    # This machine's Redis keeps nothing on disk: check says what a restart would cost, and what to set.
    line = _line(out, "ledger durability")
    assert line.startswith("WARN")
    assert "no persistence at all: a restart loses acknowledged ledger writes" in line
    assert "set appendonly yes and appendfsync everysec" in line


def test_check_with_redis_down_names_redis_and_its_url_without_the_password(tmp_path):
    out = _run(
        tmp_path,
        REDIS_URL="redis://:hunter2@127.0.0.1:1/0",
        CELERY_BROKER_URL="redis://:hunter2@127.0.0.1:1/1",
    )
    assert out.returncode == 1
    line = _line(out, "redis")
    assert line.startswith("FAIL")
    assert "redis://:***@127.0.0.1:1/0" in line
    assert "hunter2" not in out.stdout + out.stderr
    # Said once: what needs that Redis says it was not checked, not the same error again.
    assert "\n".join(_entries(out)).count("Connection refused") == 1, out.stdout
    assert _line(out, "ledger durability").startswith("SKIP  ledger durability  not checked: redis failed")
    # The broker is the same Redis (another db), and the workers are reached through the broker.
    assert "not checked: redis failed (above)" in _line(out, "broker")
    assert "not checked: broker could not be checked (above)" in _line(out, "workers")


def test_an_invalid_replay_setting_exits_2_naming_the_variable_and_the_rest_is_still_checked(tmp_path):
    out = _run(tmp_path, SF_EVENTS_REPLAY="sometimes", CELERY_BROKER_URL="redis://127.0.0.1:6379/1")
    assert out.returncode == 2
    line = _line(out, "settings")
    assert line.startswith("FAIL  settings")
    assert "SF_EVENTS_REPLAY: " in line
    assert "LATEST, EARLIEST" in line
    assert "Traceback" not in out.stdout + out.stderr
    assert _line(out, "redis").startswith("OK")
    assert _line(out, "broker").startswith("OK")


def test_several_problems_are_each_reported_once_in_one_run_and_none_hides_another(tmp_path):
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    out = _run(
        tmp_path,
        REDIS_URL="redis://127.0.0.1:6379/0",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/1",
        SF_LOGIN_URL="https://login.example.test",
        SF_CLIENT_ID="consumer-key",
        SF_USERNAME="integration@example.test",
        SF_PRIVATE_KEY_FILE=str(key_dir),  # a directory: invalid
        SMTP_HOST="127.0.0.1",
        SMTP_PORT="70000",  # invalid
        REDIS_SENTINELS="10.0.0.5:26379",  # without REDIS_SENTINEL_MASTER: invalid
        WHMCS_URL="http://127.0.0.1:1/whmcs",  # valid, but nothing answers there
        WHMCS_IDENTIFIER="identifier",
        WHMCS_SECRET="secret-value",
    )
    assert out.returncode == 2, out.stdout + out.stderr
    settings = [line for line in out.stdout.splitlines() if line.startswith("FAIL  settings")]
    assert [line.split()[2] for line in settings] == [
        "REDIS_SENTINEL_MASTER:",
        "SF_PRIVATE_KEY_FILE:",
        "SMTP_PORT:",
    ], out.stdout
    assert f"SF_PRIVATE_KEY_FILE: is a directory, not a file: {key_dir}" in "\n".join(_entries(out))
    # The invalid key file hides neither the WHMCS URL nor anything else: each probe that uses only
    # valid settings ran, and each that uses an invalid one says which.
    whmcs = _line(out, "whmcs")
    assert whmcs.startswith("FAIL  whmcs")
    assert "http://127.0.0.1:1/whmcs" in whmcs
    assert "connection failed" in whmcs
    assert "not checked: SF_PRIVATE_KEY_FILE is invalid (above)" in _line(out, "salesforce")
    assert "not checked: SMTP_PORT is invalid (above)" in _line(out, "smtp")
    # Sentinels named without their master: the ledger's Redis is not probed as if they were not.
    assert "REDIS_SENTINELS and REDIS_SENTINEL_MASTER are invalid (above)" in _line(out, "redis")
    assert _line(out, "broker").startswith("OK")
    # One line per problem: no problem's text twice.
    table = "\n".join(_entries(out))
    assert table.count("is a directory") == 1
    assert table.count("connection failed") == 1


def test_a_refused_salesforce_login_is_said_once_whole_and_wrapped_and_the_events_were_not_checked(
    tmp_path, sandbox
):
    env = {
        **sandbox.env(),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/1",
        "SF_CLIENT_ID": "not-the-consumer-key",
        "COLUMNS": "72",
    }
    out = _run(tmp_path, **env)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("FAIL  salesforce"))
    indent = lines[start].index("SalesforceAuthError")
    block = [
        lines[start],
        *itertools.takewhile(lambda line: line.startswith(" " * indent), lines[start + 1 :]),
    ]
    assert all(len(line) <= 72 or " " not in line[indent:] for line in block), block
    said = " ".join(line[indent:] for line in block)
    # The remedy in full (it used to end at 200 characters: "...of a connected app in this ").
    assert said.endswith(
        "Likely cause: SF_CLIENT_ID is not the consumer key of a connected app in this org."
    ), said
    assert _line(out, "events").startswith("SKIP  events")
    assert "not checked: salesforce failed (above)" in _line(out, "events")
    assert "\n".join(_entries(out)).count("consumer key") == 1


def test_check_reaches_every_external_service_of_the_sandbox_and_fails_a_wrong_whmcs_secret(
    tmp_path, sandbox
):
    env = {
        **sandbox.env(),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/1",
    }
    out = _run(tmp_path, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("salesforce", "events", "whmcs", "smdp", "smtp"):
        assert _line(out, name).startswith("OK"), out.stdout
    events = _line(out, "events")
    assert "transport pubsub" in events
    assert "/event/OrderProvisionRequested__e can be subscribed to" in events
    bad = _run(tmp_path, **{**env, "WHMCS_SECRET": "wrong-secret-value"})
    assert bad.returncode == 1
    assert _line(bad, "whmcs").startswith("FAIL")
    assert "wrong-secret-value" not in bad.stdout + bad.stderr
    sandbox.admin("whmcs").post("/__admin/bans/reset")


def test_check_warns_about_a_replica_without_aof_and_an_evicting_policy_saying_what_to_set(tmp_path):
    from provisioning.sandbox.redis_server import REPLICATION_OPTIONS, RedisServer
    from provisioning.sandbox.scenario import wait_until

    options = {**REPLICATION_OPTIONS, "maxmemory": "100mb", "maxmemory-policy": "allkeys-lru"}
    with RedisServer(tmp_path / "primary", appendonly=True, options=options) as primary:
        replica = RedisServer(tmp_path / "replica", replica_of=primary.address).start()
        try:
            wait_until(lambda: primary.client().info("replication")["connected_slaves"] == 1, timeout_s=15)
            out = _run(tmp_path, REDIS_URL=primary.url(0), CELERY_BROKER_URL=primary.url(1))
            line = _line(out, "ledger durability")
            assert line.startswith("WARN"), out.stdout
            assert f"replica 127.0.0.1:{replica.port} keeps no AOF" in line
            assert "set appendonly yes and appendfsync everysec there too" in line
            assert "maxmemory-policy allkeys-lru evicts keys" in line
            assert "set maxmemory-policy noeviction" in line
            # The ledger pointed at the replica: its writes would be refused.
            out = _run(tmp_path, REDIS_URL=replica.url(0), CELERY_BROKER_URL=primary.url(1))
            assert "REDIS_URL points at a slave" in _line(out, "ledger durability")
        finally:
            replica.stop()


def test_check_reports_sentinel_and_a_replicated_aof_ledger_ok_and_warns_when_a_sentinel_is_gone(tmp_path):
    from provisioning.sandbox.redis_server import SentinelGroup

    with SentinelGroup(tmp_path / "ha", master_name="ledger") as group:
        env = {
            "REDIS_URL": "redis://ignored.invalid:1/0",
            "REDIS_SENTINELS": group.sentinel_addresses,
            "REDIS_SENTINEL_MASTER": "ledger",
            "CELERY_BROKER_URL": group.broker_url(1),
        }
        out = _run(tmp_path, **env)
        assert out.returncode == 0, out.stdout + out.stderr
        master = f"127.0.0.1:{group.primary.port}"
        assert _line(out, "redis").startswith("OK")
        assert f"master at {master}" in _line(out, "redis")
        sentinel = _line(out, "sentinel")
        assert sentinel.startswith("OK"), out.stdout
        assert f"master 'ledger' at {master}; 3/3 sentinels answer, quorum 2; 1 replica(s)" in sentinel
        durability = _line(out, "ledger durability")
        assert durability.startswith("OK"), out.stdout
        assert "appendfsync everysec" in durability
        assert "1 replica(s): writes that guard an external effect wait for one (WAIT)" in durability
        assert _line(out, "broker").startswith("OK"), out.stdout

        group.sentinels[2].stop()
        out = _run(tmp_path, **env)
        sentinel = _line(out, "sentinel")
        assert sentinel.startswith("WARN")
        assert f"sentinel(s) 127.0.0.1:{group.sentinels[2].port} did not answer" in sentinel


def test_check_says_which_circuit_is_open_for_how_long_and_which_rate_limits_are_set(tmp_path, settings):
    from provisioning.ledger.limits import BreakerPolicy, Outcome
    from provisioning.runs.services import Services

    services = Services(settings)
    services.ledger.limits.record(
        "whmcs", Outcome.THROTTLED, BreakerPolicy(failures=5, cooldown_s=120, cooldown_max_s=300)
    )
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/1",
        "LEDGER_PREFIX": settings.ledger_prefix,
        "RATE_LIMIT_SMDP": "20/s",
    }
    line = _line(_run(tmp_path, **env), "circuits")
    assert line.startswith("WARN  circuits")
    assert "whmcs open for 1" in line  # 120 s less the time the check took
    assert (
        "after 1 transient failures in a row: its steps wait (no budget spent) until a probe succeeds" in line
    )
    assert "rate limits: smdp 20/s" in line
    services.ledger.limits.record(
        "whmcs", Outcome.OK, BreakerPolicy(failures=5, cooldown_s=120, cooldown_max_s=300)
    )
    line = _line(_run(tmp_path, **env), "circuits")
    assert line.startswith("OK    circuits")
    assert "every circuit closed (salesforce, whmcs, smdp, smtp); rate limits: smdp 20/s" in line
    services.redis.close()
