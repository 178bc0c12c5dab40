"""Hosts of their own on one machine: network namespaces linked to the root namespace (tests; root only).

Each :class:`Host` is a network namespace with two links (veth pairs) to the root
namespace: a *data* link to a bridge where Redis, the sentinels and RabbitMQ listen
(:attr:`Network.data_ip`), and an *api* link to a bridge where the simulators listen
(:attr:`Network.api_ip`). A process runs on a host through :meth:`Host.wrap`
(``ip netns exec``), so everything it says to Redis or to an API crosses that
host's links, and only those::

    with Network() as net:
        h1 = net.add_host()
        redis = RedisServer(tmp / "redis", host=net.data_ip).start()
        sandbox = Sandbox(tmp / "sandbox", host=net.api_ip).start()
        worker = ManagedProcess("w1", h1.wrap(argv), env, log).start()
        h1.cut("data")     # a partition: the host loses Redis (and a Redis broker), keeps the APIs
        h1.heal()
        h1.cut()           # the host's links, all of them

Cutting a link sets its root end down (``ip link set ... down``): the host's end loses
its carrier, its packets go nowhere and nothing tells its TCP connections, which
retransmit until the link is back or they time out, as in a real partition. (This
machine has neither iptables nor nft, and tc has no drop action; link state needs
nothing but ``ip``.)

Names carry the creating process's id (``pv<pid>x<n>...``), so a run removes what it
made, on any failure too, and a later run removes what a killed one left behind.
Addresses are ``10.<k>.1.0/24`` (data) and ``10.<k>.2.0/24`` (api), with a ``k``
no local address uses.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

Link = Literal["data", "api"]
LINKS: tuple[Link, ...] = ("data", "api")
PREFIX = "pv"
# Each `ip` call is local and quick; a slow one means the kernel is stuck.
IP_TIMEOUT_S = 10.0
# Second octets tried for the private subnets (10.<k>.1.0/24 and 10.<k>.2.0/24).
SUBNET_OCTETS = range(100, 250)
# Host addresses on each subnet: .1 is the root end (the bridge), hosts from .11.
FIRST_HOST = 11
MAX_HOSTS = 9

_counter = itertools.count()
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def require_root() -> None:
    """Namespaces and links need root and ``ip`` (iproute2); say so plainly otherwise."""
    if shutil.which("ip") is None:
        raise RuntimeError("`ip` (iproute2) is not on PATH: install it (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise RuntimeError("network namespaces need root: run these tests as root (CI does)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and links that a run which no longer exists left behind; their names."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        name = parts[1].strip().split("@", 1)[0] if len(parts) > 1 else ""
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_octet() -> int:
    used = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", _ip("-o", "-4", "addr", "show"))}
    free = [k for k in SUBNET_OCTETS if k not in used]
    if not free:
        raise RuntimeError("no free 10.<k>.0.0/16 subnet for the test network")
    return random.choice(free)


class Network:
    """Two bridges in the root namespace (data and api) and the hosts linked to them."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}x{next(_counter) % 10}"
        self.octet = 0
        self.hosts: list[Host] = []
        self.bridges = {link: f"{self.tag}b{link[0]}" for link in LINKS}
        self.created = False

    def __repr__(self) -> str:
        return f"Network({self.tag}, data {self.data_ip}, api {self.api_ip}, {len(self.hosts)} hosts)"

    def subnet(self, link: Link) -> str:
        return f"10.{self.octet}.{LINKS.index(link) + 1}"

    @property
    def data_ip(self) -> str:
        """Where Redis, the sentinels and RabbitMQ listen (the root end of every data link)."""
        return f"{self.subnet('data')}.1"

    @property
    def api_ip(self) -> str:
        """Where the simulators listen (the root end of every api link)."""
        return f"{self.subnet('api')}.1"

    def create(self) -> Network:
        require_root()
        sweep_stale()
        self.octet = _free_octet()
        self.created = True
        for link, bridge in self.bridges.items():
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet(link)}.1/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
        return self

    def add_host(self, name: str | None = None) -> Host:
        if len(self.hosts) >= MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts per network")
        host = Host(self, len(self.hosts) + 1, name)
        self.hosts.append(host)
        host.create()
        return host

    def remove(self) -> None:
        """Every namespace, then the bridges (their veth ends go with the namespaces)."""
        errors = []
        for host in self.hosts:
            try:
                host.remove()
            except RuntimeError as exc:
                errors.append(str(exc))
        if self.created:
            for bridge in self.bridges.values():
                _ip("link", "del", bridge, check=False)
        self.hosts.clear()
        self.created = False
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


class Host:
    """One network namespace with a data link and an api link to the root namespace."""

    def __init__(self, network: Network, index: int, name: str | None = None) -> None:
        self.network = network
        self.index = index
        self.name = name or f"h{index}"
        self.netns = f"{network.tag}h{index}"
        # veth ends: <netns><link initial><r: root side | n: namespace side>
        self.ends = {link: (f"{self.netns}{link[0]}r", f"{self.netns}{link[0]}n") for link in LINKS}
        self.cut_links: set[Link] = set()

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.netns}, data {self.ip('data')}, cut {sorted(self.cut_links)})"

    def ip(self, link: Link) -> str:
        """This host's address on ``link``'s subnet."""
        return f"{self.network.subnet(link)}.{FIRST_HOST + self.index - 1}"

    def create(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        for link, (root_end, inner_end) in self.ends.items():
            _ip("link", "add", root_end, "type", "veth", "peer", "name", inner_end)
            _ip("link", "set", inner_end, "netns", self.netns)
            _ip("link", "set", root_end, "master", self.network.bridges[link])
            _ip("link", "set", root_end, "up")
            _ip("addr", "add", f"{self.ip(link)}/24", "dev", inner_end, netns=self.netns)
            _ip("link", "set", inner_end, "up", netns=self.netns)

    def remove(self) -> None:
        _ip("netns", "del", self.netns, check=False)
        for root_end, _ in self.ends.values():
            _ip("link", "del", root_end, check=False)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host (in its namespace)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self, *links: Link) -> None:
        """Take links down (all of them by default): the host's packets on them go nowhere."""
        for link in links or LINKS:
            _ip("link", "set", self.ends[link][0], "down")
            self.cut_links.add(link)

    def heal(self, *links: Link) -> None:
        for link in links or LINKS:
            _ip("link", "set", self.ends[link][0], "up")
            self.cut_links.discard(link)
