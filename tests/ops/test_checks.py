import os
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).with_name("provisioning"))


def _run(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_"))}
    full.update(env)
    return subprocess.run(
        [CLI, "check"], env=full, capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )


def test_check_passes_when_redis_and_the_broker_answer(tmp_path):
    out = _run(tmp_path, REDIS_URL="redis://127.0.0.1:6379/0", CELERY_BROKER_URL="redis://127.0.0.1:6379/1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK    redis" in out.stdout
    # This machine's Redis keeps nothing on disk: check says what a restart would cost, and what to set.
    line = next(line for line in out.stdout.splitlines() if "ledger durability" in line)
    assert line.startswith("WARN")
    assert "no persistence at all: a restart loses acknowledged ledger writes" in line
    assert "set appendonly yes and appendfsync everysec" in line


def test_check_with_redis_down_names_redis_and_its_url_without_the_password(tmp_path):
    out = _run(tmp_path, REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    assert out.returncode == 1
    line = next(line for line in out.stdout.splitlines() if "redis" in line and line.startswith("FAIL"))
    assert "redis://:***@127.0.0.1:1/0" in line
    assert "hunter2" not in out.stdout + out.stderr


def test_an_invalid_replay_setting_exits_2_naming_the_variable_without_a_traceback(tmp_path):
    out = _run(tmp_path, SF_EVENTS_REPLAY="sometimes")
    assert out.returncode == 2
    assert "SF_EVENTS_REPLAY" in out.stderr
    assert "LATEST, EARLIEST" in out.stderr
    assert "Traceback" not in out.stderr


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
        assert any(line.startswith("OK") and f"  {name} " in line for line in out.stdout.splitlines()), (
            out.stdout
        )
    events = next(line for line in out.stdout.splitlines() if "  events " in line)
    assert "transport pubsub" in events
    assert "/event/OrderProvisionRequested__e can be subscribed to" in events
    bad = _run(tmp_path, **{**env, "WHMCS_SECRET": "wrong-secret-value"})
    assert bad.returncode == 1
    assert any(line.startswith("FAIL") and "whmcs" in line for line in bad.stdout.splitlines())
    assert "wrong-secret-value" not in bad.stdout + bad.stderr
    sandbox.admin("whmcs").post("/__admin/bans/reset")


def _line(out, name):
    return next(line for line in out.stdout.splitlines() if f"  {name} " in line)


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
