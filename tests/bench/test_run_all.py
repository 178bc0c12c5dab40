"""make bench's plan (bench/run_all.py): which benchmark runs how, per broker."""

import argparse
import os
from pathlib import Path

from bench.run_all import BENCHMARKS, PER_BROKER, argv_for, result_name


def _args(**over):
    values = {"redis_url": "private", "orders": 0, "events": 0, "chains": 0}
    values.update(over)
    return argparse.Namespace(**values)


def test_the_pinned_pipeline_is_the_pipeline_with_the_worker_on_the_last_cpu_on_each_broker():
    assert "pipeline_pinned" in BENCHMARKS
    assert "pipeline_pinned" in PER_BROKER
    argv = argv_for("pipeline_pinned", _args(orders=50), Path("/out"), "rabbitmq")
    assert argv[1:3] == ["-m", "bench.pipeline"]
    assert argv[argv.index("--worker-cpus") + 1] == str(max(os.sched_getaffinity(0)))
    assert argv[argv.index("--broker") + 1] == "rabbitmq"
    assert argv[argv.index("--orders") + 1] == "50"
    assert argv[argv.index("--json") + 1] == "/out/pipeline_pinned-rabbitmq.json"


def test_the_pipeline_itself_leaves_the_worker_where_the_scheduler_puts_it():
    argv = argv_for("pipeline", _args(), Path("/out"))
    assert "--worker-cpus" not in argv
    assert result_name("pipeline", "redis") == "pipeline"
