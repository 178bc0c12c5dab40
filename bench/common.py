"""What every benchmark shares: machine facts, process CPU from /proc, tables, JSON, cleanup, a private Redis."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from amqp.exceptions import NotFound
from kombu.connection import Connection

from provisioning.sandbox.processes import ManagedProcess
from provisioning.sandbox.redis_server import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
SHARED_REDIS_URL = "redis://127.0.0.1:6379"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# A private redis-server must answer PING within this.
REDIS_START_TIMEOUT_S = 10.0
# How often the benchmarks look at progress (ledger states, checkpoints): light on a 2-core machine.
POLL_S = 0.1


# -- machine ----------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(redis_client: redis.Redis | None = None) -> dict[str, Any]:
    """The facts printed beside every result: cores, CPU, Python, Redis server, Celery and friends."""
    server = "unknown"
    if redis_client is not None:
        with contextlib.suppress(redis.RedisError):
            server = str(redis_client.info("server")["redis_version"])
    load1, load5, _ = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "redis_server": server,
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis_py": _version("redis"),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1m_5m_at_start": [round(load1, 2), round(load5, 2)],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
        f"Redis {info['redis_server']}, Celery {info['celery']}, kombu {info['kombu']}, "
        f"redis-py {info['redis_py']}; load avg at start {info['load_avg_1m_5m_at_start']}"
    )


# -- CPU from /proc ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (a prefork worker's children)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(user, system) clock ticks of a process, every thread; None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the command name: utime is field 14, stime 15 of the full line (11 and 12 here).
    return int(fields[11]), int(fields[12])


def cpu_seconds(pid: int, *, tree: bool = True) -> float:
    """User + system CPU seconds of a process (and its live descendants), from /proc/<pid>/stat."""
    ticks = [_cpu_ticks(p) for p in (descendants(pid) if tree else [pid])]
    return sum(user + system for user, system in filter(None, ticks)) / CLOCK_TICKS_PER_S


def cpu_split_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, every thread, from /proc/<pid>/stat."""
    ticks = _cpu_ticks(pid)
    if ticks is None:
        raise ProcessLookupError(pid)
    return ticks[0] / CLOCK_TICKS_PER_S, ticks[1] / CLOCK_TICKS_PER_S


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class CpuMeter:
    """CPU seconds used between start() and stop() by some processes, this one and a Redis server."""

    def __init__(self, pids: dict[str, int], redis_client: redis.Redis | None = None) -> None:
        self.pids = pids
        self.redis_client = redis_client
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        values = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        values["driver"] = time.process_time()
        if self.redis_client is not None:
            values["redis"] = redis_cpu_seconds(self.redis_client)
        return values

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.used = {k: after[k] - self.before[k] for k in after}
        return self.used


# -- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min to max`` of a few rounds, for a table cell."""
    return f"{fmt(min(values))} to {fmt(max(values))}" if values else "n/a"


def latency_summary(values_s: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values_s, 50) * 1000,
        "p95_ms": percentile(values_s, 95) * 1000,
        "p99_ms": percentile(values_s, 99) * 1000,
        "mean_ms": (statistics.fmean(values_s) * 1000) if values_s else float("nan"),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# -- tables and results -----------------------------------------------------------------------


@dataclass
class Table:
    """A titled table; rendered as Markdown so that it pastes into docs/benchmarks.md as it is."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def render(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        widths = [len(c) for c in self.columns]
        for row in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(items: Iterable[str]) -> str:
            return "| " + " | ".join(i.ljust(w) for i, w in zip(items, widths, strict=True)) + " |"

        out = [
            f"### {self.title}",
            "",
            line(self.columns),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        out += [line(row) for row in cells]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def emit(
    name: str, args: argparse.Namespace, info: dict[str, Any], tables: list[Table], data: dict[str, Any]
) -> None:
    """Print the tables with the machine line; write everything as JSON when --json was given."""
    print()
    print(machine_line(info))
    for table in tables:
        print()
        print(table.render())
    print(flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": name,
            "argv": sys.argv,
            "machine": info,
            "tables": [t.to_json() for t in tables],
            "data": data,
        }
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {path}", flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- arguments, cleanup -----------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--json", metavar="PATH", help="Also write the results (and the machine) as JSON here."
    )
    parser.add_argument(
        "--redis-url",
        default="private",
        help="Redis server for the ledger (db 0) and the broker (db 1): 'private' (default) starts a "
        "throw-away redis-server on a free port, so nothing else on the machine mixes into the numbers; "
        f"or a URL without a db, e.g. {SHARED_REDIS_URL}.",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Where the sandbox files and process logs go (default: a temp dir).",
    )
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help=f"The Celery broker: the benchmark's Redis (db 1), or RabbitMQ at {RABBITMQ_URL} "
        "(a quorum queue of its own, deleted afterwards). The ledger is on Redis either way.",
    )
    return parser


class Cleanup:
    """Stops everything a benchmark started, last first, also on Ctrl-C and SIGTERM."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def add(self, name: str, action: Callable[[], object]) -> None:
        self._actions.append((name, action))

    def process(self, proc: ManagedProcess) -> ManagedProcess:
        self.add(proc.name, proc.stop)
        return proc

    def run(self) -> None:
        while self._actions:
            name, action = self._actions.pop()
            try:
                action()
            except Exception as exc:
                log(f"cleanup of {name} failed: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Cleanup:
        def _term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt()

        signal.signal(signal.SIGTERM, _term)
        # Also when started with SIGINT ignored (a background job of a script): Ctrl-C must clean up.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        # A second Ctrl-C during cleanup must not leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.run()
        finally:
            signal.signal(signal.SIGINT, previous)


def run_main(main: Callable[[], int]) -> None:
    """The scripts' entry point: Ctrl-C ends with a line, not a traceback (cleanup has run by then)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted: every process this benchmark started has been stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


def workdir_for(args: argparse.Namespace, name: str, cleanup: Cleanup) -> Path:
    if args.workdir is not None:
        path = Path(args.workdir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    cleanup.add("workdir", lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def unique(name: str) -> str:
    return f"b{name}{uuid.uuid4().hex[:8]}"


# -- Redis ------------------------------------------------------------------------------------


class BenchRedis:
    """The benchmark's Redis: a throw-away private ``redis-server`` (no persistence) or an existing server."""

    def __init__(self, url: str, workdir: Path, cleanup: Cleanup, *, name: str = "redis") -> None:
        self.private = url == "private"
        if self.private and shutil.which("redis-server") is None:
            log(f"no redis-server on PATH: using {SHARED_REDIS_URL}")
            self.private = False
            url = SHARED_REDIS_URL
        self.server: RedisServer | None = None
        if self.private:
            self.server = RedisServer(workdir / name)
            cleanup.add(name, self.server.stop)
            self.server.start(REDIS_START_TIMEOUT_S)
            self.base_url = self.server.url(0).rsplit("/", 1)[0]
        else:
            self.base_url = url.rstrip("/")
        self.client = redis.Redis.from_url(self.url(0))
        self.client.ping()
        cleanup.add(f"{name} client", self.client.close)

    def url(self, db: int) -> str:
        return f"{self.base_url}/{db}"

    def forget(self, *patterns: str) -> None:
        """Delete keys matching ``patterns`` in dbs 0 and 1 (only needed on a shared server)."""
        for db in (0, 1):
            client = redis.Redis.from_url(self.url(db))
            try:
                for pattern in patterns:
                    keys = list(client.scan_iter(pattern, count=1000))
                    for start in range(0, len(keys), 1000):
                        client.delete(*keys[start : start + 1000])
            finally:
                client.close()


class Broker:
    """Where a benchmark's tasks go: the benchmark's Redis (db 1) or RabbitMQ; queue depth and cleanup."""

    def __init__(self, kind: str, server: BenchRedis, cleanup: Cleanup) -> None:
        self.kind = kind
        self.server = server
        self.cleanup = cleanup

    def url(self) -> str:
        return RABBITMQ_URL if self.kind == "rabbitmq" else self.server.url(1)

    def own_queue(self, queue: str) -> None:
        """The queue (and, on RabbitMQ, its exchange) goes away with the benchmark."""
        if self.kind == "rabbitmq":
            self.cleanup.add(f"queue {queue}", functools.partial(_delete_rabbit_queue, queue))

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue``."""
        if self.kind == "rabbitmq":
            with Connection(RABBITMQ_URL) as conn:
                try:
                    _, count, _ = conn.default_channel.queue_declare(queue, passive=True)
                except NotFound:  # not declared yet: nothing published to it
                    return 0
                return int(count)
        return int(redis.Redis.from_url(self.server.url(1)).llen(queue))

    def purge(self, queue: str) -> None:
        """Drop the messages waiting in ``queue`` (no worker will take them)."""
        if self.kind == "rabbitmq":
            with Connection(RABBITMQ_URL) as conn:
                conn.default_channel.queue_purge(queue)
        else:
            redis.Redis.from_url(self.server.url(1)).delete(queue)


def _delete_rabbit_queue(queue: str) -> None:
    with Connection(RABBITMQ_URL) as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


def pythonpath_env() -> dict[str, str]:
    """Child processes import ``bench.*`` and ``tasks`` from the repository root."""
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + current if current else "")}


def run_quiet(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
