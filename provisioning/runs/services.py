"""One process's connections and clients, built once from Settings and shared by its threads."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

from provisioning.core.redis_client import redis_from_settings
from provisioning.core.replication import ReplicaWait
from provisioning.core.retry import RetryPolicy
from provisioning.core.settings import Settings
from provisioning.ledger import Ledger
from provisioning.ledger.inventory import EsimInventory
from provisioning.runs.chain import CHAIN, Chain
from provisioning.runs.protection import Protection

if TYPE_CHECKING:
    from provisioning.email.sender import SmtpSender
    from provisioning.esim.client import Es2PlusClient
    from provisioning.salesforce.client import SalesforceClient
    from provisioning.whmcs.client import WhmcsClient

T = TypeVar("T")
# How often a process keeps the Salesforce API usage its answers report (seconds).
API_USAGE_NOTE_S = 10.0


class Services:
    """Lazily built clients: a worker builds only what its steps use, once, after any fork."""

    def __init__(self, settings: Settings, chain: Chain = CHAIN) -> None:
        self.settings = settings
        # The steps the runs go through (a test may add one: see docs/architecture.md).
        self.chain = chain
        self.retry = RetryPolicy.from_settings(settings)
        self.redis = redis_from_settings(settings)
        # Writes that guard an external effect wait for a replica (when there are replicas).
        self.replicas = ReplicaWait(redis=self.redis, timeout_ms=settings.redis_wait_timeout_ms)
        self.ledger = Ledger(
            redis=self.redis,
            prefix=settings.ledger_prefix,
            retention_s=settings.run_retention_days * 86400,
            lease_ttl_s=settings.run_lease_ttl_s,
            replicas=self.replicas,
        )
        # Each external system's rate limit and circuit breaker, shared by every worker.
        self.protection = Protection(self.ledger.limits, settings, self.retry)
        self._built: dict[str, Any] = {}
        self._usage_noted_at = -API_USAGE_NOTE_S
        self._lock = threading.Lock()

    def _once(self, name: str, build: Any) -> Any:
        if name not in self._built:
            with self._lock:
                if name not in self._built:
                    self._built[name] = build()
        return self._built[name]

    @property
    def salesforce(self) -> SalesforceClient:
        from provisioning.salesforce.client import SalesforceClient

        s = self.settings
        return self._once(  # type: ignore[no-any-return]
            "salesforce", lambda: SalesforceClient.from_settings(s)
        )

    @property
    def whmcs(self) -> WhmcsClient:
        from provisioning.whmcs.client import WhmcsClient

        s = self.settings
        return self._once(  # type: ignore[no-any-return]
            "whmcs", lambda: WhmcsClient.from_settings(s)
        )

    @property
    def es2plus(self) -> Es2PlusClient:
        from provisioning.esim.client import Es2PlusClient

        s = self.settings
        return self._once(  # type: ignore[no-any-return]
            "es2plus", lambda: Es2PlusClient.from_settings(s)
        )

    def note_salesforce_api_usage(self) -> None:
        """Keep the org's API usage, as the last Salesforce answer said it, where the exporter and the
        backfill read it: at most once per API_USAGE_NOTE_S per process (a round trip, not a need)."""
        if "salesforce" not in self._built:
            return
        now = time.monotonic()
        if now - self._usage_noted_at < API_USAGE_NOTE_S:
            return
        usage = self.salesforce.api_usage()
        if usage is not None:
            self._usage_noted_at = now
            self.ledger.limits.record_api_usage(*usage)

    @property
    def inventory(self) -> EsimInventory:
        return self.ledger.inventory

    @property
    def email(self) -> SmtpSender:
        from provisioning.email.sender import SmtpSender

        return self._once("email", lambda: SmtpSender.from_settings(self.settings))  # type: ignore[no-any-return]
