"""Fixtures for the Salesforce simulator's contract tests: a real server over TLS on a free port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.salesforce import SalesforceSimulator
from provisioning.sandbox.salesforce.driver import SalesforceDriver

StartSalesforce = Callable[..., SalesforceDriver]


@pytest.fixture(scope="session")
def sf_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("sf-tls"))


@pytest.fixture
def start_sf(sf_tls: SandboxTLS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartSalesforce]:
    """Start a simulator with the given constructor options; every one started is stopped afterwards."""
    threads: list[ServerThread] = []

    def start(**options: Any) -> SalesforceDriver:
        options = {"seed": 11, "long_poll_s": 1.0, **options}
        sim = SalesforceSimulator(tmp_path_factory.mktemp("sf"), **options)
        thread = ServerThread(ssl_context=sf_tls.server_context)
        thread.add_app("salesforce", sim.build_app())
        thread.add_server(
            "pubsub",
            sim.pubsub.starter("127.0.0.1", 0, sf_tls.server_cert_chain_pem, sf_tls.server_key_pem),
        )
        thread.start()
        threads.append(thread)
        driver = SalesforceDriver.for_simulator(sim, thread.url("salesforce"), sf_tls.ca_bundle)
        driver.pubsub_endpoint = f"127.0.0.1:{thread.ports['pubsub']}"
        return driver

    yield start
    for thread in threads:
        thread.stop()


@pytest.fixture
def sf(start_sf: StartSalesforce) -> SalesforceDriver:
    return start_sf()
