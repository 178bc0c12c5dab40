"""Real WHMCS simulators over HTTPS, started per test, and our client pointed at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import urllib3
from pydantic import SecretStr

from provisioning.core.http import make_pool, make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.whmcs import WhmcsSimulator
from provisioning.whmcs.client import WhmcsClient


@dataclass
class WhmcsSandbox:
    sim: WhmcsSimulator
    thread: ServerThread
    session: requests.Session  # the simulator's admin API
    pool: urllib3.PoolManager  # the client's transport
    url: str

    def client(
        self, *, secret: str | None = None, identifier: str | None = None, **options: Any
    ) -> WhmcsClient:
        return WhmcsClient(
            session=self.pool,
            url=self.url,
            identifier=SecretStr(identifier or self.sim.identifier),
            secret=SecretStr(secret or self.sim.secret),
            **options,
        )

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        response = self.session.request(method, f"{self.url}/__admin/{path}", json=body, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def calls(self, action: str) -> int:
        return int(self.admin("GET", "calls")["calls"].get(action, 0))

    def orders(self) -> list[dict[str, Any]]:
        return self.admin("GET", "orders")["orders"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def whmcs_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("whmcs-client-tls"))


@pytest.fixture
def start_whmcs(whmcs_tls: SandboxTLS) -> Iterator[Callable[..., WhmcsSandbox]]:
    """Starts a simulator (options go to WhmcsSimulator); stopped after the test."""
    started: list[WhmcsSandbox] = []

    def start(**options: Any) -> WhmcsSandbox:
        sim = WhmcsSimulator(seed=11, **options)
        thread = ServerThread(ssl_context=whmcs_tls.server_context)
        thread.add_app("whmcs", sim.build_app())
        thread.start()
        box = WhmcsSandbox(
            sim,
            thread,
            make_session(whmcs_tls.ca_bundle),
            make_pool(whmcs_tls.ca_bundle),
            thread.url("whmcs"),
        )
        started.append(box)
        return box

    yield start
    for box in started:
        box.session.close()
        box.pool.clear()
        box.thread.stop()
