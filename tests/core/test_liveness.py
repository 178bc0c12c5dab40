"""The liveness heartbeat's rules: stale after its window, stuck past a task's time limit, named why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.core import liveness
from provisioning.core.liveness import ActiveTask, Heartbeat

pytestmark = pytest.mark.fast

NOW = 1_800_000_000.0
CLI = str(Path(sys.executable).with_name("provisioning"))


def _beat(path: Path, tasks: list[ActiveTask], at: float = NOW) -> Heartbeat:
    heartbeat = liveness.assess("w1@host", 4242, tasks, at)
    liveness.write(path, heartbeat)
    return heartbeat


def test_an_idle_worker_with_a_fresh_heartbeat_is_alive(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path, "w1@host")
    _beat(path, [])
    verdict = liveness.probe(path, NOW + 5, stale_after_s=30)
    assert verdict.alive
    assert "0 tasks running" in verdict.reason


def test_a_heartbeat_older_than_the_window_fails_the_probe_and_says_how_old(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path, "w1@host")
    _beat(path, [])
    assert liveness.probe(path, NOW + 30, stale_after_s=30).alive
    verdict = liveness.probe(path, NOW + 31, stale_after_s=30)
    assert not verdict.alive
    assert "heartbeat 31.0 s old, window 30 s" in verdict.reason
    assert "pid 4242" in verdict.reason


def test_tasks_within_their_time_limits_keep_the_worker_alive_whatever_their_number(tmp_path: Path):
    tasks = [ActiveTask("provisioning.activate_esim", NOW - 119, 120.0)] * 20
    heartbeat = _beat(liveness.heartbeat_path(tmp_path, "w1@host"), tasks)
    assert heartbeat.stuck is None
    assert heartbeat.active == 20
    assert heartbeat.oldest_task == "provisioning.activate_esim"
    assert heartbeat.oldest_age_s == 119


def test_one_task_past_its_time_limit_makes_the_worker_stuck_and_the_probe_names_it(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path, "w1@host")
    tasks = [
        ActiveTask("provisioning.send_email", NOW - 5, 120.0),
        ActiveTask("provisioning.create_whmcs_order", NOW - 130, 120.0),
        ActiveTask("provisioning.activate_esim", NOW - 100, 60.0),
    ]
    _beat(path, tasks)
    verdict = liveness.probe(path, NOW + 1, stale_after_s=30)
    assert not verdict.alive
    # The worst overrun is named: 40 s past a 60 s limit beats 10 s past 120 s.
    assert "2 of 3 running tasks past their time limit" in verdict.reason
    assert "provisioning.activate_esim has run 100 s (limit 60 s)" in verdict.reason


def test_a_task_without_a_time_limit_is_stuck_only_after_the_default_bound():
    task = ActiveTask("provisioning.ping", NOW - liveness.NO_LIMIT_STUCK_S + 1, None)
    assert liveness.assess("w", 1, [task], NOW).stuck is None
    assert liveness.assess("w", 1, [task], NOW + 2).stuck is not None


def test_a_missing_or_unreadable_heartbeat_fails_the_probe_with_its_path(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path, "w1@host")
    verdict = liveness.probe(path, NOW, stale_after_s=30)
    assert not verdict.alive
    assert f"no heartbeat at {path}" in verdict.reason
    path.write_text("{half")
    verdict = liveness.probe(path, NOW, stale_after_s=30)
    assert not verdict.alive
    assert "unreadable" in verdict.reason


def test_a_heartbeat_is_replaced_whole_and_leaves_no_temporary_file(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path / "dir", "w1@host")
    _beat(path, [])
    _beat(path, [ActiveTask("provisioning.send_email", NOW - 1, 120.0)], at=NOW + 10)
    assert [p.name for p in path.parent.iterdir()] == ["w1@host.json"]
    assert Heartbeat.from_json(path.read_text()).written_at == NOW + 10
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    liveness.remove(path)
    liveness.remove(path)  # a second stop finds nothing to remove
    assert not path.exists()


def test_without_a_name_the_probe_takes_the_only_heartbeat_and_refuses_to_guess_between_two(tmp_path: Path):
    assert isinstance(liveness.find(tmp_path / "none", None), liveness.Verdict)
    _beat(liveness.heartbeat_path(tmp_path, "w1@host"), [])
    assert liveness.find(tmp_path, None) == tmp_path / "w1@host.json"
    liveness.write(liveness.heartbeat_path(tmp_path, "w2@host"), liveness.assess("w2@host", 1, [], NOW))
    found = liveness.find(tmp_path, None)
    assert isinstance(found, liveness.Verdict)
    assert "2 heartbeats" in found.reason
    assert "w1@host, w2@host" in found.reason
    assert liveness.find(tmp_path, "w2@host") == tmp_path / "w2@host.json"


def test_a_heartbeat_directory_others_may_write_to_is_refused(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="not this user's own directory"):
        _beat(liveness.heartbeat_path(shared, "w1@host"), [])
    assert list(shared.iterdir()) == []


def test_a_worker_name_cannot_lead_the_heartbeat_out_of_its_directory(tmp_path: Path):
    path = liveness.heartbeat_path(tmp_path, "../../etc/w1@host")
    assert path.parent == tmp_path


def test_the_probe_command_exits_0_on_a_fresh_heartbeat_and_1_naming_why_on_a_stale_one(tmp_path: Path):
    import time

    env = {
        **os.environ,
        "PROVISIONING_ENV_FILE": os.devnull,
        "WORKER_LIVENESS_DIR": str(tmp_path),
        "WORKER_LIVENESS_INTERVAL_S": "1",
        "WORKER_LIVENESS_STALE_S": "5",
    }
    path = liveness.heartbeat_path(tmp_path, "w1@host")
    liveness.write(path, liveness.assess("w1@host", 7, [], time.time()))
    fresh = subprocess.run(
        [CLI, "worker", "probe", "--name", "w1@host"], env=env, capture_output=True, text=True
    )
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("alive: worker w1@host (pid 7)")
    liveness.write(path, liveness.assess("w1@host", 7, [], time.time() - 60))
    stale = subprocess.run([CLI, "worker", "probe"], env=env, capture_output=True, text=True)
    assert stale.returncode == 1
    assert re.search(
        r"NOT ALIVE: worker w1@host \(pid 7\): heartbeat 6\d\.\d s old, window 5 s", stale.stderr
    )


def test_a_window_no_longer_than_the_interval_is_refused():
    from provisioning.core.settings import Settings

    with pytest.raises(ValueError, match="more than WORKER_LIVENESS_INTERVAL_S"):
        Settings(_env_file=None, worker_liveness_interval_s=10, worker_liveness_stale_s=10)  # type: ignore[call-arg]
