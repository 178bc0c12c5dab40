"""All four simulators together (Salesforce with its Pub/Sub API): one TLS CA, one server thread, one env file.

Used by ``provisioning sandbox``, the demo, the tests and the benchmarks::

    with Sandbox(workdir) as sandbox:
        env = sandbox.env()          # points our processes at the simulators
        sandbox.admin("whmcs").post("/__admin/clients", [...])
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from provisioning.core.http import make_session
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.salesforce import SalesforceSimulator
from provisioning.sandbox.salesforce.pubsub import DEFAULT_KEEPALIVE_S
from provisioning.sandbox.smdp import SmdpSimulator
from provisioning.sandbox.smtp import SmtpSimulator
from provisioning.sandbox.whmcs import WhmcsSimulator

HOST = "127.0.0.1"
SIMULATORS = ("salesforce", "whmcs", "smdp", "smtp")
# Admin calls are local and quick; a slow one means the sandbox is stuck.
ADMIN_TIMEOUT_S = 30.0


class AdminClient:
    """JSON calls to one simulator's /__admin routes."""

    def __init__(self, *, session: requests.Session, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    def get(self, path: str, **params: Any) -> Any:
        response = self.session.get(self.base_url + path, params=params or None, timeout=ADMIN_TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def patch(self, path: str, body: Any) -> Any:
        response = self.session.patch(self.base_url + path, json=body, timeout=ADMIN_TIMEOUT_S)
        response.raise_for_status()
        return response.json() if response.content else None

    def post(self, path: str, body: Any = None) -> Any:
        response = self.session.post(
            self.base_url + path, json=body if body is not None else {}, timeout=ADMIN_TIMEOUT_S
        )
        response.raise_for_status()
        return response.json() if response.content else None


class Sandbox:
    """The simulators of Salesforce, WHMCS, SM-DP+ and SMTP on local ports (0: free ones)."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int | None = None,
        ports: dict[str, int] | None = None,
        long_poll_s: float = 110.0,
        token_lifetime_s: float = 7200.0,
        pubsub_keepalive_s: float = DEFAULT_KEEPALIVE_S,
        host: str = HOST,
    ) -> None:
        self.workdir = workdir
        # The address every simulator listens on (another than 127.0.0.1: reachable from network
        # namespaces, see provisioning.sandbox.netns); the certificate names it.
        self.host = host
        self.ports_wanted = ports or {}
        self.tls = SandboxTLS.create(workdir, extra_hosts=(host,) if host != HOST else ())
        self.salesforce = SalesforceSimulator(
            workdir,
            seed=seed,
            long_poll_s=long_poll_s,
            token_lifetime_s=token_lifetime_s,
            pubsub_keepalive_s=pubsub_keepalive_s,
        )
        self.whmcs = WhmcsSimulator(seed=seed)
        self.smdp = SmdpSimulator(seed=seed)
        self.smtp = SmtpSimulator(seed=seed)
        self.server = ServerThread(host, ssl_context=self.tls.server_context)
        self.server.add_app("salesforce", self.salesforce.build_app(), self.ports_wanted.get("salesforce", 0))
        self.server.add_app("whmcs", self.whmcs.build_app(), self.ports_wanted.get("whmcs", 0))
        self.server.add_app("smdp", self.smdp.build_app(), self.ports_wanted.get("smdp", 0))
        self.server.add_app("smtp_admin", self.smtp.build_admin_app(), self.ports_wanted.get("smtp_admin", 0))
        self.server.add_server("smtp", self.smtp.starter(host, self.ports_wanted.get("smtp", 0)))
        self.server.add_server(
            "salesforce_pubsub",
            self.salesforce.pubsub.starter(
                host,
                self.ports_wanted.get("salesforce_pubsub", 0),
                self.tls.server_cert_chain_pem,
                self.tls.server_key_pem,
            ),
        )
        self._session: requests.Session | None = None

    def start(self) -> Sandbox:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.stop()

    def url(self, name: str) -> str:
        return self.server.url(name)

    @property
    def urls(self) -> dict[str, str]:
        return {
            "salesforce": self.url("salesforce"),
            "salesforce_pubsub": self.pubsub_endpoint,
            "whmcs": self.url("whmcs"),
            "smdp": self.url("smdp"),
            "smtp": f"smtp://{self.host}:{self.server.ports['smtp']}",
            "smtp_admin": self.url("smtp_admin"),
        }

    @property
    def pubsub_endpoint(self) -> str:
        """The Pub/Sub API's host:port (gRPC over TLS), as SF_PUBSUB_ENDPOINT wants it."""
        return f"{self.host}:{self.server.ports['salesforce_pubsub']}"

    def env(self) -> dict[str, str]:
        """Environment variables pointing the listener, the workers and the CLI at the simulators."""
        return {
            **self.salesforce.env(self.url("salesforce"), self.pubsub_endpoint),
            **self.whmcs.env(self.url("whmcs")),
            **self.smdp.env(self.url("smdp")),
            **self.smtp.env(self.host, self.server.ports["smtp"]),
            "TLS_CA_BUNDLE": str(self.tls.ca_bundle),
            # The ES2+ notification endpoint (`provisioning esim-notify`): the sandbox CA's server
            # certificate; the SM-DP+ simulator authenticates with a client certificate of that CA and
            # its requester id (configure it with /__admin/notify to call the endpoint).
            "ESIM_NOTIFY_CERT_FILE": str(self.tls.server_cert_file),
            "ESIM_NOTIFY_KEY_FILE": str(self.tls.server_key_file),
            "ESIM_NOTIFY_CLIENT_CA": str(self.tls.ca_bundle),
            "ESIM_NOTIFY_REQUESTER_IDS": self.smdp.requester_id,
        }

    def write_env_file(self, path: Path) -> Path:
        lines = ["# Written by `provisioning sandbox`: points our processes at the simulators."]
        lines += [f"{key}={value}" for key, value in sorted(self.env().items())]
        path.write_text("\n".join(lines) + "\n")
        return path

    def admin(self, name: str) -> AdminClient:
        if self._session is None:
            self._session = make_session(self.tls.ca_bundle)
        base = self.url("smtp_admin" if name == "smtp" else name)
        return AdminClient(session=self._session, base_url=base)
