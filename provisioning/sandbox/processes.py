"""Start and stop the real processes (workers, the listener) for the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# How long a new worker may take to say it is ready.
WORKER_READY_TIMEOUT_S = 60.0
# How long a stopping process gets after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
READY_POLL_S = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for a child process's server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout_s: float, *, after: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_text()[after:]:
                return
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited ({self.proc and self.proc.returncode}); log:\n{self.log_text()[-3000:]}"
                )
            time.sleep(READY_POLL_S)
        raise TimeoutError(
            f"{self.name} did not log {needle!r} within {timeout_s}s; log:\n{self.log_text()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (a prefork worker's children too)."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def worker(
    env: dict[str, str],
    log_dir: Path,
    *,
    name: str = "worker1",
    pool: str = "threads",
    concurrency: int = 8,
    extra: list[str] | None = None,
    app: str = "tasks",
) -> ManagedProcess:
    """A real ``celery -A <app> worker`` process (not yet started); ``tasks`` is ours."""
    argv = [
        _bin("celery"),
        "-A",
        app,
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        *(extra or []),
    ]
    return ManagedProcess(name, argv, env, log_dir / f"{name}.log")


def start_worker(env: dict[str, str], log_dir: Path, **kwargs: object) -> ManagedProcess:
    proc = worker(env, log_dir, **kwargs).start()  # type: ignore[arg-type]
    proc.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
    return proc


def esim_notify(
    env: dict[str, str], log_dir: Path, *, port: int, name: str = "esim-notify"
) -> ManagedProcess:
    """A real ``provisioning esim-notify`` process (not yet started) on ``port``."""
    argv = [_bin("provisioning"), "esim-notify", "--port", str(port)]
    return ManagedProcess(name, argv, env, log_dir / f"{name}.log")


def listener(
    env: dict[str, str], log_dir: Path, *, name: str = "listener", extra: list[str] | None = None
) -> ManagedProcess:
    argv = [_bin("provisioning"), "listen", *(extra or [])]
    return ManagedProcess(name, argv, env, log_dir / f"{name}.log")
