"""Soak: the whole stack at a steady rate, with faults and worker kills, for a long time; what drifts.

    python -m bench.soak [--minutes 60] [--rate 3] [--broker redis|rabbitmq] [--workers 2]
                         [--concurrency 8] [--window-s 60] [--kill-every-s 180] [--error-rate 0.05]
                         [--out soak.md] [--json PATH]

The sandbox, the real listener and ``--workers`` real workers (``bench.stack.Stack`` for the
sandbox, the settings, Redis and the broker; ``bench.chaos.Fleet`` for the processes, restarted
when they die as a supervisor would). Orders are seeded shortly before their turn and their
events published on the simulated bus at ``--rate`` per second; every simulator fails
``--error-rate`` of the calls with a transient error (``bench.chaos.set_faults``), and a worker is
SIGKILLed (and started again) every ``--kill-every-s`` on average. ``w1`` is never killed, so its
memory and descriptors are one process's over the whole soak; the kills go to the others (with one
worker, to it).

Every ``--window-s`` a row: runs published, finished and failed in the window; the latency
(event published → the Order's ``update_salesforce`` step done in the ledger, i.e. the
``Activated`` write) p50/p99 of the runs finished in it; the broker queue's depth; the Redis
server's ``used_memory`` and the ledger db's key count; the CPU of the stack and of the machine;
RSS and open descriptors of the listener and each worker (``/proc``); kills and restarts. The
table is printed as it goes and rewritten as Markdown to ``--out`` after each window; at the end a
drift line (last window ÷ first, per column), then the faults stop, the runs settle, and the
simulators' records are checked as ``bench.chaos`` checks them: each Order provisioned once.
Exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.chaos import CHAOS_SETTINGS, Check, Config, Fleet, check_effects, set_faults
from bench.common import (
    BenchRedis,
    Broker,
    Cleanup,
    Table,
    base_parser,
    cpu_seconds,
    emit,
    fmt,
    log,
    machine_info,
    machine_line,
    percentile,
    redis_cpu_seconds,
    run_main,
    workdir_for,
)
from bench.stack import Stack
from provisioning.core.logs import configure_logging
from provisioning.core.settings import Settings
from provisioning.ledger import RunState
from provisioning.runs.chain import CHAIN
from provisioning.sandbox.scenario import SeededOrder, event_payload, publish_events_admin

# The loop's tick, and how often it reads the ledger for runs that finished.
TICK_S = 0.25
POLL_S = 1.0
# Orders are seeded this far ahead of their publication (in one call each time); well below the
# reconciler's backfill grace, so no Order waits in Activating long enough to be backfilled.
SEED_AHEAD_S = 30.0
# Runs pending with none finished for this long (workers alive): logged as a stall.
STALL_S = 60.0
# The step whose end is the Order's Activated write: the latency's end.
ACTIVATED_STEP = "update_salesforce"
# Kills come at random intervals of this share around --kill-every-s.
KILL_JITTER = 0.5
SETTLE_POLL_S = 1.0
MB = 1024 * 1024
MIN_WIDTH = 7

FIXED_COLUMNS = [
    "window",
    "at UTC",
    "end min",
    "published",
    "finished",
    "failed",
    "p50 ms",
    "p99 ms",
    "queue",
    "Redis MB",
    "ledger keys",
    "stack CPU %",
    "sim CPU %",
    "machine CPU %",
    "sim RSS MB",
]
TAIL_COLUMNS = ["kills", "notes"]
# Columns the drift line leaves out: counters of events, not levels.
NO_DRIFT = {"window", "at UTC", "end min", "kills", "notes"}


# -- /proc and Redis --------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB; NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def open_fds(pid: int) -> int:
    """Open file descriptors of a process; -1 when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def redis_used_mb(client: redis.Redis) -> float:
    return float(client.info("memory")["used_memory"]) / MB


# -- the table and its drift --------------------------------------------------------------------


def columns_for(process_names: Sequence[str]) -> list[str]:
    cols = list(FIXED_COLUMNS)
    for name in process_names:
        cols += [f"{name} RSS MB", f"{name} FDs"]
    return cols + TAIL_COLUMNS


def drift(columns: Sequence[str], first: Sequence[Any], last: Sequence[Any]) -> list[Any]:
    """Per column, the last window's value ÷ the first's: a float, or "" where it means nothing
    (a column of counters or words, a first value of zero or none)."""
    out: list[Any] = []
    for name, a, b in zip(columns, first, last, strict=True):
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
        if name in NO_DRIFT or not numeric or a == 0 or math.isnan(a) or math.isnan(b):
            out.append("")
        else:
            out.append(round(b / a, 2))
    return out


def drift_line(columns: Sequence[str], ratios: Sequence[Any]) -> str:
    parts = [f"{name} x{ratio:.2f}" for name, ratio in zip(columns, ratios, strict=True) if ratio != ""]
    return "drift (last window ÷ first): " + (", ".join(parts) if parts else "n/a (fewer than two windows)")


def table_for(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> Table:
    table = Table(title, list(columns), notes=list(notes))
    for row in rows:
        table.add(*row)
    if len(rows) >= 2:
        ratios = drift(columns, rows[0], rows[-1])
        cells = [f"x{r:.2f}" if r != "" else "" for r in ratios]
        cells[0] = "drift (last ÷ first)"
        table.add(*cells)
    return table


def row_line(cells: Sequence[Any], columns: Sequence[str]) -> str:
    """One row for the terminal, as it comes (each column as wide as its name: the next rows are not
    known yet)."""
    texts = [fmt(c).rjust(max(MIN_WIDTH, len(name))) for c, name in zip(cells, columns, strict=True)]
    return "| " + " | ".join(texts) + " |"


# -- the soak ---------------------------------------------------------------------------------------


@dataclass
class Published:
    order: SeededOrder
    at: float


@dataclass
class Window:
    """What one window saw; the per-process samples are taken at its end."""

    published: int = 0
    finished: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    kills: int = 0
    notes: list[str] = field(default_factory=list)


class CpuTracker:
    """CPU seconds of processes that come and go (a restarted worker is a new pid, counted from 0)."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}

    def used(self, pids: Sequence[int]) -> float:
        total = 0.0
        for pid in pids:
            now = cpu_seconds(pid, tree=False)
            total += max(0.0, now - self.last.get(pid, 0.0))
            self.last[pid] = now
        return total


class Soak:
    def __init__(self, args: argparse.Namespace, stack: Stack, cleanup: Cleanup, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.sandbox = stack.sandbox
        overrides = {
            k: v for k, v in CHAOS_SETTINGS.items() if k not in ("log_format", "listener_health_port")
        }
        self.settings: Settings = stack.settings("soak", **overrides)
        self.services = stack.services(self.settings)
        self.rng = random.Random(args.seed)
        self.cfg = Config(
            workers=args.workers,
            concurrency=args.concurrency,
            error_rate=args.error_rate,
            ambiguous_rate=args.ambiguous_rate,
        )
        self.fleet = Fleet(
            self.settings.to_env(),
            workdir / "logs",
            self.cfg,
            self.rng,
            suffix=f"-{self.settings.ledger_prefix}",
        )
        cleanup.add("workers and listener", self.fleet.stop)
        self.ledger_client = redis.Redis.from_url(str(self.settings.redis_url))
        cleanup.add("ledger client", self.ledger_client.close)
        self.names = ["listener", *(f"w{i + 1}" for i in range(args.workers))]
        self.columns = columns_for(self.names)
        self.rows: list[list[Any]] = []
        self.orders: list[SeededOrder] = []
        self.ready: list[SeededOrder] = []
        self.pending: dict[str, Published] = {}  # run id → its Order and when its event went out
        self.failed_runs: list[str] = []
        self.stalls: list[str] = []
        self.cpu = CpuTracker()
        self.info: dict[str, Any] = {}
        self.checks: list[Check] = []
        self.violations: list[str] = []
        self._busy = (0.0, 0.0)
        self._redis_cpu = 0.0
        self._driver_cpu = 0.0
        self._to_publish = 0

    # -- pieces of the loop -----------------------------------------------------------------------

    def seed_more(self, count: int) -> None:
        seeded = self.stack.seed(self.services, count)
        self.orders += seeded
        self.ready += seeded

    def publish(self, count: int, window: Window) -> None:
        if len(self.ready) < count:
            # Never more than the soak will publish: an Order seeded and left Activating would be
            # backfilled by the reconciler, and its effects would not be any published Order's.
            ahead = min(math.ceil(self.args.rate * SEED_AHEAD_S), self._to_publish)
            self.seed_more(max(count - len(self.ready), ahead))
        batch, self.ready = self.ready[:count], self.ready[count:]
        at = time.time()
        publish_events_admin(self.sandbox, [event_payload(o) for o in batch])
        for order in batch:
            self.pending[order.run_id] = Published(order, at)
        window.published += len(batch)
        self._to_publish -= len(batch)

    def poll_finished(self, window: Window) -> int:
        """Move the runs the ledger shows ended out of pending; their latency into the window."""
        if not self.pending:
            return 0
        ledger = self.services.ledger
        ended = [r for r in ledger.runs.get_many(list(self.pending)) if not r.state.unfinished]
        for run in ended:
            sent = self.pending.pop(str(run.run_id))
            if run.state is RunState.FAILED:
                window.failed += 1
                self.failed_runs.append(str(run.run_id))
                continue
            window.finished += 1
            step = CHAIN.record(run, ledger.orders.provisioning(run.order_id), CHAIN[ACTIVATED_STEP])
            if step.at is not None:
                window.latencies_s.append(step.at - sent.at)
        return len(ended)

    def pids(self) -> dict[str, int]:
        out = {"listener": self.fleet.listener.pid} if self.fleet.listener is not None else {}
        out.update({f"w{i + 1}": w.pid for i, w in enumerate(self.fleet.workers) if w.proc is not None})
        return out

    def kill(self, window: Window) -> None:
        victims = self.fleet.workers[1:] or self.fleet.workers
        victim = self.rng.choice(victims)
        name = f"w{self.fleet.workers.index(victim) + 1}"
        self.fleet.kill_worker(victim)
        window.kills += 1
        window.notes.append(f"kill {name}")
        log(f"SIGKILL worker {name} (kill {self.fleet.stats.worker_kills}); started again")

    def supervise(self, window: Window) -> None:
        before = (self.fleet.stats.worker_crash_restarts, self.fleet.stats.listener_crash_restarts)
        self.fleet.supervise()
        after = (self.fleet.stats.worker_crash_restarts, self.fleet.stats.listener_crash_restarts)
        if after != before:
            note = f"died on its own, restarted (exit {self.fleet.stats.crash_exit_codes[-1]})"
            window.notes.append(note)
            log(f"a worker or the listener {note}")

    def sample(self, index: int, window: Window, started: float, span_s: float) -> list[Any]:
        pids = self.pids()
        stack_cpu = self.cpu.used(list(pids.values())) + self._redis_cpu_delta()
        busy, total = machine_busy()
        machine_pct = 100 * (busy - self._busy[0]) / max(1.0, total - self._busy[1])
        self._busy = (busy, total)
        row: list[Any] = [
            index,
            time.strftime("%H:%M:%S", time.gmtime()),
            round((time.monotonic() - started) / 60, 1),
            window.published,
            window.finished,
            window.failed,
            percentile(window.latencies_s, 50) * 1000,
            percentile(window.latencies_s, 99) * 1000,
            self.stack.broker.depth(self.settings.celery_queue),
            redis_used_mb(self.ledger_client),
            int(self.ledger_client.dbsize()),
            100 * stack_cpu / span_s,
            100 * self._driver_cpu_delta() / span_s,
            machine_pct,
            rss_mb(os.getpid()),
        ]
        for name in self.names:
            pid = pids.get(name)
            row += [rss_mb(pid), open_fds(pid)] if pid else [float("nan"), -1]
        row += [window.kills, "; ".join(window.notes)]
        return row

    def _driver_cpu_delta(self) -> float:
        now = time.process_time()
        used = now - self._driver_cpu
        self._driver_cpu = now
        return used

    def _redis_cpu_delta(self) -> float:
        now = redis_cpu_seconds(self.stack.redis_server.client)
        used = now - self._redis_cpu
        self._redis_cpu = now
        return used

    def write_out(self, notes: Sequence[str] = ()) -> Table:
        table = table_for(self.title(), self.columns, self.rows, notes)
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"{machine_line(self.info)}\n\n{table.render()}\n")
        return table

    def title(self) -> str:
        a = self.args
        return (
            f"Soak: {a.rate:g} Orders/s for {a.minutes:g} min, broker {a.broker}, {a.workers} workers x "
            f"{a.concurrency} threads, {a.error_rate:.0%} transient errors, a worker SIGKILL every "
            f"~{a.kill_every_s:g} s, windows of {a.window_s:g} s"
        )

    # -- the run ------------------------------------------------------------------------------------

    def run(self, info: dict[str, Any]) -> tuple[Table, list[Check], list[str]]:
        self.info = info
        a = self.args
        # Whole windows: the last one is as long as the others.
        windows = max(1, math.ceil(a.minutes * 60 / a.window_s))
        duration_s = windows * a.window_s
        self._to_publish = math.floor(duration_s * a.rate)
        self.seed_more(min(math.ceil(a.rate * SEED_AHEAD_S), self._to_publish))
        log(f"starting {a.workers} workers x {a.concurrency} threads and the listener (broker {a.broker})")
        self.fleet.start()
        set_faults(self.sandbox, self.cfg, on=True)
        log(f"faults on: {a.error_rate:.0%} transient errors, {a.ambiguous_rate:.0%} ambiguous; publishing")
        print(row_line(self.columns, self.columns), flush=True)

        started = time.monotonic()
        end = started + duration_s
        published = 0
        window, index = Window(), 1
        window_start = started
        next_poll = started
        next_kill = started + self._kill_interval() if a.kill_every_s > 0 else math.inf
        last_progress = started
        self._busy = machine_busy()
        self._redis_cpu = redis_cpu_seconds(self.stack.redis_server.client)
        self._driver_cpu = time.process_time()
        self.cpu.used(list(self.pids().values()))
        while True:
            now = time.monotonic()
            if index > windows:
                break
            if self._to_publish > 0:
                due = min(int((now - started) * a.rate) + 1 - published, self._to_publish)
                if due > 0:
                    self.publish(due, window)
                    published += due
            if now >= next_kill and now < end:
                self.kill(window)
                next_kill = now + self._kill_interval()
            self.supervise(window)
            if now >= next_poll:
                next_poll = now + POLL_S
                if self.poll_finished(window) or not self.pending:
                    last_progress = now
                elif now - last_progress > STALL_S:
                    self._stall(window, now - last_progress)
                    last_progress = now
            if now >= window_start + a.window_s:
                row = self.sample(index, window, started, now - window_start)
                self.rows.append(row)
                print(row_line(row, self.columns), flush=True)
                self.write_out()
                window, index, window_start = Window(), index + 1, now
            time.sleep(TICK_S)

        notes = self._settle_and_check()
        return self.write_out(notes), self.checks, self.violations

    def _kill_interval(self) -> float:
        s = float(self.args.kill_every_s)
        return self.rng.uniform(s * (1 - KILL_JITTER), s * (1 + KILL_JITTER))

    def _stall(self, window: Window, for_s: float) -> None:
        alive = {n: w.alive() for n, w in zip(self.names[1:], self.fleet.workers, strict=True)}
        depth = self.stack.broker.depth(self.settings.celery_queue)
        text = (
            f"STALL: no run finished for {for_s:.0f} s with {len(self.pending)} pending; queue {depth}; "
            f"workers alive {alive}; ledger unfinished {self.services.ledger.registries.unfinished()}"
        )
        self.stalls.append(f"{time.strftime('%H:%M:%S')} {text}")
        window.notes.append("STALL")
        log(text)

    def _settle_and_check(self) -> list[str]:
        a = self.args
        if self.ready:  # the last few of the plan, if the loop's ticks left them
            self.publish(len(self.ready), Window())
        set_faults(self.sandbox, self.cfg, on=False)
        log(f"publishing stopped, faults off; settling ({len(self.pending)} runs pending)")
        settle_start = time.monotonic()
        deadline = settle_start + a.settle_timeout_s
        scratch = Window()
        ledger = self.services.ledger
        while time.monotonic() < deadline:
            self.supervise(scratch)
            self.poll_finished(scratch)
            if not self.pending and ledger.registries.unfinished() == 0:
                break
            time.sleep(SETTLE_POLL_S)
        settle_s = time.monotonic() - settle_start
        if self.pending or ledger.registries.unfinished():
            self.violations.append(
                f"not settled within {a.settle_timeout_s:.0f} s: {len(self.pending)} runs pending, "
                f"{ledger.registries.unfinished()} unfinished in the ledger"
            )
        # Late redeliveries (a killed worker's messages) must find nothing left to do: wait, then count.
        quiet_until = time.monotonic() + self.settings.celery_visibility_timeout_s + 8
        while time.monotonic() < quiet_until:
            self.supervise(scratch)
            time.sleep(SETTLE_POLL_S)
        self.checks = check_effects(
            self.sandbox,
            self.services,
            self.orders,
            expect_failed=set(),
            message_id_domain=self.settings.email_message_id_domain,
        ).checks
        self.violations += [
            f"{c.name}: expected {c.expected}, observed {c.observed}" for c in self.checks if not c.ok
        ]
        stats = self.fleet.stats
        notes = [
            f"{len(self.orders)} Orders published; settled {settle_s:.1f} s after the last; {len(self.failed_runs)} runs failed",
            f"worker SIGKILLs {stats.worker_kills} (each started again at once); processes that died on their "
            f"own and were restarted: {stats.worker_crash_restarts} workers, {stats.listener_crash_restarts} "
            "listeners",
            "w1 is never killed: its RSS and FDs are one process's over the whole soak",
            "latency: event published → the Order's update_salesforce step done (its Activated write), "
            "runs finished in the window; CPU %: of one core (stack: listener, workers, Redis; sim: this "
            "process, the simulators and the soak's loop), of all cores (machine, others' work included)",
            *self.stalls,
            "exactly once: " + ("every check held" if not self.violations else "; ".join(self.violations)),
        ]
        return notes


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="publish for this long (default 60)")
    parser.add_argument("--rate", type=float, default=3.0, help="Orders published per second (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker (default 8)")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds per row (default 60)")
    parser.add_argument(
        "--kill-every-s",
        type=float,
        default=180.0,
        help="a worker SIGKILL this often on average, ±50%% (default 180; 0: none)",
    )
    parser.add_argument("--error-rate", type=float, default=0.05, help="transient errors per call (0.05)")
    parser.add_argument(
        "--ambiguous-rate", type=float, default=0.0, help="applied-then-lost calls per call (0)"
    )
    parser.add_argument("--settle-timeout-s", type=float, default=300.0, help="after publishing (300)")
    parser.add_argument("--seed", type=int, default=2028)
    parser.add_argument("--out", type=Path, help="write the table as Markdown here (after every window)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.rate <= 0 or args.window_s <= 0 or args.minutes <= 0:
        parser.error("--workers, --rate, --window-s and --minutes must be positive")

    with Cleanup() as cleanup:
        workdir = workdir_for(args, "soak", cleanup)
        server = BenchRedis(args.redis_url, workdir, cleanup)
        info = machine_info(server.client)
        stack = Stack(workdir, server, cleanup, broker=Broker(args.broker, server, cleanup), seed=args.seed)
        # This process's own log lines (the simulators') go to a file, not between the table's rows.
        runner_log = (workdir / "runner.log").open("a")
        cleanup.add("runner log", runner_log.close)
        soak = Soak(args, stack, cleanup, workdir)
        configure_logging(soak.settings, stream=runner_log)
        log(f"workdir {workdir}; {machine_line(info)}")
        table, checks, violations = soak.run(info)
        emit(
            "soak",
            args,
            info,
            [table],
            {
                "columns": soak.columns,
                "rows": soak.rows,
                "checks": [asdict(c) for c in checks],
                "violations": violations,
                "stalls": soak.stalls,
                "disruptions": asdict(soak.fleet.stats),
            },
        )
        if soak.rows:
            print(drift_line(soak.columns, drift(soak.columns, soak.rows[0], soak.rows[-1])), flush=True)
        for c in checks:
            print(f"{'ok' if c.ok else 'VIOLATION':9} {c.name}: expected {c.expected}, observed {c.observed}")
        print(
            "No violation." if not violations else "VIOLATIONS:\n" + "\n".join(f"  - {v}" for v in violations)
        )
        if args.out:
            print(f"table written to {args.out}", flush=True)
        return 1 if violations else 0


if __name__ == "__main__":
    run_main(main)
