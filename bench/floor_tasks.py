"""No-op tasks for the Celery floor: ``celery -A bench.floor_tasks worker`` (PYTHONPATH = the repository root).

The app gets exactly our delivery settings (``celeryconfig.build(settings)``:
late acks, prefetch 1, task events, JSON) and our logging, so the floor
differs from a real worker only in that its tasks do nothing. The last task of
a chain counts the chain as done and notes the time in the ledger's Redis (one
pipelined round trip), which is how the benchmark knows that a chain finished
(no result backend is used).

``BENCH_FLOOR_WAIT`` makes every task wait, for ``bench.floor_io``: ``ping:K`` is
K Redis round trips (PING, on the ledger's server), ``sleep:S`` a sleep of S
seconds; empty (the default) is no wait.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import Celery, signals

import celeryconfig
from provisioning.core.cpus import parse_cpu_list, pin_process
from provisioning.core.logs import configure_logging
from provisioning.core.settings import Settings, load_settings

NOOP = "bench.noop"
NOOP_LAST = "bench.noop_last"

# What every task waits on, read once at import (the worker's environment).
WAIT_ENV = "BENCH_FLOOR_WAIT"

_settings: Settings | None = None
_redis: redis.Redis | None = None
_lock = threading.RLock()


def settings() -> Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = load_settings()
        return _settings


def done_key(s: Settings) -> str:
    return f"{s.ledger_prefix}:floor:done"


def last_key(s: Settings) -> str:
    return f"{s.ledger_prefix}:floor:last"


def _client() -> redis.Redis:
    global _redis
    with _lock:
        if _redis is None:
            _redis = redis.Redis.from_url(str(settings().redis_url))
        return _redis


app = Celery("bench-floor", set_as_current=False)
app.add_defaults(lambda: celeryconfig.build(settings()))


def parse_wait(value: str) -> tuple[str, float]:
    """``""`` -> ("", 0); ``ping:K`` -> ("ping", K); ``sleep:S`` -> ("sleep", S)."""
    if not value:
        return "", 0.0
    kind, _, amount = value.partition(":")
    try:
        number = float(amount)
    except ValueError:
        number = -1.0
    if kind not in ("ping", "sleep") or number < 0 or (kind == "ping" and not number.is_integer()):
        raise ValueError(
            f"{WAIT_ENV}={value!r}: expected ping:<round trips> (a whole number) or sleep:<seconds>"
        )
    return kind, number


_WAIT = parse_wait(os.environ.get(WAIT_ENV, ""))


def _wait() -> None:
    kind, amount = _WAIT
    if kind == "ping":
        client = _client()
        for _ in range(int(amount)):
            client.ping()
    elif kind == "sleep":
        time.sleep(amount)


def _logging(**_: Any) -> None:
    configure_logging(settings())


def _pin(sender: Any = None, **_: Any) -> None:
    # WORKER_CPUS, as our worker applies it (tasks/app.py): the floor is measured with the same options.
    if sender is not None and getattr(sender, "app", None) is app and settings().worker_cpus:
        pin_process(parse_cpu_list(str(settings().worker_cpus)))


def _after_fork(**_: Any) -> None:
    global _redis
    _redis = None


def noop(run_id: str) -> None:
    """Does nothing (but the configured wait): what is left is Celery's own cost of a task."""
    _wait()


def noop_last(run_id: str) -> None:
    """The end of a chain: count it and note when (one pipelined round trip)."""
    _wait()
    s = settings()
    pipe = _client().pipeline(transaction=False)
    pipe.incr(done_key(s))
    pipe.set(last_key(s), repr(time.time()))
    pipe.execute()


# Registered without decorators: Celery is untyped, and these stay plain typed functions.
signals.setup_logging.connect(_logging, weak=False)
signals.worker_process_init.connect(_after_fork, weak=False)
signals.worker_init.connect(_pin, weak=False)
app.task(name=NOOP)(noop)
app.task(name=NOOP_LAST)(noop_last)
