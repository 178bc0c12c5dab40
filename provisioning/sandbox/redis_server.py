"""A private ``redis-server`` process, for the tests, the benchmarks and the chaos run (never the workers).

::

    server = RedisServer(tmp / "redis", appendonly=True, appendfsync="always").start()
    settings = settings.model_copy(update={"redis_url": server.url(0)})
    server.stop(signal.SIGKILL)   # an outage, or a crash
    server.start()                # back on the same port, with its data directory (and AOF)

One process per instance, on a port of its own (a free one unless given), with
its data directory, log file and no RDB snapshots. Stopping it never touches the
shared Redis other engineers use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis

from provisioning.sandbox.processes import free_port

HOST = "127.0.0.1"
# How long a starting server may take to answer PING.
START_TIMEOUT_S = 15.0
# How long a stopping server gets after its signal before SIGKILL.
STOP_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
# PING's own connect and read limit while waiting for the server.
PING_TIMEOUT_S = 1.0
LOG_TAIL_CHARS = 2000

AppendFsync = Literal["always", "everysec", "no"]


class RedisServer:
    """One ``redis-server`` on ``127.0.0.1``; ``start()``/``stop()`` as often as needed, same port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: AppendFsync | None = None,
        executable: str = "redis-server",
    ) -> None:
        if appendfsync is not None and not appendonly:
            raise ValueError("appendfsync applies to the AOF: set appendonly=True as well")
        self.data_dir = Path(data_dir)
        self.port = port if port is not None else free_port(HOST)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def argv(self) -> list[str]:
        argv = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
        ]
        if self.appendfsync is not None:
            argv += ["--appendfsync", self.appendfsync]
        return argv

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, appendonly={self.appendonly}, alive={self.alive()})"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RedisServer:
        """Start the process (again) and return once it answers PING."""
        if self.alive():
            raise RuntimeError(f"{self!r} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Its own session: a Ctrl-C meant for the caller must not stop it behind the caller's back.
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        except FileNotFoundError:
            raise RuntimeError(
                f"{self.executable} is not on PATH: install Redis (Debian: apt-get install redis-server)"
            ) from None
        deadline = time.monotonic() + timeout_s
        while not self._answers_as_ours():
            if not self.alive() or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"redis-server on port {self.port} did not start within {timeout_s} s; "
                    f"{self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(READY_POLL_S)
        return self

    def pings(self) -> bool:
        client = redis.Redis.from_url(
            self.url(0), socket_connect_timeout=PING_TIMEOUT_S, socket_timeout=PING_TIMEOUT_S
        )
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def _answers_as_ours(self) -> bool:
        """Our process answers on the port (not another server that held it first)."""
        if not self.alive():
            return False
        assert self.proc is not None
        client = redis.Redis.from_url(
            self.url(0), socket_connect_timeout=PING_TIMEOUT_S, socket_timeout=PING_TIMEOUT_S
        )
        try:
            return int(client.info("server")["process_id"]) == self.proc.pid
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig`` (SIGTERM: a clean shutdown; SIGKILL: a crash) and wait; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RedisServer:
        return self.start() if not self.alive() else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"
