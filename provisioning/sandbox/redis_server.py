"""Private ``redis-server`` processes, for the tests, the benchmarks and the chaos run (never the workers).

::

    server = RedisServer(tmp / "redis", appendonly=True, appendfsync="always").start()
    settings = settings.model_copy(update={"redis_url": server.url(0)})
    server.stop(signal.SIGKILL)   # an outage, or a crash
    server.start()                # back on the same port, with its data directory (and AOF)

One process per instance, on a port of its own (a free one unless given), with
its data directory, log file and no RDB snapshots. Stopping it never touches the
shared Redis other engineers use.

Replication and Sentinel: ``RedisServer(..., replica_of=primary.address)`` is a
replica; :class:`RedisSentinel` is one sentinel (``redis-server --sentinel``);
:class:`SentinelGroup` is a primary, its replicas and three sentinels watching it::

    with SentinelGroup(tmp / "ha", master_name="ledger") as group:
        settings = settings.model_copy(update=group.settings_update())
        group.primary.stop(signal.SIGKILL)
        new = group.wait_for_failover()   # the replica the sentinels promoted
        group.replicas[0].pause()         # SIGSTOP: a replica that stops acknowledging

``host`` binds the servers to another address than 127.0.0.1 (the network
namespaces of :mod:`provisioning.sandbox.netns` reach them there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis

from provisioning.core.replication import online_replicas
from provisioning.sandbox.processes import free_port

HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# How long a starting server may take to answer PING.
START_TIMEOUT_S = 15.0
# How long a stopping server gets after its signal before SIGKILL.
STOP_TIMEOUT_S = 30.0
# A server still running this long after the signal gets it again.
STOP_RESEND_S = 1.0
READY_POLL_S = 0.05
# PING's own connect and read limit while waiting for the server.
PING_TIMEOUT_S = 1.0
LOG_TAIL_CHARS = 2000
# A replica's first copy starts at once (Redis 7 waits 5 s for more replicas to share it).
REPLICATION_OPTIONS = {"repl-diskless-sync-delay": "0"}
# Timeout of the helper's own clients (role, sentinel queries).
CLIENT_TIMEOUT_S = 5.0

AppendFsync = Literal["always", "everysec", "no"]


class RedisServer:
    """One ``redis-server`` (on ``127.0.0.1`` unless ``host``); ``start()``/``stop()`` as often as needed."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: AppendFsync | None = None,
        executable: str = "redis-server",
        host: str = HOST,
        replica_of: tuple[str, int] | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        if appendfsync is not None and not appendonly:
            raise ValueError("appendfsync applies to the AOF: set appendonly=True as well")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.executable = executable
        self.replica_of = replica_of
        # Further configuration directives, e.g. {"min-replicas-to-write": "1"}.
        self.options = dict(options or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

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
            self.host,
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
        if self.host not in LOOPBACK:
            # Bound to a test network's private address (netns), without a password: protected
            # mode would refuse every client there.
            argv += ["--protected-mode", "no"]
        if self.replica_of is not None:
            argv += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        for name, value in self.options.items():
            argv += [f"--{name}", value]
        return argv

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, appendonly={self.appendonly}, alive={self.alive()})"

    def client(self, db: int = 0) -> redis.Redis:
        """A client of this one server (not through Sentinel); close it after use."""
        return redis.Redis.from_url(self.url(db), socket_timeout=CLIENT_TIMEOUT_S)

    def role(self) -> str:
        """``master`` or ``slave``, as this server says now."""
        client = self.client()
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def replicas_caught_up(self) -> bool:
        """This primary's replicas (one at least) acknowledged everything it has written."""
        client = self.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        acked = [v["offset"] for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(acked) and min(acked) >= int(info["master_repl_offset"])

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets and answers nothing (a stalled replica, a GC pause)."""
        if self.proc is None or not self.alive():
            raise RuntimeError(f"{self!r} is not running: nothing to pause")
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is None or not self.alive():
            raise RuntimeError(f"{self!r} is not running: nothing to resume")
        self.proc.send_signal(signal.SIGCONT)

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
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                break
            # Again each round: Redis refuses a SIGTERM while it writes its first AOF (a replica
            # just in sync), and a paused (SIGSTOPped) process must run to act on any but SIGKILL.
            self.proc.send_signal(sig)
            if sig != signal.SIGKILL:
                self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.wait(STOP_RESEND_S)
            except subprocess.TimeoutExpired:
                continue
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


# Sentinel's timing for the tests: a master silent this long is down for one sentinel (the
# default, 30 s, would make every failover test half a minute longer).
SENTINEL_DOWN_AFTER_MS = 1000
# How long a failover may take before another sentinel tries again.
SENTINEL_FAILOVER_TIMEOUT_MS = 10_000
# How long a group may take to be ready: replicas in sync, every sentinel aware of all the others.
GROUP_READY_TIMEOUT_S = 30.0
# How long a failover may take, from the primary's death to a promoted replica that says so.
FAILOVER_TIMEOUT_S = 60.0
GROUP_POLL_S = 0.1


class RedisSentinel(RedisServer):
    """One sentinel (``redis-server sentinel.conf --sentinel``) watching one master."""

    def __init__(
        self,
        data_dir: Path,
        *,
        master_name: str,
        master: tuple[str, int],
        quorum: int = 2,
        port: int | None = None,
        host: str = HOST,
        down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
        failover_timeout_ms: int = SENTINEL_FAILOVER_TIMEOUT_MS,
        executable: str = "redis-server",
    ) -> None:
        super().__init__(data_dir, port=port, host=host, executable=executable)
        self.master_name = master_name
        self.master = master
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def __repr__(self) -> str:
        return f"RedisSentinel(port={self.port}, master_name={self.master_name!r}, alive={self.alive()})"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "sentinel.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "sentinel.log"

    @property
    def argv(self) -> list[str]:
        return [self.executable, str(self.config_path), "--sentinel"]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RedisServer:
        """Start; the first start writes sentinel.conf (the sentinel rewrites it with what it learns)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            name, (host, port) = self.master_name, self.master
            self.config_path.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        f"bind {self.host}",
                        f"dir {self.data_dir}",
                        f"logfile {self.log_path}",
                        f"sentinel monitor {name} {host} {port} {self.quorum}",
                        f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                        f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {name} 1",
                        *(["protected-mode no"] if self.host not in LOOPBACK else []),
                        "",
                    ]
                )
            )
        return super().start(timeout_s)

    def view(self) -> dict[str, str]:
        """``SENTINEL MASTER <name>``: what this sentinel knows of the master."""
        client = self.client()
        try:
            raw = client.execute_command("SENTINEL", "MASTER", self.master_name)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        if isinstance(raw, dict):
            return {_text(k): _text(v) for k, v in raw.items()}
        return {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}

    def master_address(self) -> tuple[str, int]:
        view = self.view()
        return view["ip"], int(view["port"])


class SentinelGroup:
    """A primary, its replicas (each with AOF) and sentinels watching them, on free ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "ledger",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        host: str = HOST,
        appendfsync: AppendFsync = "everysec",
        down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
    ) -> None:
        self.master_name = master_name
        self.host = host
        self.primary = RedisServer(
            workdir / "primary",
            appendonly=True,
            appendfsync=appendfsync,
            host=host,
            options=REPLICATION_OPTIONS,
        )
        self.replicas = [
            RedisServer(
                workdir / f"replica{i + 1}",
                appendonly=True,
                appendfsync=appendfsync,
                host=host,
                replica_of=self.primary.address,
                options=REPLICATION_OPTIONS,
            )
            for i in range(replicas)
        ]
        self.sentinels = [
            RedisSentinel(
                workdir / f"sentinel{i + 1}",
                master_name=master_name,
                master=self.primary.address,
                quorum=quorum,
                host=host,
                down_after_ms=down_after_ms,
            )
            for i in range(sentinels)
        ]

    @property
    def servers(self) -> list[RedisServer]:
        """The data servers (first the one started as primary), whatever their role now."""
        return [self.primary, *self.replicas]

    @property
    def sentinel_addresses(self) -> str:
        """``host:port,...`` as REDIS_SENTINELS wants it."""
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    def broker_url(self, db: int = 1) -> str:
        """A kombu ``sentinel://`` broker URL naming every sentinel."""
        return ";".join(f"sentinel://{s.host}:{s.port}/{db}" for s in self.sentinels)

    def settings_update(self, db: int = 0) -> dict[str, str]:
        """Settings for a ledger that reaches the master through the sentinels."""
        return {
            "redis_url": self.primary.url(db),
            "redis_sentinels": self.sentinel_addresses,
            "redis_sentinel_master": self.master_name,
        }

    def start(self, timeout_s: float = GROUP_READY_TIMEOUT_S) -> SentinelGroup:
        """Start every server and sentinel; return once the replicas are in sync and the sentinels
        know every replica and each other (before that, a failover could not happen)."""
        for server in self.servers:
            server.start()
        deadline = time.monotonic() + timeout_s
        _poll(lambda: self._replicas_online() == len(self.replicas), deadline, "replicas in sync")
        for sentinel in self.sentinels:
            sentinel.start()
        _poll(self._sentinels_aware, deadline, "sentinels aware of every replica and each other")
        return self

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def master_address(self) -> tuple[str, int]:
        """The master as the first sentinel that answers says."""
        for sentinel in self.sentinels:
            if sentinel.alive():
                try:
                    return sentinel.master_address()
                except redis.exceptions.RedisError:
                    continue
        raise RuntimeError("no sentinel answers")

    def server_at(self, address: tuple[str, int]) -> RedisServer:
        return next(s for s in self.servers if s.address == address)

    def master(self) -> RedisServer:
        return self.server_at(self.master_address())

    def wait_for_failover(self, timeout_s: float = FAILOVER_TIMEOUT_S) -> RedisServer:
        """After the master died: the server the sentinels promoted, once it says it is master and
        every live sentinel has heard it answer since.

        Until a sentinel has, a pause of the new master (a loaded machine) past down-after-milliseconds
        makes it down for that sentinel, which then promotes whatever it counts as a replica: the
        old primary, if a test has brought it back meanwhile, with only its AOF (seen in CI on
        2026-12-06). A test that restarts the old primary after this returns restarts a replica.
        """
        old = self.master_address()

        def promoted() -> bool:
            address = self.master_address()
            return (
                address != old
                and self.server_at(address).role() == "master"
                and all(_heard(sentinel, address) for sentinel in self.sentinels if sentinel.alive())
            )

        _poll(promoted, time.monotonic() + timeout_s, f"a failover away from {old[0]}:{old[1]}")
        return self.master()

    def wait_for_replicas(self, count: int, timeout_s: float = FAILOVER_TIMEOUT_S) -> None:
        """Until the current master has ``count`` replicas online (an old primary back as a replica).

        As long as a failover may take: the sentinels reconfigure a returning primary only once they
        have seen it up again, and it then loads its AOF and resyncs in full, on a loaded machine too.
        The master is asked of the sentinels at every look, not once: on a loaded machine a sentinel
        can find the master it has just promoted silent past down-after-milliseconds and promote
        the returning primary instead (seen in CI on 2026-12-06), and the replicas are then the new
        master's. A timeout names each server's role and the master's view of its replicas.
        """
        try:
            _poll(
                lambda: _online_replicas(self.master()) >= count,
                time.monotonic() + timeout_s,
                f"{count} replicas",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self._replication_view()}") from None

    def _replication_view(self) -> str:
        views = []
        for server in self.servers:
            client = server.client()
            try:
                info = client.info("replication")
                slaves = {k: v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()}
                views.append(
                    f"{server.port}: {info.get('role')} {info.get('master_link_status', '')} {slaves}"
                )
            except redis.exceptions.RedisError as exc:
                views.append(f"{server.port}: {type(exc).__name__}")
            finally:
                client.close()
        return "; ".join(views)

    def _replicas_online(self) -> int:
        return _online_replicas(self.primary)

    def _sentinels_aware(self) -> bool:
        for sentinel in self.sentinels:
            view = sentinel.view()
            if int(view.get("num-slaves", 0)) < len(self.replicas):
                return False
            if int(view.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        return True


def _heard(sentinel: RedisSentinel, address: tuple[str, int]) -> bool:
    """The sentinel takes ``address`` for the master, up, with no ping to it unanswered."""
    view = sentinel.view()
    return (
        (view["ip"], int(view["port"])) == address
        and view["flags"] == "master"
        and view.get("last-ping-sent") == "0"
    )


def _online_replicas(server: RedisServer) -> int:
    client = server.client()
    try:
        return online_replicas(client.info("replication"))
    except redis.exceptions.RedisError:
        return 0
    finally:
        client.close()


def _poll(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    while True:
        try:
            if predicate():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(GROUP_POLL_S)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
