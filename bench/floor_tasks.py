"""No-op tasks for the Celery floor: ``celery -A bench.floor_tasks worker`` (PYTHONPATH = the repository root).

The app gets exactly our delivery settings (``celeryconfig.build(settings)``:
late acks, prefetch 1, task events, JSON) and our logging, so the floor
differs from a real worker only in that its tasks do nothing. The last task of
a chain counts the chain as done and notes the time in the ledger's Redis (one
pipelined round trip), which is how the benchmark knows that a chain finished
(no result backend is used).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery import Celery, signals

import celeryconfig
from provisioning.core.logs import configure_logging
from provisioning.core.settings import Settings, load_settings

NOOP = "bench.noop"
NOOP_LAST = "bench.noop_last"

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


def _logging(**_: Any) -> None:
    configure_logging(settings())


def _after_fork(**_: Any) -> None:
    global _redis
    _redis = None


def noop(run_id: str) -> None:
    """Does nothing: what is left is Celery's own cost of a task."""


def noop_last(run_id: str) -> None:
    """The end of a chain: count it and note when (one pipelined round trip)."""
    s = settings()
    pipe = _client().pipeline(transaction=False)
    pipe.incr(done_key(s))
    pipe.set(last_key(s), repr(time.time()))
    pipe.execute()


# Registered without decorators: Celery is untyped, and these stay plain typed functions.
signals.setup_logging.connect(_logging, weak=False)
signals.worker_process_init.connect(_after_fork, weak=False)
app.task(name=NOOP)(noop)
app.task(name=NOOP_LAST)(noop_last)
