"""WORKER_CPUS (provisioning/core/cpus.py): the kernel's CPU lists, and a process's threads kept on them."""

import json
import os
import subprocess
import sys

import pytest

from provisioning.core.cpus import CpusUnavailable, format_cpu_list, parse_cpu_list, pin_process


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0,2", {0, 2}), ("0-3", {0, 1, 2, 3}), (" 1 , 3-4 ,", {1, 3, 4}), ("2-2", {2})],
)
def test_a_cpu_list_is_read_as_the_kernel_writes_it(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("x", "'x'"),
        ("1-", "'1-'"),
        ("-1", "'-1'"),
        ("3-1", "ends before it starts"),
        ("", "no CPU"),
        ("0;1", "'0;1'"),
    ],
)
def test_a_list_that_is_not_one_is_refused_naming_the_entry_and_the_syntax(text, named):
    with pytest.raises(ValueError, match="CPU") as refused:
        parse_cpu_list(text)
    assert named in str(refused.value)
    assert "0-3" in str(refused.value)  # what to write instead


@pytest.mark.parametrize(
    ("cpus", "text"), [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({3, 1}, "1,3"), ({7, 8}, "7-8")]
)
def test_a_set_of_cpus_is_written_back_as_ranges(cpus, text):
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == cpus


# A child process pins itself with one thread running and starts another after: every thread, both
# the one that was there and the one that came later, reports the CPU in the kernel's own status file.
PIN_CHILD = """
import json, os, sys, threading
from provisioning.core.cpus import pin_process
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
pinned = pin_process(frozenset({int(sys.argv[1])}))
after = threading.Thread(target=stop.wait); after.start()
lists = {}
for tid in os.listdir("/proc/self/task"):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            lists[tid] = line.split(":", 1)[1].strip()
stop.set()
print(json.dumps({"pinned": pinned, "lists": lists}))
"""


def test_every_thread_of_a_pinned_process_runs_on_its_cpu_those_started_later_too():
    cpu = max(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-c", PIN_CHILD, str(cpu)], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(done.stdout)
    assert result["pinned"] == 2  # the main thread and the one running before
    assert len(result["lists"]) == 3
    assert set(result["lists"].values()) == {str(cpu)}


def test_a_cpu_this_process_may_not_run_on_is_refused_saying_which_it_may():
    allowed = os.sched_getaffinity(0)
    absent = max(allowed) + 1000
    with pytest.raises(CpusUnavailable) as refused:
        pin_process(frozenset({absent}))
    message = str(refused.value)
    assert f"WORKER_CPUS={absent}" in message
    assert f"may run on {format_cpu_list(allowed)} only" in message
    assert isinstance(refused.value, SystemExit)  # a worker exits with it, before its pool starts
    assert os.sched_getaffinity(0) == allowed  # nothing was changed
