"""Every setting of every process, validated once at process start and passed down.

Nothing here reads the environment at import time: call :func:`load_settings`
(or build ``Settings()`` yourself in a test) in the process's entry point.
The environment wins over the env file; the env file is ``.env`` unless
``PROVISIONING_ENV_FILE`` names another (the sandbox writes one).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from provisioning.core.cpus import format_cpu_list, parse_cpu_list
from provisioning.core.errors import PicklableError
from provisioning.core.rate import Rate
from provisioning.core.replay_id import (
    ReplayPreset,
    ReplayStart,
    describe_start,
    parse_preset,
    parse_start,
)

ENV_FILE_VARIABLE = "PROVISIONING_ENV_FILE"
DEFAULT_ENV_FILE = ".env"

# The one home of these defaults: the clients, the listener and the sandbox import them from here.
DEFAULT_SF_API_VERSION = "64.0"
DEFAULT_PROVISION_EVENT = "OrderProvisionRequested__e"
# API names of the Order fields we read and write, by logical name (SF_FIELD_<NAME> overrides each).
DEFAULT_ORDER_FIELD_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "activation_status": "Activation_Status__c",
        "whmcs_client_id": "WHMCS_Client_ID__c",
        "sim_type": "SIM_Type__c",
        "eid": "EID__c",
        "whmcs_product_id": "WHMCS_Product_ID__c",
        "whmcs_order_id": "WHMCS_Order_ID__c",
        "esim_iccid": "ESIM_ICCID__c",
        "activation_error": "Activation_Error__c",
        "activated_at": "Activated_At__c",
        "esim_status": "ESIM_Status__c",
        "esim_status_at": "ESIM_Status_At__c",
    }
)


def _replay_preset(value: str) -> str:
    return parse_preset(value).value


ReplayPresetName = Annotated[str, AfterValidator(_replay_preset)]
HttpUrl = Annotated[AnyUrl, AfterValidator(lambda u: _require_scheme(u, ("http", "https")))]
RedisUrl = Annotated[AnyUrl, AfterValidator(lambda u: _require_scheme(u, ("redis", "rediss", "unix")))]


def parse_host_ports(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as (host, port) pairs; ValueError naming the entry that is not one."""
    pairs: list[tuple[str, int]] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{entry!r} is not host:port; expected host:port,host:port,... (e.g. 10.0.0.5:26379)"
            )
        pairs.append((host.strip("[]"), int(port)))
    if not pairs:
        raise ValueError("expected host:port,host:port,... (e.g. 10.0.0.5:26379,10.0.0.6:26379)")
    return pairs


def _host_ports(value: str) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parse_host_ports(value))


HostPorts = Annotated[str, AfterValidator(_host_ports)]


def _rate(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    return str(Rate.parse(value))


# A rate as operators write it (10/s, 600/m); empty: no limit.
RateText = Annotated[str | None, AfterValidator(_rate)]


def _cpus(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    return format_cpu_list(parse_cpu_list(value))


# CPUs as the kernel writes them (0, 0,2, 0-3); empty: wherever the scheduler puts the process.
CpuListText = Annotated[str | None, AfterValidator(_cpus)]


def unreadable_file(path: Path) -> str | None:
    """Why this process cannot read ``path`` as a file, in words an operator acts on; None if it can."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return f"file not found: {path}"
    except PermissionError:
        return f"permission denied: a directory on the path to {path} cannot be searched by this user"
    except OSError as exc:
        return f"cannot be read: {path}: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return f"is a directory, not a file: {path}"
    if not stat.S_ISREG(mode):
        return f"not a regular file: {path}"
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        return f"permission denied: {path} cannot be read by this user (check its owner and mode)"
    except OSError as exc:
        return f"cannot be read: {path}: {exc.strerror}"
    return None


def _require_scheme(url: AnyUrl, schemes: tuple[str, ...]) -> AnyUrl:
    if url.scheme not in schemes:
        raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return url


def redact_url(url: object) -> str:
    """A URL fit for logs: any password replaced by ``***`` (in each of kombu's ``;``-separated URLs)."""
    text = str(url)
    if ";" in text:
        return ";".join(redact_url(part) for part in text.split(";"))
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# The schemes a broker URL may have (kombu's transports that Celery runs on here).
BROKER_SCHEMES: Final = frozenset({"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "memory"})

# What `provisioning console hash-password` makes (argon2id, PHC string format).
PASSWORD_HASH_PREFIX = "$argon2"  # noqa: S105 (a format marker, not a password)


class ConsoleUser(BaseModel):
    """One user of the operators' console: a role and the hash of the password."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["viewer", "operator"]
    # None: the user logs in only through the auth proxy (CONSOLE_AUTH_PROXY_HEADER).
    password_hash: SecretStr | None = None

    @field_validator("password_hash")
    @classmethod
    def _is_a_hash(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(PASSWORD_HASH_PREFIX):
            raise ValueError(
                "password_hash must be an argon2 hash (make one with `provisioning console hash-password`), "
                "never the password itself"
            )
        return value

    def to_env(self) -> dict[str, str]:
        out: dict[str, str] = {"role": self.role}
        if self.password_hash is not None:
            out["password_hash"] = self.password_hash.get_secret_value()
        return out


class Settings(BaseSettings):
    """Configuration of the listener, the workers, the CLI and the sandbox clients."""

    model_config = SettingsConfigDict(
        env_file=DEFAULT_ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
    )

    # -- Redis, broker, results --------------------------------------------------------------
    redis_url: RedisUrl = Field(
        AnyUrl("redis://127.0.0.1:6379/0"),
        description="Redis for the ledger, leases, checkpoints and the failed registry.",
    )
    celery_broker_url: str = Field(
        "redis://127.0.0.1:6379/1",
        description="Celery broker: redis://..., sentinel://host:port;sentinel://... (Redis behind Sentinel) "
        "or amqp://... (RabbitMQ; a cluster's nodes ';'-separated: amqp://h1//;amqp://h2//;amqp://h3//).",
    )
    celery_result_backend: str | None = Field(
        None,
        description="Celery result backend; empty: results are not stored (the ledger is the record).",
    )
    celery_queue: str = Field("provisioning", description="Queue the tasks are sent to.")
    celery_queue_type: Literal["quorum", "classic"] = Field(
        "quorum",
        description="RabbitMQ: quorum (replicated; the production choice) or classic queue. Redis: ignored.",
    )
    celery_visibility_timeout_s: int = Field(
        3600,
        ge=10,
        description="Redis broker: seconds before an unacked message is redelivered.",
    )
    celery_task_sent_events: bool = Field(
        False,
        description="Send a task-sent event per publish (Flower's 'sent' state); it doubles a publish's cost.",
    )
    worker_liveness_interval_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between a worker's liveness heartbeats (written by its consumer's event loop).",
    )
    worker_liveness_stale_s: float = Field(
        30.0,
        gt=0,
        description="`provisioning worker probe` fails when the worker's heartbeat is older than this "
        "(a frozen or blocked worker); more than WORKER_LIVENESS_INTERVAL_S.",
    )
    worker_liveness_dir: Path = Field(
        # A directory in the shared /tmp that someone else made or may write to is refused (liveness.write).
        Path("/tmp/provisioning-liveness"),  # noqa: S108
        description="Directory of the workers' heartbeat files (<worker name>.json); the probe reads it, so "
        "it must be the same for the worker and its probe (same host or container).",
    )
    worker_cpus: CpuListText = Field(
        None,
        description="CPUs a worker process and its threads run on (taskset -c syntax: 0, 0,2, 0-3); give each "
        "threads worker of a host a CPU of its own: its threads then hand the interpreter lock over on one core "
        "(docs/operations.md, 'Scaling workers'). Empty: wherever the scheduler puts them.",
    )
    redis_sentinels: HostPorts | None = Field(
        None,
        description="Redis Sentinel addresses (host:port,host:port,...): the ledger asks them for the master "
        "REDIS_SENTINEL_MASTER and follows it through a failover; REDIS_URL then gives only the db and password.",
    )
    redis_sentinel_master: str | None = Field(
        None, description="Name of the master the sentinels monitor (required with REDIS_SENTINELS)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="Password of the sentinels themselves (requirepass in sentinel.conf); Redis's own is in "
        "REDIS_URL. Also used for a sentinel:// broker.",
    )
    redis_wait_timeout_ms: int = Field(
        1000,
        ge=1,
        description="When the ledger's Redis has replicas: how long a write that guards an external effect "
        "waits for a replica to confirm it (WAIT) before the step is retried instead of acting.",
    )
    celery_broker_sentinel_master: str | None = Field(
        None,
        description="sentinel://... broker: the master name the sentinels monitor; default REDIS_SENTINEL_MASTER.",
    )
    ledger_prefix: str = Field(
        "prov", pattern=r"^[A-Za-z0-9_.-]+$", description="Namespace of every ledger key."
    )
    run_retention_days: int = Field(
        30, ge=1, description="Days a finished run stays in the ledger (failed runs stay)."
    )
    run_lease_ttl_s: int = Field(60, ge=5, description="Seconds a run's lease lasts unless renewed.")

    # -- retries ---------------------------------------------------------------------------
    task_max_retries: int = Field(8, ge=0, description="Retries of a step on transient errors.")
    task_max_age_s: int = Field(
        3600, ge=10, description="A step is not retried once its run is older than this."
    )
    task_retry_backoff_s: float = Field(
        1.0, gt=0, description="First retry delay; doubles each retry, with full jitter."
    )
    task_retry_backoff_max_s: float = Field(
        300.0, gt=0, description="Cap of one retry delay (kept below the visibility timeout)."
    )
    failure_writeback_tries: int = Field(
        6,
        ge=1,
        description="Tries of a failed run's write of Failed on the Order before it is left to the reconciler "
        "(the first right away, the others by the write_failure_on_order task).",
    )
    failure_writeback_backoff_s: float = Field(
        2.0,
        gt=0,
        description="First wait before a refused failure write is tried again; doubles, full jitter.",
    )
    failure_writeback_backoff_max_s: float = Field(
        16.0, gt=0, description="Cap of one wait between failure write tries (6 tries: at most 46 s in all)."
    )

    # -- protecting the external systems ------------------------------------------------------
    rate_limit_salesforce: RateText = Field(
        None, description="Salesforce REST calls allowed, across every worker (e.g. 25/s); empty: no limit."
    )
    rate_limit_whmcs: RateText = Field(
        None, description="WHMCS API calls allowed, across every worker (e.g. 10/s); empty: no limit."
    )
    rate_limit_smdp: RateText = Field(
        None, description="SM-DP+ (ES2+) calls allowed, across every worker (e.g. 20/s); empty: no limit."
    )
    rate_limit_smtp: RateText = Field(
        None, description="E-mails sent, across every worker (e.g. 5/s); empty: no limit."
    )
    breaker_failures: int = Field(
        5,
        ge=1,
        description="Transient failures in a row of one external system that open its circuit: every worker "
        "stops calling it for BREAKER_COOLDOWN_S (a 429 or Retry-After opens it at once).",
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="How long an open circuit keeps its system uncalled before one probe."
    )
    breaker_cooldown_max_s: float = Field(
        300.0,
        gt=0,
        description="A probe that fails doubles the cool-down, up to this; a Retry-After is honoured up to it.",
    )
    celery_step_queues: dict[str, str] = Field(
        default_factory=dict,
        description='Queues of their own, JSON: {"activate_esim": "esim"} for a step, {"whmcs": "whmcs"} for '
        "every step calling a system; the rest go to CELERY_QUEUE.",
    )

    # -- Salesforce ------------------------------------------------------------------------
    sf_login_url: HttpUrl | None = Field(
        None, description="OAuth login host, e.g. https://login.salesforce.com."
    )
    sf_client_id: SecretStr | None = Field(None, description="Connected App consumer key.")
    sf_username: str | None = Field(None, description="Integration user the JWT is issued for.")
    sf_private_key_file: Path | None = Field(
        None, description="PEM private key whose certificate is on the Connected App."
    )
    sf_api_version: str = Field(
        DEFAULT_SF_API_VERSION, pattern=r"^\d{2,3}\.0$", description="REST and CometD API version."
    )
    sf_events_enabled: bool = Field(True, description="Whether `provisioning listen` subscribes.")
    sf_provision_event_channel: str = Field(
        f"/event/{DEFAULT_PROVISION_EVENT}",
        pattern=r"^/event/[A-Za-z0-9_]+__e$",
        description="Platform Event channel.",
    )
    sf_events_transport: Literal["pubsub", "cometd"] = Field(
        "pubsub",
        description="How the listener receives events: pubsub (Pub/Sub API, gRPC) or cometd (Streaming API).",
    )
    sf_events_replay: str = Field(
        "LATEST",
        description="Start position without a checkpoint: LATEST, EARLIEST or a replay id "
        "(CometD: an integer; Pub/Sub: the hex of its bytes).",
    )
    sf_events_replay_fallback: ReplayPresetName = Field(
        "EARLIEST", description="Where to start when the stored replayId is too old: LATEST or EARLIEST."
    )
    sf_pubsub_endpoint: str = Field(
        "api.pubsub.salesforce.com:7443",
        pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$",
        description="Pub/Sub API host:port (gRPC over TLS; TLS_CA_BUNDLE applies).",
    )
    sf_pubsub_batch_size: int = Field(
        100,
        ge=1,
        le=100,
        description="Events requested per Pub/Sub FetchRequest (num_requested), 1 to 100.",
    )
    sf_pubsub_keepalive_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Pub/Sub stall watchdog: seconds without any response (keepalives included) "
        "before the stream is torn down and resubscribed (Salesforce promises one within 270 s).",
    )
    sf_refused_retry_max_s: float = Field(
        60.0,
        gt=0,
        description="Longest wait before the listener tries again what Salesforce refused for a reason only "
        "a person can fix (a subscription to an event the org does not have or the user may not read, a "
        "login with a key the app does not know, the backfill query): the waits grow from 1 s to this, "
        "jittered. Also how often such a refusal that goes on is summarized in the log (one line with "
        "the count).",
    )

    # Order field names (API names), in case an org named them differently.
    sf_field_activation_status: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["activation_status"],
        description="Order field: Activating / Activated / Failed.",
    )
    sf_field_whmcs_client_id: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["whmcs_client_id"], description="Account field: the WHMCS client id."
    )
    sf_field_sim_type: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["sim_type"], description="Order field: eSIM or Physical."
    )
    sf_field_eid: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["eid"], description="Order field: the device's EID (eSIM)."
    )
    sf_field_whmcs_product_id: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["whmcs_product_id"], description="Product2 field: the WHMCS product id."
    )
    sf_field_whmcs_order_id: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["whmcs_order_id"], description="Order field written: the WHMCS order id."
    )
    sf_field_esim_iccid: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["esim_iccid"], description="Order field written: the eSIM's ICCID."
    )
    sf_field_activation_error: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["activation_error"], description="Order field written: why it failed."
    )
    sf_field_activated_at: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["activated_at"], description="Order field written: when it was activated."
    )
    sf_field_esim_status: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["esim_status"],
        description="Order field written: the eSIM's state (Released, Downloaded, Installed, Error, Cancelled).",
    )
    sf_field_esim_status_at: str = Field(
        DEFAULT_ORDER_FIELD_NAMES["esim_status_at"],
        description="Order field written: when the eSIM's state last changed.",
    )

    # -- WHMCS -----------------------------------------------------------------------------
    whmcs_url: HttpUrl | None = Field(None, description="WHMCS base URL (…/includes/api.php is appended).")
    whmcs_identifier: SecretStr | None = Field(None, description="WHMCS API credential identifier.")
    whmcs_secret: SecretStr | None = Field(None, description="WHMCS API credential secret.")
    whmcs_payment_method: str = Field("stripe", description="Gateway system name for AddOrder.")
    whmcs_cancel_accepted: Literal["terminate", "manual"] = Field(
        "terminate",
        description="A cancelled Order's WHMCS order that was accepted already: terminate its services "
        "(ModuleTerminate) or leave it to a person (manual); a Pending one is always cancelled (CancelOrder).",
    )

    # -- SM-DP+ (ES2+) ----------------------------------------------------------------------
    smdp_url: HttpUrl | None = Field(None, description="SM-DP+ ES2+ base URL.")
    smdp_requester_id: str = Field("provisioning", description="functionRequesterIdentifier.")
    smdp_address: str | None = Field(
        None, description="SM-DP+ FQDN in activation codes; default: the host of SMDP_URL."
    )
    esim_stock_warn_threshold: int = Field(
        20, ge=0, description="`provisioning esim stock` warns below this many free ICCIDs."
    )
    esim_reclaim_after_days: float = Field(
        30.0,
        gt=0,
        description="`provisioning esim stale` lists profiles released this many days ago and never downloaded.",
    )
    esim_not_installed_after_s: int = Field(
        86400,
        ge=60,
        description="Profiles released this long ago and not installed are counted for the alert "
        "(provisioning_esim_not_installed).",
    )
    esim_notify_host: str = Field(
        "0.0.0.0",
        description="Address of `provisioning esim-notify` (the SM-DP+ calls it: ES2+ notifications).",
    )
    esim_notify_port: int = Field(8443, ge=0, le=65535, description="Port of `provisioning esim-notify`.")
    esim_notify_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) `provisioning esim-notify` serves over TLS."
    )
    esim_notify_key_file: Path | None = Field(None, description="PEM private key of ESIM_NOTIFY_CERT_FILE.")
    esim_notify_client_ca: Path | None = Field(
        None,
        description="CA bundle the SM-DP+'s client certificate must verify against (mutual TLS); "
        "empty: no client certificate asked.",
    )
    esim_notify_requester_ids: str = Field(
        "",
        description="The SM-DP+'s functionRequesterIdentifier(s) accepted, comma-separated; "
        "empty: only mutual TLS authenticates (ESIM_NOTIFY_CLIENT_CA is then required).",
    )

    # -- e-mail ----------------------------------------------------------------------------
    smtp_host: str | None = Field(None, description="SMTP server host.")
    smtp_port: int = Field(25, ge=1, le=65535, description="SMTP server port.")
    smtp_username: str | None = Field(None, description="SMTP login (with SMTP_PASSWORD); empty: no login.")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_starttls: bool = Field(False, description="Upgrade the SMTP connection with STARTTLS.")
    email_sender: str = Field("Provisioning <provisioning@example.com>", description="From: header.")
    email_message_id_domain: str = Field(
        "provisioning.local", description="Right-hand side of our deterministic Message-IDs."
    )
    email_resend_policy: Literal["resend", "skip"] = Field(
        "resend",
        description="A send found in 'sending' after a crash: resend (same Message-ID) or skip.",
    )

    # -- TLS, logging, listener --------------------------------------------------------------
    tls_ca_bundle: Path | None = Field(
        None, description="CA bundle for every HTTPS client; wins over REQUESTS_CA_BUNDLE."
    )
    log_format: Literal["text", "json"] = Field("text", description="text or json lines.")
    tracing_exporter: Literal["none", "console", "otlp"] = Field(
        "none",
        description="Where the OpenTelemetry traces go (one per run): none (off), console (stdout) or otlp "
        "(OTEL_EXPORTER_OTLP_ENDPOINT, OTLP over HTTP); console and otlp need the otel extra.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    listener_health_host: str = Field(
        "127.0.0.1", description="Address of the listener's /healthz and /metrics."
    )
    listener_health_port: int = Field(
        9108, ge=0, le=65535, description="Port of /healthz, /livez, /metrics; 0 turns it off."
    )
    listener_lock_ttl_s: int = Field(15, ge=3, description="Leader lock expiry; renewed at a third.")
    reconcile_interval_s: int = Field(30, ge=1, description="Seconds between reconciler sweeps.")
    reconcile_idle_s: int = Field(
        600,
        ge=1,
        description="The reconciler resumes an unfinished, unleased run not updated for this long.",
    )
    reconcile_orders_interval_s: int = Field(
        300,
        ge=0,
        description="Seconds between the backfill's Salesforce queries for Orders left in Activating; 0: off.",
    )
    reconcile_orders_grace_s: int = Field(
        300,
        ge=0,
        description="The backfill starts a run for an Order left in Activating this long with no run of ours.",
    )
    sf_api_backfill_max_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="The backfill skips its Salesforce query while the org has used more than this share of "
        "its daily API allowance (Sforce-Limit-Info); the events' runs go on.",
    )

    # -- metrics and the operators' console --------------------------------------------------
    metrics_host: str = Field(
        "127.0.0.1", description="Address of `provisioning metrics` (the runs' /metrics for Prometheus)."
    )
    metrics_port: int = Field(9109, ge=1, le=65535, description="Port of `provisioning metrics`.")
    console_host: str = Field(
        "127.0.0.1", description="Address of `provisioning console`; keep it local or behind a proxy."
    )
    console_port: int = Field(8088, ge=1, le=65535, description="Port of `provisioning console`.")
    console_users: dict[str, ConsoleUser] = Field(
        default_factory=dict,
        description='Console users, JSON: {"name": {"role": "viewer" or "operator", "password_hash": "..."}}.',
    )
    console_secret_key: SecretStr | None = Field(
        None,
        description="Signs the console's CSRF tokens and dry-run confirmations; empty: a random key per start.",
    )
    console_auth_proxy_header: str | None = Field(
        None,
        description="Header naming the user, set by an auth proxy (e.g. X-Forwarded-User); empty: passwords.",
    )
    console_trusted_proxies: str = Field(
        "127.0.0.1,::1",
        description="Comma-separated addresses whose CONSOLE_AUTH_PROXY_HEADER and X-Forwarded-For the console "
        "believes.",
    )
    console_session_ttl_s: int = Field(
        28800,
        ge=60,
        description="Seconds a console login lasts (from the login, on the server; logout ends it sooner).",
    )
    console_cookie_secure: bool = Field(
        False, description="Send the console's session cookie over HTTPS only (set it behind TLS)."
    )
    console_login_free_failures: int = Field(
        3,
        ge=0,
        description="Wrong passwords for one console user answered at once; each one after makes the next "
        "try wait CONSOLE_LOGIN_DELAY_S, doubled each time.",
    )
    console_login_delay_s: float = Field(
        1.0, ge=0, description="The first wait after CONSOLE_LOGIN_FREE_FAILURES, in seconds (then doubled)."
    )
    console_login_max_failures: int = Field(
        10,
        ge=1,
        description="Wrong passwords for one console user (known or not) that lock its logins for "
        "CONSOLE_LOGIN_LOCK_S.",
    )
    console_login_max_failures_per_address: int = Field(
        30,
        ge=1,
        description="Wrong passwords from one client address, whatever the users, that lock its logins for "
        "CONSOLE_LOGIN_LOCK_S.",
    )
    console_login_lock_s: int = Field(
        900,
        ge=1,
        description="Seconds a console login lock lasts; failures are forgotten this long after the last try.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("sf_events_replay")
    @classmethod
    def _replay_start_of_the_transport(cls, value: str, info: ValidationInfo) -> str:
        """Parsed as the transport in use takes it (core.replay_id), kept in that canonical text."""
        transport = info.data.get("sf_events_transport")
        if transport is None:  # itself invalid: that error is reported
            return value
        return describe_start(parse_start(value, transport))

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        # kombu's failover list: the nodes of one broker, ';'-separated (the sentinels, RabbitMQ's nodes).
        schemes = [url.strip().split("://", 1)[0] for url in value.split(";") if url.strip()]
        if not schemes or not set(schemes) <= BROKER_SCHEMES:
            raise ValueError(
                "expected a broker URL starting with redis://, sentinel://, amqp:// or memory:// (the nodes "
                "of one broker separated by ';': amqp://h1:5672//;amqp://h2:5672//;amqp://h3:5672//)"
            )
        if len(set(schemes)) > 1:
            raise ValueError(
                f"the ';'-separated URLs are of different brokers ({', '.join(sorted(set(schemes)))}): "
                "list the nodes of one broker"
            )
        return value

    @field_validator("sf_private_key_file", "tls_ca_bundle")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            problem = unreadable_file(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("worker_liveness_stale_s")
    @classmethod
    def _stale_after_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("worker_liveness_interval_s")
        if interval is not None and value <= interval:
            raise ValueError(
                f"must be more than WORKER_LIVENESS_INTERVAL_S ({interval:g}): a fresh worker would fail"
            )
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _ledger_sentinel_master(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("redis_sentinels") and not value:
            raise ValueError(
                "REDIS_SENTINELS is set: name the master the sentinels monitor "
                "(the <name> of `sentinel monitor <name> ...`)"
            )
        return value

    @field_validator("celery_broker_sentinel_master")
    @classmethod
    def _broker_sentinel_master(cls, value: str | None, info: ValidationInfo) -> str | None:
        broker = str(info.data.get("celery_broker_url") or "")
        if broker.startswith("sentinel://") and not (value or info.data.get("redis_sentinel_master")):
            raise ValueError(
                "CELERY_BROKER_URL is sentinel://...: name the master the sentinels monitor here "
                "or in REDIS_SENTINEL_MASTER"
            )
        return value

    # -- derived ---------------------------------------------------------------------------
    @property
    def broker_is_rabbitmq(self) -> bool:
        return self.celery_broker_url.startswith(("amqp", "pyamqp"))

    @property
    def broker_is_sentinel(self) -> bool:
        return self.celery_broker_url.startswith("sentinel://")

    @property
    def broker_sentinel_master(self) -> str | None:
        return self.celery_broker_sentinel_master or self.redis_sentinel_master

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels of the ledger's Redis (empty: REDIS_URL names the server itself)."""
        return parse_host_ports(self.redis_sentinels) if self.redis_sentinels else []

    def to_env(self) -> dict[str, str]:
        """Every set value as environment variables (secrets revealed): for child processes and env files."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, dict):
                value = json.dumps(
                    {k: v.to_env() if isinstance(v, ConsoleUser) else v for k, v in value.items()}
                )
            env[name.upper()] = str(value)
        return env

    def replay_start(self) -> ReplayStart:
        """SF_EVENTS_REPLAY for the transport in use: a preset or a replay id of that transport."""
        return parse_start(self.sf_events_replay, self.sf_events_transport)

    def replay_fallback(self) -> ReplayPreset:
        """SF_EVENTS_REPLAY_FALLBACK: where to start when the stored replay id is too old."""
        return parse_preset(self.sf_events_replay_fallback)

    def require(self, *names: str) -> None:
        """Raise ConfigError naming every one of ``names`` that is not set."""
        missing = [n for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise ConfigError([(n.upper(), "is required here but not set") for n in missing])


class ConfigError(PicklableError):
    """Configuration that cannot be used; ``problems`` holds (VARIABLE, what is wrong).

    ``fields`` names the settings (field names) that could not be used: the invalid ones and
    those tied to them (``load_settings_leniently``).
    """

    def __init__(self, problems: list[tuple[str, str]], fields: frozenset[str] = frozenset()):
        self.problems = problems
        self.fields = fields
        super().__init__(self.render())

    def render(self) -> str:
        lines = ["Invalid configuration:"]
        lines += [f"  {var}: {why}" for var, why in self.problems]
        lines.append("Set these in the environment or in the env file (.env or $PROVISIONING_ENV_FILE).")
        return "\n".join(lines)


# A setting that means nothing without another: when one of them is invalid, neither is used.
TIED_SETTINGS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "redis_sentinel_master": ("redis_sentinels",),
        "celery_broker_sentinel_master": ("celery_broker_url",),
    }
)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment and the env file; ConfigError lists every problem."""
    try:
        return Settings(_env_file=_env_file(), **overrides)
    except ValidationError as exc:
        raise ConfigError([(var, why) for _, var, why in _problems(exc)]) from None


def load_settings_leniently(**overrides: Any) -> tuple[Settings, ConfigError | None]:
    """Settings with every invalid value (and any setting tied to one) at its default, and the error.

    For ``provisioning check``, which reports every problem in one run: the invalid settings are
    listed by the error (with the fields not used, ``ConfigError.fields``), and whatever is valid
    can still be probed. ConfigError is raised only when no such Settings can be built.
    """
    env_file = _env_file()
    replaced: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    while True:
        try:
            settings = Settings(_env_file=env_file, **{**overrides, **replaced})
        except ValidationError as exc:
            found = _problems(exc)
            fresh = [(field, var, why) for field, var, why in found if field not in replaced]
            if not fresh:  # invalid at its default too: nothing left to fall back on
                raise ConfigError(problems + [(var, why) for _, var, why in found]) from None
            for field, var, why in fresh:
                problems.append((var, why))
                for name in (field, *TIED_SETTINGS.get(field, ())):
                    replaced[name] = Settings.model_fields[name].get_default(call_default_factory=True)
            continue
        return settings, ConfigError(problems, frozenset(replaced)) if problems else None


def _env_file() -> str:
    return os.environ.get(ENV_FILE_VARIABLE, DEFAULT_ENV_FILE)


def _problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    """(field, VARIABLE, what is wrong) per error; a value is quoted unless it may be a secret."""
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = ".".join(str(p) for p in err["loc"]).upper() or "?"
        why = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        secret = "secret" in var.lower() or "password" in var.lower()
        if isinstance(given, str) and not secret and not (given and given in why):
            why = f"{why} (got {given!r})"
        problems.append((field, var, why))
    return problems
