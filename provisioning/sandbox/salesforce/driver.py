"""Drive a running Salesforce simulator from outside: admin calls, JWT assertions, raw REST, CometD, Pub/Sub.

For tests, the demo and benchmarks; it speaks plain HTTP with requests, so it
also works against a simulator in another process (build it from ``sim.env()``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import requests

from provisioning.core.http import make_session
from provisioning.sandbox.salesforce.auth import GRANT_TYPE_JWT

if TYPE_CHECKING:
    from provisioning.sandbox.salesforce.simulator import SalesforceSimulator

REQUEST_TIMEOUT_S = 10.0
# simple-salesforce and our client sign assertions valid for 3 minutes.
ASSERTION_LIFETIME_S = 180


class SandboxAdminError(Exception):
    """An admin or login call to the simulator did not answer 200."""


class SalesforceDriver:
    """Client-side helper for one simulator at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        username: str,
        private_key_file: Path,
        api_version: str = "64.0",
        ca_bundle: Path | None = None,
    ) -> None:
        self.url = base_url.rstrip("/")
        self.client_id = client_id
        self.username = username
        self.private_key_file = Path(private_key_file)
        self.version = api_version
        self.ca_bundle = ca_bundle
        self.session = make_session(ca_bundle)
        # host:port of the simulator's Pub/Sub API, when it is served.
        self.pubsub_endpoint: str | None = None

    @classmethod
    def for_simulator(
        cls, sim: SalesforceSimulator, base_url: str, ca_bundle: Path | None
    ) -> SalesforceDriver:
        return cls(
            base_url,
            client_id=sim.client_id,
            username=sim.username,
            private_key_file=sim.private_key_file,
            api_version=sim.api_version,
            ca_bundle=ca_bundle,
        )

    def new_session(self) -> requests.Session:
        """A session with its own cookie jar (one per CometD client)."""
        return make_session(self.ca_bundle)

    # -- OAuth --------------------------------------------------------------------------------

    def assertion(self, key: bytes | None = None, **claims: Any) -> str:
        """A signed JWT for the token endpoint; a claim given as None is left out."""
        payload: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.username,
            "aud": self.url,
            "exp": int(time.time()) + ASSERTION_LIFETIME_S,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.private_key_file.read_bytes(), algorithm="RS256")

    def token_response(self, assertion: str, grant_type: str = GRANT_TYPE_JWT) -> requests.Response:
        return self.session.post(
            f"{self.url}/services/oauth2/token",
            data={"grant_type": grant_type, "assertion": assertion},
            timeout=REQUEST_TIMEOUT_S,
        )

    def login(self) -> str:
        """A fresh access token."""
        response = self.token_response(self.assertion())
        if response.status_code != 200:
            raise SandboxAdminError(f"login failed: HTTP {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    # -- REST and Streaming -------------------------------------------------------------------

    def rest(self, method: str, path: str, token: str | None, **kwargs: Any) -> requests.Response:
        """``{method} /services/data/v{version}/{path}`` with the bearer token (none: no header)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"{self.url}/services/data/v{self.version}/{path}"
        return self.session.request(method, url, headers=headers, timeout=REQUEST_TIMEOUT_S, **kwargs)

    def bayeux(
        self, session: requests.Session, token: str | None, messages: Any, timeout: float = REQUEST_TIMEOUT_S
    ) -> requests.Response:
        """POST ``messages`` (sent as given) to ``/cometd/{version}`` on ``session``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return session.post(
            f"{self.url}/cometd/{self.version}", json=messages, headers=headers, timeout=timeout
        )

    def pubsub_stub(self) -> Any:
        """A raw gRPC stub of the simulator's Pub/Sub API (TLS with the sandbox CA)."""
        import grpc

        from provisioning.salesforce.pubsub import pubsub_api_pb2_grpc

        if self.pubsub_endpoint is None:
            raise SandboxAdminError("this simulator's Pub/Sub endpoint is not known")
        roots = self.ca_bundle.read_bytes() if self.ca_bundle is not None else None
        channel = grpc.secure_channel(self.pubsub_endpoint, grpc.ssl_channel_credentials(roots))
        return pubsub_api_pb2_grpc.PubSubStub(channel)  # type: ignore[no-untyped-call]

    def pubsub_metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        """The Pub/Sub API's auth metadata for ``token`` (a fresh login when None)."""
        response = self.token_response(self.assertion())
        if response.status_code != 200:
            raise SandboxAdminError(f"login failed: HTTP {response.status_code} {response.text}")
        body = response.json()
        org_id = str(body["id"]).rstrip("/").split("/")[-2]
        return (
            ("accesstoken", token or str(body["access_token"])),
            ("instanceurl", str(body["instance_url"])),
            ("tenantid", org_id),
        )

    # -- admin --------------------------------------------------------------------------------

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> requests.Response:
        return self.session.request(
            method, f"{self.url}/__admin/{path}", json=body, params=params, timeout=REQUEST_TIMEOUT_S
        )

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        """The JSON answer of an admin call that must succeed."""
        response = self.admin(method, path, body, **params)
        if response.status_code != 200:
            raise SandboxAdminError(f"{method} /__admin/{path}: HTTP {response.status_code} {response.text}")
        return response.json()

    def seed(self, **order: Any) -> str:
        """Create one Order (admin seed keys) and return its 18-character Id."""
        return str(self.ok("POST", "orders", order)["ids"][0])

    def order(self, order_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"orders/{order_id}"))

    def publish(self, payloads: list[dict[str, Any]], channel: str | None = None) -> list[int]:
        """Publish events straight onto the bus; their replay ids."""
        params = {"channel": channel} if channel else {}
        return [int(e["replayId"]) for e in self.ok("POST", "events", payloads, **params)["events"]]

    def calls(self) -> dict[str, int]:
        return dict(self.ok("GET", "calls")["calls"])
