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

``RabbitCluster`` joins three such nodes into one cluster, where a quorum queue means
something: its leader and two followers on three nodes, each confirmed message on two of
them before the publisher is told::

    cluster = RabbitCluster(tmp / "cluster").start()    # three nodes, one Erlang cookie, joined
    settings = settings.model_copy(update={"celery_broker_url": cluster.url})   # every node, ';'
    leader = cluster.queue_leader("provisioning")      # the node whose Raft member leads the queue
    leader.stop(signal.SIGKILL)                         # the other two elect a new leader
    leader.start()                                      # it rejoins from its own data

The nodes share one cookie (a ``.erlang.cookie`` in each node's ``HOME``) and run with
``cluster_partition_handling = pause_minority``: a node that sees no majority of the
cluster (two of three down) pauses and closes its listeners, so a client is refused
there rather than served by a node that cannot commit anything. They are joined with
``rabbitmqctl join_cluster`` once all three run (classic peer discovery raced here when
the three started at once); a restarted node finds its cluster in its own data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
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
# One rabbitmqctl command (it starts an Erlang VM of its own: a second or two here).
CTL_TIMEOUT_S = 120.0
CLUSTER_SIZE = 3
# How a cluster node that sees no majority behaves: it pauses (refuses clients) until it does.
PARTITION_HANDLING = "pause_minority"
LEADER_POLL_S = 0.2


def server_script() -> str:
    for path in SERVER_SCRIPTS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RuntimeError("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    return found


def cli_tool(name: str) -> str:
    """rabbitmqctl or rabbitmq-queues next to the server script (not Debian's wrapper: see above)."""
    return str(Path(server_script()).with_name(name))


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
        cookie: str | None = None,
        config: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.dist_port = dist_port if dist_port is not None else free_port(HOST)
        self.node_name = f"prov{self.port}@localhost"
        self.executable = executable
        # The Erlang cookie, for nodes of one cluster; None: the node makes one of its own.
        self.cookie = cookie
        # More rabbitmq.conf lines (``cluster_partition_handling = ...``).
        self.config = list(config)
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
            "loopback_users = none\n" + "".join(f"{line}\n" for line in self.config)
        )
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("# private node: nothing from /etc/rabbitmq/rabbitmq-env.conf\n")
        cookie = d / ".erlang.cookie"
        if self.cookie is not None and not (cookie.exists() and cookie.read_text() == self.cookie):
            # Erlang refuses a cookie file others may read.
            if cookie.exists():
                cookie.chmod(0o600)
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)

    def ctl(self, *args: str, tool: str = "rabbitmqctl", timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run a RabbitMQ command-line tool against this node; its output (RuntimeError if it fails)."""
        done = subprocess.run(
            [cli_tool(tool), "--node", self.node_name, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} on {self.node_name} exited {done.returncode}: "
                f"{(done.stdout + done.stderr)[-LOG_TAIL_CHARS:]}"
            )
        return done.stdout

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


class RabbitCluster:
    """Three private RabbitMQ nodes joined into one cluster (module docstring): ``start()``, ``stop()``,
    and each node killed and started on its own (``cluster.nodes[i]``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        size: int = CLUSTER_SIZE,
        partition_handling: str = PARTITION_HANDLING,
    ) -> None:
        cookie = secrets.token_hex(20)
        self.nodes = [
            RabbitServer(
                Path(workdir) / f"node{n + 1}",
                cookie=cookie,
                config=[f"cluster_partition_handling = {partition_handling}"],
            )
            for n in range(size)
        ]

    def __repr__(self) -> str:
        return f"RabbitCluster({', '.join(repr(n) for n in self.nodes)})"

    @property
    def url(self) -> str:
        """Every node's URL, ``;``-separated: kombu connects to the first that answers, and fails
        over to the next when it goes."""
        return self.url_from(self.nodes[0])

    def url_from(self, first: RabbitServer) -> str:
        """The same list starting at ``first`` (a client that should connect there first)."""
        at = self.nodes.index(first)
        return ";".join(n.url for n in self.nodes[at:] + self.nodes[:at])

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RabbitCluster:
        """Start every node, join them into one cluster, return once every node runs in it."""
        fresh = not (self.nodes[0].data_dir / "mnesia").exists()
        self.start_nodes(self.nodes, timeout_s)
        if fresh:
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed.node_name)
                node.ctl("start_app")
        self.nodes[0].ctl("await_online_nodes", str(len(self.nodes)), timeout_s=timeout_s)
        return self

    @staticmethod
    def start_nodes(nodes: Sequence[RabbitServer], timeout_s: float = START_TIMEOUT_S) -> None:
        """Start these nodes at once (a node of a cluster may wait for the others while it boots)."""
        errors: list[BaseException] = []

        def start(node: RabbitServer) -> None:
            try:
                node.start(timeout_s)
            except BaseException as exc:  # raised below, on the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop every node (at once: a node stopping alone waits for the others' answer)."""
        threads = [threading.Thread(target=node.stop, args=(sig,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def running(self) -> list[RabbitServer]:
        return [node for node in self.nodes if node.alive()]

    def node_named(self, node_name: str) -> RabbitServer:
        return next(node for node in self.nodes if node.node_name == node_name)

    def queue_info(self, queue: str) -> dict[str, object] | None:
        """The queue as a running node lists it (name, leader, members, online); None if unknown."""
        for node in self.running():
            try:
                out = node.ctl(
                    "list_queues", "name", "leader", "members", "online", "--formatter", "json", "-q"
                )
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
            for row in json.loads(out or "[]"):
                if row.get("name") == queue:
                    return dict(row)
            return None
        return None

    def queue_leader(self, queue: str) -> RabbitServer | None:
        """The node whose member of the quorum queue leads it, when one does and it is running."""
        info = self.queue_info(queue)
        leader = str(info.get("leader") or "") if info else ""
        node = next((n for n in self.nodes if n.node_name == leader), None)
        return node if node is not None and node.alive() else None

    def wait_for_leader(
        self, queue: str, timeout_s: float, *, other_than: RabbitServer | None = None
    ) -> RabbitServer:
        """Until a running node leads the queue (``other_than``: a node that is not that one)."""
        return _poll_for(
            lambda: lead if (lead := self.queue_leader(queue)) is not other_than else None,
            timeout_s,
            f"a leader of quorum queue {queue!r}",
        )


def _poll_for(find: Callable[[], RabbitServer | None], timeout_s: float, what: str) -> RabbitServer:
    deadline = time.monotonic() + timeout_s
    while True:
        found = find()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(LEADER_POLL_S)
