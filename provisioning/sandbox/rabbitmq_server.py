"""A private RabbitMQ node, for the chaos run and the benchmarks (never the machine's shared one).

::

    node = RabbitServer(tmp / "rabbitmq").start()       # free AMQP and distribution ports
    settings = settings.model_copy(update={"celery_broker_url": node.url})
    node.stop()                                         # a clean stop (SIGTERM)
    node.start()                                        # back on the same ports, with its data

Its own node name, ports, data directory (mnesia: queues, quorum queue logs, durable
messages), log directory, configuration file, empty plugin list and Erlang cookie (its
``HOME`` is its directory), so starting, restarting or killing it never touches the
RabbitMQ on 5672 that other engineers use. The environment variables that make it
private: ``RABBITMQ_NODENAME``, ``RABBITMQ_NODE_IP_ADDRESS``, ``RABBITMQ_NODE_PORT``,
``RABBITMQ_DIST_PORT``, ``RABBITMQ_MNESIA_BASE``, ``RABBITMQ_LOG_BASE``,
``RABBITMQ_CONFIG_FILE``, ``RABBITMQ_ENABLED_PLUGINS_FILE`` and ``RABBITMQ_CONF_ENV_FILE``
(the system's ``rabbitmq-env.conf`` would name the shared node). Starting takes about
8 s here (the Erlang VM and the boot steps).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from kombu.connection import Connection

from provisioning.sandbox.processes import free_port

HOST = "127.0.0.1"
# The server script itself: /usr/sbin/rabbitmq-server (Debian) switches to the rabbitmq user and
# its environment, which would drop the variables that make the node private.
SERVER_SCRIPTS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/local/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
READY_POLL_S = 0.25
# One AMQP connection attempt while waiting for the node.
CONNECT_TIMEOUT_S = 2.0
LOG_TAIL_CHARS = 3000


def server_script() -> str:
    for path in SERVER_SCRIPTS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RuntimeError("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    return found


class RabbitServer:
    """One private RabbitMQ node; ``start()``/``stop()`` as often as needed, same ports and data."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = HOST,
        port: int | None = None,
        dist_port: int | None = None,
        executable: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.dist_port = dist_port if dist_port is not None else free_port(HOST)
        self.node_name = f"prov{self.port}@localhost"
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RabbitServer({self.node_name}, port={self.port}, alive={self.alive()})"

    @property
    def url(self) -> str:
        """The AMQP URL of the node's default vhost (guest/guest, allowed off loopback here)."""
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log" / f"{self.node_name}.log"

    @property
    def env(self) -> dict[str, str]:
        d = self.data_dir
        return {
            "HOME": str(d),  # the Erlang cookie: ours alone
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": HOST,
        }

    def _write_config(self) -> None:
        d = self.data_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {self.host}:{self.port}\n"
            # guest may log in from a network namespace's address too (a test network).
            "loopback_users = none\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("# private node: nothing from /etc/rabbitmq/rabbitmq-env.conf\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        try:
            with Connection(self.url, connect_timeout=CONNECT_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
            return True
        except Exception:
            return False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RabbitServer:
        """Start the node (again) and return once it takes AMQP connections."""
        if self.alive():
            raise RuntimeError(f"{self!r} is already running")
        self._write_config()
        executable = self.executable or server_script()
        with (self.data_dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [executable],
                env={**os.environ, **self.env},
                cwd=self.data_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if not self.alive() or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"RabbitMQ node {self.node_name} did not start within {timeout_s:.0f} s; "
                    f"{self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(READY_POLL_S)
        return self

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM: a clean stop (queues and messages on disk); SIGKILL: a crash. Its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # The whole group: the script's shell and the Erlang VM it started.
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RabbitServer:
        return self.start() if not self.alive() else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self) -> str:
        for path in (self.log_path, self.data_dir / "stdout.log"):
            try:
                return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            except OSError:
                continue
        return "(no log)"
