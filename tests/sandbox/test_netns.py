"""Hosts as network namespaces: each reaches the data and api addresses over its own links, and loses
exactly the links that are cut; everything made is removed, on failure too."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from provisioning.sandbox.netns import Network, _ip, sweep_stale

# The probe inside the namespace gives up after this long (a cut link answers nothing).
PROBE_TIMEOUT_S = 1.0


def _listener(address: str) -> socket.socket:
    server = socket.create_server((address, 0))
    server.listen()
    return server


def _reaches(host, address: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        f"try: socket.create_connection(({address!r}, {port}), timeout={PROBE_TIMEOUT_S}).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    return subprocess.run(host.wrap([sys.executable, "-c", code]), check=False, timeout=10).returncode == 0


def _names() -> str:
    return _ip("netns", "list") + _ip("-o", "link", "show")


def test_a_host_reaches_both_addresses_and_a_cut_link_loses_only_what_is_behind_it() -> None:
    with Network() as net:
        h1, h2 = net.add_host(), net.add_host()
        assert h1.ip("data") != h2.ip("data")
        data, api = _listener(net.data_ip), _listener(net.api_ip)
        try:
            data_port, api_port = data.getsockname()[1], api.getsockname()[1]
            # Not reachable on the host's own loopback: it is another machine, as far as sockets go.
            assert not _reaches(h1, "127.0.0.1", data_port)
            assert _reaches(h1, net.data_ip, data_port)
            assert _reaches(h1, net.api_ip, api_port)

            h1.cut("data")
            assert not _reaches(h1, net.data_ip, data_port)
            assert _reaches(h1, net.api_ip, api_port)
            assert _reaches(h2, net.data_ip, data_port)  # the other host keeps its links

            h1.heal()
            assert _reaches(h1, net.data_ip, data_port)
            h1.cut()
            assert not _reaches(h1, net.data_ip, data_port)
            assert not _reaches(h1, net.api_ip, api_port)
            h1.heal()
            assert _reaches(h1, net.api_ip, api_port)
        finally:
            data.close()
            api.close()
        tag = net.tag
    assert tag not in _names()


def test_everything_is_removed_when_the_block_fails_and_a_dead_runs_leftovers_are_swept() -> None:
    def fail_inside() -> str:
        with Network() as net:
            net.add_host()
            assert net.tag in _names()
            raise RuntimeError(f"boom in {net.tag}")

    with pytest.raises(RuntimeError, match="boom") as caught:
        fail_inside()
    tag = str(caught.value).rsplit(" ", 1)[-1]
    assert tag not in _names()

    # A namespace named as made by a process that cannot exist (4194305 is above the largest pid).
    leftover = "pv4194305x0h1"
    _ip("netns", "add", leftover)
    try:
        assert leftover in sweep_stale()
    finally:
        _ip("netns", "del", leftover, check=False)
    assert leftover not in _names()
