"""Probes of the external services for ``provisioning check``: each proves reachability and credentials."""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Callable
from dataclasses import dataclass

from provisioning.core.http import make_session
from provisioning.core.settings import Settings
from provisioning.ops.checks.results import CheckResult

# Each probe gives up after this long.
PROBE_TIMEOUT_S = 5.0

# Reaches one dependency: what it found (OK), or raises what is wrong; or, for a dependency of many
# items (the Salesforce org), one result per item.
ProbeFn = Callable[[Settings], str | list[CheckResult]]


@dataclass(frozen=True)
class Probe:
    """One line of ``provisioning check``: a dependency and how it is reached."""

    name: str
    # None: the dependency is not configured.
    run: ProbeFn | None
    # The settings (field names) it reads: one of them invalid, it is not run.
    uses: tuple[str, ...] = ()
    # Probes it cannot do without: one of them failed, it is not run (the failure is said once).
    needs: tuple[str, ...] = ()
    # Where it failed, for the start of a FAIL line (a URL without its password).
    where: Callable[[Settings], str] | None = None


class NotRunning(Exception):
    """Nothing is wrong with the configuration, but a process is not up: a WARN, not a FAIL."""


def _salesforce(settings: Settings) -> str:
    from provisioning.salesforce.auth import JWTBearerAuth

    auth = JWTBearerAuth.from_settings(settings, make_session(settings.tls_ca_bundle))
    token = auth.token()
    return f"JWT login OK as {settings.sf_username}; instance {token.instance_url}"


def _events(settings: Settings) -> str:
    """The event channel on the transport in use: Pub/Sub GetTopic says whether we may subscribe."""
    channel = settings.sf_provision_event_channel
    if settings.sf_events_transport == "cometd":
        # A CometD subscription can only be tried by subscribing; the listener reports a refusal
        # (with the permission to grant) on its first subscribe.
        return f"transport cometd: {channel} is subscribed by the listener (provisioning listen)"
    from provisioning.salesforce.pubsub import PubSubClient

    client = PubSubClient.from_settings(settings)
    try:
        info = client.topic_info()
    finally:
        client.close()
    if not info.can_subscribe:
        raise PermissionError(
            f"Pub/Sub topic {info.topic_name}: the integration user cannot subscribe; grant it read "
            "access to the Platform Event in its permission set (README, Setting up Salesforce)"
        )
    return f"transport pubsub ({settings.sf_pubsub_endpoint}): {info.topic_name} can be subscribed to"


def _salesforce_org(settings: Settings) -> list[CheckResult]:
    """The org's fields, event, flows and API budget (the login and the subscription are said above)."""
    from provisioning.ops.checks.salesforce_org import org_lines

    return org_lines(settings, login=False, subscribe=False)


def _whmcs(settings: Settings) -> str:
    from provisioning.whmcs.client import WhmcsClient
    from provisioning.whmcs.errors import WhmcsClientNotFound

    client = WhmcsClient.from_settings(settings)
    # "Client Not Found" is the answer we expect for client 0: the API took our credentials.
    with contextlib.suppress(WhmcsClientNotFound):
        client.get_client(0)
    return f"{settings.whmcs_url} API credentials accepted"


def _smdp(settings: Settings) -> str:
    session = make_session(settings.tls_ca_bundle)
    # Any HTTP answer proves TLS and reachability; no ES2+ function is called (they all have effects).
    response = session.get(str(settings.smdp_url), timeout=PROBE_TIMEOUT_S)
    return f"{settings.smdp_url} reachable over TLS (HTTP {response.status_code})"


def _smtp(settings: Settings) -> str:
    assert settings.smtp_host is not None
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=PROBE_TIMEOUT_S) as smtp:
        code, _ = smtp.noop()
    return f"{settings.smtp_host}:{settings.smtp_port} answers (NOOP {code})"


def _workers(settings: Settings) -> str:
    from provisioning.runs.publishing import make_publisher

    app = make_publisher(settings)
    replies = app.control.ping(timeout=PROBE_TIMEOUT_S / 5)
    if not replies:
        raise NotRunning("no Celery worker answered a ping (start one: celery -A tasks worker)")
    return f"{len(replies)} worker(s) answering: {', '.join(sorted(n for r in replies for n in r))}"


SALESFORCE_SETTINGS = ("sf_login_url", "sf_client_id", "sf_username", "sf_private_key_file", "tls_ca_bundle")
EVENTS_SETTINGS = (
    *SALESFORCE_SETTINGS,
    "sf_events_enabled",
    "sf_events_transport",
    "sf_provision_event_channel",
    "sf_pubsub_endpoint",
    "sf_api_version",
)
ORG_SETTINGS = (
    *EVENTS_SETTINGS,
    "sf_field_activation_status",
    "sf_field_whmcs_client_id",
    "sf_field_sim_type",
    "sf_field_eid",
    "sf_field_whmcs_product_id",
    "sf_field_whmcs_order_id",
    "sf_field_esim_iccid",
    "sf_field_activation_error",
    "sf_field_activated_at",
)


def external_probes(settings: Settings, *, broker_settings: tuple[str, ...]) -> list[Probe]:
    s = settings
    login = bool(s.sf_login_url and s.sf_client_id and s.sf_username and s.sf_private_key_file)
    return [
        Probe("salesforce", _salesforce if login else None, uses=SALESFORCE_SETTINGS),
        # Subscribing needs the login: when it fails, the events are not checked (one problem, one line).
        Probe(
            "events",
            _events if login and s.sf_events_enabled else None,
            uses=EVENTS_SETTINGS,
            needs=("salesforce",),
        ),
        # What the org must have for the service (provisioning salesforce check): its lines follow.
        Probe("salesforce org", _salesforce_org if login else None, uses=ORG_SETTINGS, needs=("salesforce",)),
        Probe(
            "whmcs",
            _whmcs if s.whmcs_url and s.whmcs_identifier and s.whmcs_secret else None,
            uses=("whmcs_url", "whmcs_identifier", "whmcs_secret", "tls_ca_bundle"),
            where=lambda s: str(s.whmcs_url),
        ),
        Probe("smdp", _smdp if s.smdp_url else None, uses=("smdp_url", "tls_ca_bundle")),
        Probe(
            "smtp",
            _smtp if s.smtp_host else None,
            uses=("smtp_host", "smtp_port"),
            where=lambda s: f"{s.smtp_host}:{s.smtp_port}",
        ),
        Probe("workers", _workers, uses=broker_settings, needs=("broker",)),
    ]
