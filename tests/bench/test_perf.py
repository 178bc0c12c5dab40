"""``bench.perf`` (what ``bench.contention`` counts with): perf's CSV read, a process counted in a window, a child whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import perf

# What perf 6.1 writes with -x, for an attached process switched on and off through its control FIFO.
ATTACHED_OUTPUT = """# started on Sun Dec  6 20:03:49 2026

1000.95,msec,task-clock,1000949150,100.00,0.677,CPUs utilized
412,,context-switches,1000949150,100.00,411.617,/sec
507714,,raw_syscalls:sys_enter,1000947588,100.00,507.233,K/sec
777,,syscalls:sys_enter_futex,1000947588,100.00,0.776,K/sec
92,,syscalls:sys_enter_poll,1000947588,100.00,0.092,K/sec
3,,syscalls:sys_enter_epoll_wait,1000947588,100.00,0.003,K/secEvents disabled
Events enabled
Events disabled
"""

POLLS = 3000

# A child that polls POLLS times (never waiting) each time it reads a line, and says so.
_POLLER = f"""
import select, sys
poller = select.poll()
for line in sys.stdin:
    for _ in range({POLLS}):
        poller.poll(0)
    print("polled", flush=True)
"""


def require_perf() -> None:
    why = perf.unavailable()
    assert why is None, why


def test_perf_s_csv_is_read_as_counts_per_event() -> None:
    counts = perf.parse(ATTACHED_OUTPUT)
    assert counts == {
        "task-clock": 1000.95,
        "context-switches": 412.0,
        "raw_syscalls:sys_enter": 507714.0,
        "syscalls:sys_enter_futex": 777.0,
        "syscalls:sys_enter_poll": 92.0,
        "syscalls:sys_enter_epoll_wait": 3.0,
    }


def test_user_and_system_time_are_read_in_milliseconds() -> None:
    text = ATTACHED_OUTPUT + "281574000,ns,user_time,281574000,100.00,900.501,M/sec\n"
    text += "40777000,ns,system_time,40777000,100.00,130.409,M/sec\n"
    counts = perf.parse(text, perf.EVENT_NAMES + perf.TIME_NAMES)
    assert counts["user_time"] == pytest.approx(281.574)
    assert counts["system_time"] == pytest.approx(40.777)


def test_a_time_perf_shows_as_not_counted_is_zero() -> None:
    # What `perf stat -x, -e user_time,system_time -- true` prints (perf 6.1): a zero time so.
    text = (
        ATTACHED_OUTPUT + "1825000,ns,user_time,1825000,100.00,,\n<not counted>,ns,system_time,0,100.00,,\n"
    )
    counts = perf.parse(text, perf.EVENT_NAMES + perf.TIME_NAMES)
    assert counts["user_time"] == pytest.approx(1.825)
    assert counts["system_time"] == 0.0


def test_an_event_perf_did_not_count_is_named_with_what_to_do() -> None:
    text = ATTACHED_OUTPUT.replace("777,,syscalls:sys_enter_futex", "<not counted>,,syscalls:sys_enter_futex")
    with pytest.raises(perf.PerfError, match=r"syscalls:sys_enter_futex.*not counted.*run as root"):
        perf.parse(text)


def test_an_event_missing_from_the_output_is_named() -> None:
    text = "\n".join(line for line in ATTACHED_OUTPUT.splitlines() if "epoll_wait" not in line)
    with pytest.raises(perf.PerfError, match="no count for syscalls:sys_enter_epoll_wait"):
        perf.parse(text)


def test_an_attached_process_is_counted_only_between_start_and_stop() -> None:
    require_perf()
    child = subprocess.Popen(
        [sys.executable, "-c", _POLLER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        # Polls before the window: not counted.
        child.stdin.write("before\n")
        child.stdin.flush()
        assert child.stdout.readline() == "polled\n"
        counter = perf.Attached(child.pid)
        counter.start()
        for _ in range(2):
            child.stdin.write("inside\n")
            child.stdin.flush()
            assert child.stdout.readline() == "polled\n"
        counts = counter.stop()
        # And after it: not counted either (perf has stopped).
        child.stdin.write("after\n")
        child.stdin.flush()
        assert child.stdout.readline() == "polled\n"
    finally:
        child.kill()
        child.wait()
    # Two lines' polls, and the few system calls of reading two lines and writing two.
    assert 2 * POLLS <= counts["syscalls:sys_enter_poll"] < 2 * POLLS + 20
    assert counts["raw_syscalls:sys_enter"] >= 2 * POLLS
    assert counts["task-clock"] > 0


def test_a_wrapped_child_is_counted_whole_with_its_user_and_system_time(tmp_path: Path) -> None:
    require_perf()
    out = tmp_path / "stat.csv"
    subprocess.run(
        [*perf.wrapped(out), sys.executable, "-c", _POLLER], input="one\ntwo\n", text=True, check=True
    )
    counts = perf.parse(out.read_text(), perf.EVENT_NAMES + perf.TIME_NAMES)
    # Python's start-up polls nothing: the polls are the child's own.
    assert 2 * POLLS <= counts["syscalls:sys_enter_poll"] < 2 * POLLS + 20
    # The child's user and system time add up to the CPU perf counted (the kernel's accounting).
    cpu_ms = counts["task-clock"]
    assert counts["user_time"] + counts["system_time"] == pytest.approx(cpu_ms, abs=max(20.0, cpu_ms / 5))
