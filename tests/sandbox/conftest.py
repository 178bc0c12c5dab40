"""Fixtures for the Salesforce simulator's contract tests: a real server over TLS on a free port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
import requests

from provisioning.http import make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.salesforce import SalesforceSimulator

SF_REQUEST_TIMEOUT_S = 10.0


class SalesforceHarness:
    """One running simulator plus helpers to log in, call REST and CometD, and use the admin API."""

    def __init__(self, sim: SalesforceSimulator, thread: ServerThread, tls: SandboxTLS) -> None:
        self.sim = sim
        self.thread = thread
        self.ca_bundle = tls.ca_bundle
        self.url = thread.url("salesforce")
        self.session = make_session(tls.ca_bundle)
        self.version = sim.api_version

    def new_session(self) -> requests.Session:
        return make_session(self.ca_bundle)

    # -- OAuth --------------------------------------------------------------------------------

    def assertion(self, key: bytes | None = None, **claims: Any) -> str:
        payload = {"iss": self.sim.client_id, "sub": self.sim.username, "aud": self.url, "exp": int(time.time()) + 180}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.sim.private_key_file.read_bytes(), algorithm="RS256")

    def token_response(self, assertion: str, grant_type: str = "urn:ietf:params:oauth:grant-type:jwt-bearer") -> requests.Response:
        return self.session.post(
            f"{self.url}/services/oauth2/token",
            data={"grant_type": grant_type, "assertion": assertion},
            timeout=SF_REQUEST_TIMEOUT_S,
        )

    def login(self) -> str:
        response = self.token_response(self.assertion())
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    # -- REST ---------------------------------------------------------------------------------

    def rest(self, method: str, path: str, token: str | None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.request(
            method, f"{self.url}/services/data/v{self.version}/{path}", headers=headers, timeout=SF_REQUEST_TIMEOUT_S, **kwargs
        )

    # -- CometD -------------------------------------------------------------------------------

    def bayeux(self, session: requests.Session, token: str | None, messages: Any, timeout: float = SF_REQUEST_TIMEOUT_S) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return session.post(f"{self.url}/cometd/{self.version}", json=messages, headers=headers, timeout=timeout)

    # -- admin --------------------------------------------------------------------------------

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> requests.Response:
        return self.session.request(method, f"{self.url}/__admin/{path}", json=body, params=params, timeout=SF_REQUEST_TIMEOUT_S)

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        response = self.admin(method, path, body, **params)
        assert response.status_code == 200, response.text
        return response.json()

    def seed(self, **order: Any) -> str:
        return str(self.ok("POST", "orders", order)["ids"][0])

    def order(self, order_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"orders/{order_id}"))

    def calls(self) -> dict[str, int]:
        return dict(self.ok("GET", "calls")["calls"])


@pytest.fixture(scope="session")
def sf_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("sf-tls"))


@pytest.fixture
def start_sf(sf_tls: SandboxTLS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SalesforceHarness]]:
    """Start a simulator with the given constructor options; every one started is stopped afterwards."""
    threads: list[ServerThread] = []

    def start(**options: Any) -> SalesforceHarness:
        options = {"seed": 11, "long_poll_s": 1.0, **options}
        sim = SalesforceSimulator(tmp_path_factory.mktemp("sf"), **options)
        thread = ServerThread(ssl_context=sf_tls.server_context)
        thread.add_app("salesforce", sim.build_app())
        thread.start()
        threads.append(thread)
        return SalesforceHarness(sim, thread, sf_tls)

    yield start
    for thread in threads:
        thread.stop()


@pytest.fixture
def sf(start_sf: Callable[..., SalesforceHarness]) -> SalesforceHarness:
    return start_sf()
