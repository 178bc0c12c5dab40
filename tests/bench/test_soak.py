"""The soak (``python -m bench.soak``): its drift arithmetic, its /proc readings, and one short real run.

The short run is the soak as an operator starts it (a subprocess with its own Redis, the
simulators, the listener and two workers on RabbitMQ, a worker killed), cut to three windows
of 20 s; it must print a row per window, write the Markdown table with its drift row, and end
with every Order provisioned exactly once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.soak import columns_for, drift, drift_line, open_fds, rss_mb, table_for

REPO_ROOT = Path(__file__).resolve().parents[2]
# Three windows of 20 s, then settling and the checks: about 90 s; the cap only stops a stuck run.
RUN_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
WINDOWS = 3


def test_the_drift_of_a_column_is_its_last_window_divided_by_its_first() -> None:
    columns = ["window", "end min", "p50 ms", "Redis MB", "w1 FDs"]
    ratios = drift(columns, [1, 1.0, 200.0, 4.0, 20], [60, 60.0, 300.0, 5.0, 20])
    assert ratios == ["", "", 1.5, 1.25, 1.0]


def test_a_column_of_words_counters_or_a_first_value_of_zero_or_none_has_no_drift() -> None:
    columns = ["queue", "p99 ms", "kills", "notes"]
    assert drift(columns, [0, float("nan"), 1, ""], [5, 300.0, 2, "kill w2"]) == ["", "", "", ""]


def test_the_drift_line_names_each_column_with_its_ratio_and_says_when_there_is_none() -> None:
    assert drift_line(["a", "b", "c"], [2.0, "", 0.5]) == "drift (last window ÷ first): a x2.00, c x0.50"
    assert "n/a" in drift_line(["a"], [""])


def test_each_process_gets_an_rss_and_an_fd_column_between_the_fixed_ones_and_the_notes() -> None:
    columns = columns_for(["listener", "w1"])
    assert columns[-6:] == ["listener RSS MB", "listener FDs", "w1 RSS MB", "w1 FDs", "kills", "notes"]
    assert {"p50 ms", "p99 ms", "queue", "Redis MB", "ledger keys", "finished", "failed"} <= set(columns)


def test_the_markdown_table_ends_with_a_drift_row_once_there_are_two_windows() -> None:
    columns = ["window", "end min", "Redis MB", "notes"]
    one = table_for("t", columns, [[1, 1.0, 2.0, ""]]).render()
    two = table_for("t", columns, [[1, 1.0, 2.0, ""], [2, 2.0, 3.0, "kill w2"]]).render()
    assert "drift" not in one
    assert two.splitlines()[-1].startswith("| drift")
    assert "x1.50" in two


def test_rss_and_open_descriptors_are_read_from_proc_and_a_gone_process_reads_as_none() -> None:
    assert 1 < rss_mb(os.getpid()) < 10_000
    with open(__file__):  # one more descriptor while it is open
        opened = open_fds(os.getpid())
    assert opened > open_fds(os.getpid()) >= 3
    gone = 2**22 + 1  # above the kernel's pid_max default
    assert math.isnan(rss_mb(gone))
    assert open_fds(gone) == -1


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_a_short_soak_on_rabbitmq_prints_a_row_per_window_writes_the_table_and_provisions_each_order_once(
    tmp_path: Path,
) -> None:
    out, summary = tmp_path / "soak.md", tmp_path / "soak.json"
    argv = [
        sys.executable,
        "-m",
        "bench.soak",
        "--broker",
        "rabbitmq",
        "--minutes",
        "1",
        "--window-s",
        "20",
        "--rate",
        "2",
        "--kill-every-s",
        "25",
        "--concurrency",
        "8",
        "--workdir",
        str(tmp_path / "run"),
        "--out",
        str(out),
        "--json",
        str(summary),
    ]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the soak stops its workers, listener, Redis and queue first
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
    output = stdout[-8000:] + stderr[-4000:]
    assert proc.returncode == 0, output
    assert "No violation." in stdout
    assert "drift (last window ÷ first):" in stdout

    data: dict[str, Any] = json.loads(summary.read_text())["data"]
    assert data["violations"] == [], output
    assert data["stalls"] == [], output
    assert all(c["ok"] for c in data["checks"]), output
    columns, rows = data["columns"], data["rows"]
    assert [r[0] for r in rows] == list(range(1, WINDOWS + 1))
    row = {name: [r[columns.index(name)] for r in rows] for name in columns}
    # The load was steady, every window finished runs, and the samples are real.
    assert all(35 <= n <= 45 for n in row["published"]), row["published"]
    # The runs still in flight at the last window's end finish while the soak settles (no row).
    assert sum(row["published"]) - 10 <= sum(row["finished"]) <= sum(row["published"])
    assert sum(row["failed"]) == 0
    assert all(0 < p50 <= p99 for p50, p99 in zip(row["p50 ms"], row["p99 ms"], strict=True))
    assert all(mb > 0 for mb in row["Redis MB"])
    assert row["ledger keys"] == sorted(row["ledger keys"])
    for name in ("listener", "w1", "w2"):
        assert all(mb > 20 for mb in row[f"{name} RSS MB"])
        assert all(n > 3 for n in row[f"{name} FDs"])
    # The kills went to w2 only, and each was replaced.
    assert data["disruptions"]["worker_kills"] == sum(row["kills"]) >= 1
    assert all("w1" not in note for note in row["notes"])
    # The Markdown file: the same rows, then the drift row.
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + WINDOWS + 1
    assert lines[-1].startswith("| drift")
