"""The SMTP simulator on a real port, with its admin app over HTTPS, for the e-mail tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from provisioning.core.http import make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.smtp import SmtpSimulator


@dataclass
class SmtpSandbox:
    sim: SmtpSimulator
    thread: ServerThread
    admin: requests.Session
    tls: SandboxTLS

    @property
    def host(self) -> str:
        return self.thread.host

    @property
    def port(self) -> int:
        return self.thread.ports["smtp"]

    def admin_get(self, path: str, **params: str) -> Any:
        response = self.admin.get(f"{self.thread.url('admin')}/__admin/{path}", params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def messages(self, **params: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.admin_get("messages", **params)["messages"]
        return messages

    def raw(self, number: int) -> bytes:
        response = self.admin.get(f"{self.thread.url('admin')}/__admin/messages/{number}", timeout=5)
        response.raise_for_status()
        return response.content

    def force(self, *kinds: str) -> None:
        response = self.admin.post(
            f"{self.thread.url('admin')}/__admin/faults", json={"force": {"DATA": list(kinds)}}, timeout=5
        )
        response.raise_for_status()


@pytest.fixture(scope="session")
def sandbox_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("email-tls"))


@pytest.fixture
def smtp_sandbox_factory(sandbox_tls: SandboxTLS) -> Iterator[Callable[..., SmtpSandbox]]:
    """Starts an SmtpSimulator built with the given keyword arguments (plus its admin app)."""
    started: list[tuple[ServerThread, requests.Session]] = []

    def start(**kwargs: Any) -> SmtpSandbox:
        sim = SmtpSimulator(seed=1, **kwargs)
        thread = ServerThread(ssl_context=sandbox_tls.server_context)
        thread.add_server("smtp", sim.starter())
        thread.add_app("admin", sim.build_admin_app())
        thread.start()
        admin = make_session(sandbox_tls.ca_bundle)
        started.append((thread, admin))
        return SmtpSandbox(sim=sim, thread=thread, admin=admin, tls=sandbox_tls)

    yield start
    for thread, admin in started:
        admin.close()
        thread.stop()


@pytest.fixture
def smtp_sandbox(smtp_sandbox_factory: Callable[..., SmtpSandbox]) -> SmtpSandbox:
    return smtp_sandbox_factory()
