"""The SM-DP+ simulator over HTTPS on a free port, its admin routes, and our ES2+ client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from provisioning.core.http import make_pool, make_session
from provisioning.esim.client import Es2PlusClient
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.smdp import SmdpSimulator

REQUESTER = "provisioning-tests"


@dataclass
class SmdpSandbox:
    sim: SmdpSimulator
    thread: ServerThread
    tls: SandboxTLS
    admin_session: requests.Session
    requester: str = REQUESTER

    @property
    def url(self) -> str:
        return self.thread.url("smdp")

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        response = self.admin_session.request(
            method, f"{self.url}/__admin/{path}", json=body, params=params, timeout=5
        )
        response.raise_for_status()
        return response.json()

    def seed(self, count: int, profile_type: str = "default") -> list[str]:
        return self.admin("POST", "profiles", {"count": count, "profile_type": profile_type})["iccids"]  # type: ignore[no-any-return]

    def profile(self, iccid: str) -> dict[str, Any]:
        return self.admin("GET", f"profiles/{iccid}")  # type: ignore[no-any-return]

    def force(self, function: str, *kinds: str, **settings: Any) -> None:
        self.admin("POST", "faults", {**settings, "force": {function: list(kinds)}})

    def requests(self, function: str) -> list[dict[str, Any]]:
        return self.admin("GET", "requests", function=function)["requests"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def smdp_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("smdp-tls"))


@pytest.fixture
def smdp(smdp_tls: SandboxTLS) -> Iterator[SmdpSandbox]:
    sim = SmdpSimulator(seed=11, address="smdp.test.local")
    thread = ServerThread(ssl_context=smdp_tls.server_context)
    thread.add_app("smdp", sim.build_app())
    thread.start()
    admin = make_session(smdp_tls.ca_bundle)
    yield SmdpSandbox(sim=sim, thread=thread, tls=smdp_tls, admin_session=admin)
    admin.close()
    thread.stop()


@pytest.fixture
def client(smdp: SmdpSandbox) -> Iterator[Es2PlusClient]:
    pool = make_pool(smdp.tls.ca_bundle)
    yield Es2PlusClient(session=pool, url=smdp.url, requester_id=REQUESTER)
    pool.clear()
