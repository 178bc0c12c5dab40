"""Throughput of each sandbox simulator, measured with keep-alive clients over TLS.

The sandbox runs as ``provisioning sandbox`` in its own process (``--mode process``,
the default), so client and server do not share a GIL; ``--mode inprocess`` runs it
on a thread of this process instead, and ``--mode both`` reports the two::

    .venv/bin/python -m bench.sandbox_throughput                  # tables on stdout
    .venv/bin/python -m bench.sandbox_throughput --repeat 3 --json out.json

Every request's answer is checked (a benchmark of error answers measures nothing):
an unexpected answer stops the run. CPU per request is the process CPU time
(user + system) over the measured requests: the client's, and the server's when
it runs in its own process (read from ``/proc/<pid>/stat``). With one client thread
the rate is about 1 / (client CPU + server CPU) per request, and a requests call over
TLS costs the client about 1 ms here; "server max/s" (1000 / server CPU ms) is what
one core of the simulator could serve faster clients.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jwt
import requests

from bench.common import Cleanup, Table, emit, log, machine_info, run_main
from provisioning.core.http import make_session
from provisioning.core.replay_id import ReplayId
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import SalesforceClient
from provisioning.salesforce.streaming import StreamingClient
from provisioning.sandbox.processes import ManagedProcess
from provisioning.sandbox.runner import Sandbox

TARGET_PER_S = 500.0
DEFAULT_REQUESTS = 2000
DEFAULT_WARMUP = 100
DEFAULT_EVENTS = 5000
# Every request of the benchmark is local; a slow one means the sandbox is stuck.
REQUEST_TIMEOUT_S = 30.0
# How long `provisioning sandbox` may take to print its URLs.
SANDBOX_READY_TIMEOUT_S = 60.0
# Orders, WHMCS clients the read benchmarks cycle through.
SEEDED_RECORDS = 100
# Events published per admin call when preparing the delivery benchmark.
ADMIN_PUBLISH_BATCH = 1000
# Salesforce accepts assertions valid for at most 3 minutes; longer runs sign a new one per benchmark.
ASSERTION_LIFETIME_S = 170
ES2_PROTOCOL = "gsma/rsp/v2.5.0"
BENCHMARKS = (
    "sf_token",
    "sf_query",
    "sf_patch",
    "sf_publish",
    "cometd_handshake_disconnect",
    "cometd_connect",
    "cometd_delivery",
    "whmcs_get_clients_details",
    "smdp_download_order",
    "smdp_confirm_order",
    "smtp_connection_per_message",
    "smtp_kept_connection",
)

# One call of a benchmark; it gets the index of its item (order, profile, ...) and raises on a bad answer.
Op = Callable[[int], None]


class BenchError(Exception):
    """A simulator answered something else than the benchmark expects."""


@dataclass
class Result:
    mode: str
    name: str
    unit: str
    count: int
    concurrency: int
    seconds: float
    rate_per_s: float
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    client_cpu_ms: float
    server_cpu_ms: float | None
    meets_target: bool
    # What one core of the server could serve at this CPU cost per request (process mode only).
    server_max_per_s: float | None = None
    # With --repeat: every run's rate, and the best; the other fields are the median run's.
    runs: list[float] = field(default_factory=list)
    best_per_s: float | None = None


@dataclass
class Target:
    """A running sandbox: its settings (from the env file it wrote) and its URLs."""

    mode: str
    settings: Settings
    urls: dict[str, str]
    server_pid: int | None

    @property
    def ca_bundle(self) -> Path:
        assert self.settings.tls_ca_bundle is not None
        return self.settings.tls_ca_bundle

    def session(self, pool_size: int = 4) -> requests.Session:
        return make_session(self.ca_bundle, pool_size=pool_size)

    def server_cpu_s(self) -> float | None:
        """User + system CPU seconds of the sandbox process (None when it is this process)."""
        if self.server_pid is None:
            return None
        fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name: state is field 3, utime field 14, stime field 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- starting the sandbox -------------------------------------------------------------------------


def _parse_urls(text: str) -> dict[str, str]:
    urls = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name and rest.strip().startswith(("https://", "smtp://")):
            urls[name] = rest.strip()
    return urls


@contextmanager
def sandbox_process(workdir: Path) -> Iterator[Target]:
    """``provisioning sandbox`` in a child process; settings loaded from the env file it writes."""
    env_file = workdir / "sandbox.env"
    exe = Path(sys.executable).with_name("provisioning")
    argv = [
        str(exe) if exe.exists() else "provisioning",
        "sandbox",
        "--workdir",
        str(workdir / "sandbox"),
        "--env-file",
        str(env_file),
        "--seed",
        "1",
        "--long-poll",
        "5",
    ]
    proc = ManagedProcess("sandbox", argv, {}, workdir / "sandbox.log").start()
    try:
        proc.wait_for_log("env file", SANDBOX_READY_TIMEOUT_S)
        settings = Settings(_env_file=str(env_file))
        yield Target("process", settings, _parse_urls(proc.log_text()), proc.pid)
    finally:
        proc.stop()


@contextmanager
def sandbox_inprocess(workdir: Path) -> Iterator[Target]:
    """The simulators on a thread of this process (client and server share the GIL)."""
    box = Sandbox(workdir / "sandbox", seed=1, long_poll_s=5.0).start()
    try:
        env_file = box.write_env_file(workdir / "sandbox.env")
        settings = Settings(_env_file=str(env_file))
        yield Target("inprocess", settings, box.urls, None)
    finally:
        box.stop()


# -- measuring ------------------------------------------------------------------------------------


def measure(
    target: Target,
    name: str,
    make_op: Callable[[], Op],
    *,
    count: int,
    concurrency: int,
    warmup: int,
    unit: str = "requests",
    per_call: int = 1,
) -> Result:
    """Run ``count`` calls spread over ``concurrency`` threads (each with its own op), after a warm-up.

    Items ``0 .. warmup*concurrency-1`` are the warm-up's, the next ``count`` are measured. A call
    that makes ``per_call`` requests counts as that many.
    """
    barrier = threading.Barrier(concurrency + 1)
    done = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    measured = range(warmup * concurrency, warmup * concurrency + count)

    def run(slot: int) -> None:
        try:
            op = make_op()
            for i in range(slot * warmup, (slot + 1) * warmup):
                op(i)
        except BaseException as exc:
            errors.append(exc)
        barrier.wait()
        mine = latencies[slot]
        try:
            if not errors:
                for i in measured[slot::concurrency]:
                    started = time.perf_counter()
                    op(i)
                    mine.append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)
        done.wait()

    threads = [threading.Thread(target=run, args=(slot,), daemon=True) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    cpu0, server0, t0 = time.process_time(), target.server_cpu_s(), time.perf_counter()
    done.wait()
    seconds = time.perf_counter() - t0
    cpu1, server1 = time.process_time(), target.server_cpu_s()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{name}: {errors[0]!r}") from errors[0]
    flat = sorted(x for per_thread in latencies for x in per_thread)
    return _result(
        target, name, unit, count * per_call, concurrency, seconds, flat, cpu1 - cpu0, server0, server1
    )


def _result(
    target: Target,
    name: str,
    unit: str,
    count: int,
    concurrency: int,
    seconds: float,
    latencies: list[float],
    client_cpu_s: float,
    server0: float | None,
    server1: float | None,
) -> Result:
    rate = count / seconds if seconds > 0 else float("inf")
    server_cpu = (server1 - server0) * 1000 / count if server0 is not None and server1 is not None else None
    return Result(
        mode=target.mode,
        name=name,
        unit=unit,
        count=count,
        concurrency=concurrency,
        seconds=round(seconds, 4),
        rate_per_s=round(rate, 1),
        mean_ms=round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        p50_ms=round(latencies[len(latencies) // 2] * 1000, 3) if latencies else None,
        p99_ms=round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3)
        if latencies
        else None,
        client_cpu_ms=round(client_cpu_s * 1000 / count, 3),
        server_cpu_ms=round(server_cpu, 3) if server_cpu is not None else None,
        server_max_per_s=round(1000 / server_cpu, 1) if server_cpu else None,
        meets_target=rate >= TARGET_PER_S,
    )


def _expect(response: requests.Response, status: int, what: str) -> requests.Response:
    if response.status_code != status:
        raise BenchError(f"{what}: HTTP {response.status_code} (expected {status}): {response.text[:300]}")
    return response


def _admin(session: requests.Session, method: str, url: str, body: Any = None) -> Any:
    response = session.request(method, url, json=body, timeout=REQUEST_TIMEOUT_S)
    return _expect(response, 200, f"{method} {url}").json()


# -- Salesforce -----------------------------------------------------------------------------------


class SalesforceBench:
    """REST, token and CometD benchmarks against the Salesforce simulator."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.settings = target.settings
        self.url = str(self.settings.sf_login_url).rstrip("/")
        self.version = self.settings.sf_api_version
        self.admin = target.session()
        # Benchmarks make far more calls than an org's daily allocation.
        _admin(self.admin, "POST", f"{self.url}/__admin/limits", {"api_used": 0, "api_limit": 10**9})
        self.auth = JWTBearerAuth.from_settings(self.settings, self.admin)
        self.token = self.auth.token().access_token.get_secret_value()
        self.client = SalesforceClient.from_settings(self.settings, auth=self.auth)
        seeded = _admin(
            self.admin,
            "POST",
            f"{self.url}/__admin/orders",
            [
                {"sim_type": "eSIM", "items": [{"quantity": 1, "whmcs_product_id": "1"}]}
                for _ in range(SEEDED_RECORDS)
            ],
        )
        self.order_ids: list[str] = seeded["ids"]
        self.queries = [self.client.order_query(order_id) for order_id in self.order_ids]

    def _assertion(self) -> str:
        settings = self.settings
        assert settings.sf_client_id is not None
        assert settings.sf_private_key_file is not None
        claims = {
            "iss": settings.sf_client_id.get_secret_value(),
            "sub": settings.sf_username,
            "aud": self.url,
            "exp": int(time.time()) + ASSERTION_LIFETIME_S,
        }
        return jwt.encode(claims, settings.sf_private_key_file.read_bytes(), algorithm="RS256")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def token_op(self) -> Op:
        session = self.target.session()
        # One signed assertion for the run: this measures the token endpoint, not our RSA signing.
        assertion = self._assertion()
        url = f"{self.url}/services/oauth2/token"
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}

        def op(_: int) -> None:
            answer = _expect(session.post(url, data=form, timeout=REQUEST_TIMEOUT_S), 200, "token").json()
            if not answer.get("access_token"):
                raise BenchError(f"token: no access_token in {answer}")

        return op

    def query_op(self) -> Op:
        session = self.target.session()
        url = f"{self.url}/services/data/v{self.version}/query"
        headers = self._headers()

        def op(i: int) -> None:
            q = self.queries[i % len(self.queries)]
            response = session.get(url, params={"q": q}, headers=headers, timeout=REQUEST_TIMEOUT_S)
            if _expect(response, 200, "query").json().get("totalSize") != 1:
                raise BenchError(f"query: {response.text[:300]}")

        return op

    def patch_op(self) -> Op:
        session = self.target.session()
        base = f"{self.url}/services/data/v{self.version}/sobjects/Order/"
        headers = self._headers()
        body = {"Activation_Status__c": "Activating"}

        def op(i: int) -> None:
            order_id = self.order_ids[i % len(self.order_ids)]
            response = session.patch(base + order_id, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
            _expect(response, 204, "PATCH Order")

        return op

    def publish_op(self) -> Op:
        session = self.target.session()
        url = f"{self.url}/services/data/v{self.version}/sobjects/OrderProvisionRequested__e/"
        headers = self._headers()

        def op(i: int) -> None:
            body = {"OrderId__c": self.order_ids[i % len(self.order_ids)], "IdemKey__c": f"bench-{i}"}
            response = session.post(url, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
            if not _expect(response, 201, "publish").json().get("success"):
                raise BenchError(f"publish: {response.text[:300]}")

        return op

    def _bayeux(self, session: requests.Session, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = session.post(
            f"{self.url}/cometd/{self.version}",
            json=messages,
            headers=self._headers(),
            timeout=REQUEST_TIMEOUT_S,
        )
        replies: list[dict[str, Any]] = _expect(response, 200, "cometd").json()
        meta = [r for r in replies if str(r.get("channel", "")).startswith("/meta/")]
        if not meta or not all(r.get("successful") for r in meta):
            raise BenchError(f"cometd {messages[0].get('channel')}: {replies}")
        return replies

    def _handshake(self, session: requests.Session) -> str:
        message = {
            "channel": "/meta/handshake",
            "version": "1.0",
            "supportedConnectionTypes": ["long-polling"],
            "ext": {"replay": True},
        }
        return str(self._bayeux(session, [message])[0]["clientId"])

    def handshake_op(self) -> Op:
        session = self.target.session()

        def op(_: int) -> None:
            client_id = self._handshake(session)
            # A real client leaves with a disconnect; the server would otherwise keep it for 40 s.
            self._bayeux(session, [{"channel": "/meta/disconnect", "clientId": client_id}])

        return op

    def connect_op(self) -> Op:
        session = self.target.session()
        client_id = self._handshake(session)
        channel = self.settings.sf_provision_event_channel
        self._bayeux(
            session,
            [
                {
                    "channel": "/meta/subscribe",
                    "clientId": client_id,
                    "subscription": channel,
                    "ext": {"replay": {channel: -1}},
                }
            ],
        )
        # advice.timeout 0: answered at once (as CometD clients ask on their first connect),
        # so this measures the server's connect handling, not the long poll.
        message = {
            "channel": "/meta/connect",
            "clientId": client_id,
            "connectionType": "long-polling",
            "advice": {"timeout": 0},
        }

        def op(_: int) -> None:
            self._bayeux(session, [message])

        return op

    def delivery(self, events: int) -> Result:
        """Events/s through our StreamingClient: ``events`` published beforehand, then received."""
        admin_url = f"{self.url}/__admin/events"
        marker = _admin(
            self.admin, "POST", admin_url, {"OrderId__c": self.order_ids[0], "IdemKey__c": "marker"}
        )
        start = int(marker["events"][0]["replayId"])
        run = uuid.uuid4().hex[:8]
        for first in range(0, events, ADMIN_PUBLISH_BATCH):
            batch = [
                {"OrderId__c": self.order_ids[i % len(self.order_ids)], "IdemKey__c": f"{run}-{i}"}
                for i in range(first, min(events, first + ADMIN_PUBLISH_BATCH))
            ]
            _admin(self.admin, "POST", admin_url, batch)
        stream = StreamingClient.from_settings(self.settings, self.target.session(), auth=self.auth)
        cpu0, server0, t0 = time.process_time(), self.target.server_cpu_s(), time.perf_counter()
        received = 0
        for answer in stream.batches(ReplayId.cometd(start)):
            for event in answer.events:
                if not str((event.payload or {}).get("IdemKey__c", "")).startswith(run):
                    raise BenchError(f"cometd delivery: unexpected event {event.payload}")
            received += len(answer)
            if answer.position is not None:
                stream.ack(answer.position)
            if received >= events:
                break
        seconds = time.perf_counter() - t0
        cpu1, server1 = time.process_time(), self.target.server_cpu_s()
        return _result(
            self.target, "cometd_delivery", "events", events, 1, seconds, [], cpu1 - cpu0, server0, server1
        )


# -- WHMCS, SM-DP+, SMTP --------------------------------------------------------------------------


class WhmcsBench:
    def __init__(self, target: Target) -> None:
        self.target = target
        settings = target.settings
        self.url = str(settings.whmcs_url).rstrip("/")
        assert settings.whmcs_identifier is not None
        assert settings.whmcs_secret is not None
        self.credentials = {
            "identifier": settings.whmcs_identifier.get_secret_value(),
            "secret": settings.whmcs_secret.get_secret_value(),
        }
        clients = [
            {"firstname": f"Bench{i}", "lastname": "Client", "email": f"bench{i}@example.com"}
            for i in range(SEEDED_RECORDS)
        ]
        self.client_ids: list[int] = _admin(target.session(), "POST", f"{self.url}/__admin/clients", clients)[
            "ids"
        ]

    def get_clients_details_op(self) -> Op:
        session = self.target.session()
        url = f"{self.url}/includes/api.php"

        def op(i: int) -> None:
            form = {
                **self.credentials,
                "action": "GetClientsDetails",
                "responsetype": "json",
                "clientid": str(self.client_ids[i % len(self.client_ids)]),
            }
            response = session.post(url, data=form, timeout=REQUEST_TIMEOUT_S)
            if _expect(response, 200, "GetClientsDetails").json().get("result") != "success":
                raise BenchError(f"GetClientsDetails: {response.text[:300]}")

        return op


class SmdpBench:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.url = str(target.settings.smdp_url).rstrip("/")
        self.iccids: list[str] = []

    def seed(self, profiles: int) -> None:
        """A pool of ``profiles`` available profiles, for the next ops.

        The pool is emptied first: confirmOrder scans the whole pool, so rounds stay comparable.
        """
        session = self.target.session()
        _admin(session, "DELETE", f"{self.url}/__admin/profiles")
        body = {"count": profiles, "profile_type": "bench"}
        self.iccids = _admin(session, "POST", f"{self.url}/__admin/profiles", body)["iccids"]

    def _op(self, function: str, body: Callable[[str], dict[str, Any]]) -> Op:
        session = self.target.session()
        url = f"{self.url}/gsma/rsp2/es2plus/{function}"
        headers = {"X-Admin-Protocol": ES2_PROTOCOL}

        def op(i: int) -> None:
            payload = {
                "header": {
                    "functionRequesterIdentifier": "bench",
                    "functionCallIdentifier": f"{function}-{i}",
                },
                **body(self.iccids[i]),
            }
            response = session.post(url, json=payload, headers=headers, timeout=REQUEST_TIMEOUT_S)
            status = _expect(response, 200, function).json()["header"]["functionExecutionStatus"]
            if status.get("status") != "Executed-Success":
                raise BenchError(f"{function}: {status}")

        return op

    def download_order_op(self) -> Op:
        return self._op("downloadOrder", lambda iccid: {"iccid": iccid})

    def confirm_order_op(self) -> Op:
        return self._op("confirmOrder", lambda iccid: {"iccid": iccid, "releaseFlag": True})


class SmtpBench:
    def __init__(self, target: Target) -> None:
        settings = target.settings
        assert settings.smtp_host is not None
        self.host, self.port = settings.smtp_host, settings.smtp_port
        message = EmailMessage()
        message["From"] = "bench@example.com"
        message["To"] = "customer@example.com"
        message["Subject"] = "Your eSIM is ready"
        message["Message-ID"] = "<bench@provisioning.local>"
        message.set_content("Scan the QR code to install your eSIM.\n" * 10)
        self.raw = message.as_bytes()

    def _send(self, smtp: smtplib.SMTP) -> None:
        refused = smtp.sendmail("bench@example.com", ["customer@example.com"], self.raw)
        if refused:
            raise BenchError(f"SMTP refused {refused}")

    def connection_per_message_op(self) -> Op:
        def op(_: int) -> None:
            with smtplib.SMTP(self.host, self.port, timeout=REQUEST_TIMEOUT_S) as smtp:
                self._send(smtp)

        return op

    def kept_connection_op(self) -> Op:
        smtp = smtplib.SMTP(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        smtp.ehlo()

        def op(_: int) -> None:
            self._send(smtp)

        return op


# -- the run --------------------------------------------------------------------------------------


def run_all(target: Target, args: argparse.Namespace) -> list[Result]:
    """Every wanted benchmark, ``args.repeat`` times each; one Result per benchmark (the median run)."""
    wanted = set(args.only or BENCHMARKS)
    n, c, w = args.requests, args.concurrency, args.warmup
    runs: dict[str, list[Result]] = {}

    def record(result: Result) -> None:
        runs.setdefault(result.name, []).append(result)
        _progress(result)

    def bench(name: str, make_op: Callable[[], Op], unit: str = "requests", per_call: int = 1) -> None:
        if name in wanted:
            for _ in range(args.repeat):
                record(
                    measure(
                        target, name, make_op, count=n, concurrency=c, warmup=w, unit=unit, per_call=per_call
                    )
                )

    if wanted & {name for name in BENCHMARKS if name.startswith(("sf_", "cometd_"))}:
        sf = SalesforceBench(target)
        bench("sf_token", sf.token_op)
        bench("sf_query", sf.query_op)
        bench("sf_patch", sf.patch_op)
        bench("sf_publish", sf.publish_op)
        bench("cometd_handshake_disconnect", sf.handshake_op, per_call=2)
        bench("cometd_connect", sf.connect_op)
        if "cometd_delivery" in wanted:
            for _ in range(args.repeat):
                record(sf.delivery(args.events))
    if "whmcs_get_clients_details" in wanted:
        whmcs = WhmcsBench(target)
        bench("whmcs_get_clients_details", whmcs.get_clients_details_op)
    if wanted & {"smdp_download_order", "smdp_confirm_order"}:
        smdp = SmdpBench(target)
        for _ in range(args.repeat):
            # Each round orders fresh profiles, then confirms the ones it ordered.
            smdp.seed(n + w * c)
            for name, make_op in (
                ("smdp_download_order", smdp.download_order_op),
                ("smdp_confirm_order", smdp.confirm_order_op),
            ):
                if name in wanted or name == "smdp_download_order":
                    result = measure(target, name, make_op, count=n, concurrency=c, warmup=w)
                    if name in wanted:
                        record(result)
    smtp = SmtpBench(target)
    bench("smtp_connection_per_message", smtp.connection_per_message_op, unit="messages")
    bench("smtp_kept_connection", smtp.kept_connection_op, unit="messages")
    return [_median(results) for results in runs.values()]


def _median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rate_per_s)
    middle = ordered[(len(ordered) - 1) // 2]
    return replace(middle, runs=[r.rate_per_s for r in results], best_per_s=ordered[-1].rate_per_s)


def _progress(result: Result) -> None:
    log(f"{result.mode} {result.name}: {result.rate_per_s:,.1f} {result.unit}/s")


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


MODE_TITLES = {
    "process": "the sandbox in its own process (`provisioning sandbox`)",
    "inprocess": "the sandbox on a thread of the client's process",
}


def results_table(mode: str, results: list[Result], args: argparse.Namespace) -> Table:
    table = Table(
        f"Simulator throughput: {MODE_TITLES[mode]}, {args.concurrency} client thread(s)",
        [
            "benchmark",
            "unit",
            "rate/s",
            "best/s",
            "p50 ms",
            "p99 ms",
            "client CPU ms",
            "server CPU ms",
            "server max/s",
            f">= {TARGET_PER_S:.0f}/s",
        ],
    )
    for r in results:
        table.add(
            r.name,
            r.unit,
            _cell(r.rate_per_s, 0),
            _cell(r.best_per_s, 0),
            _cell(r.p50_ms),
            _cell(r.p99_ms),
            _cell(r.client_cpu_ms),
            _cell(r.server_cpu_ms),
            _cell(r.server_max_per_s, 0),
            "yes" if r.meets_target else "NO",
        )
    table.notes += [
        f"{args.requests:,} calls per benchmark after {args.warmup} per thread of warm-up "
        f"({args.events:,} events for cometd_delivery); rate/s is the median of {args.repeat} run(s), "
        "best/s the best; latencies and CPU are the median run's, per call (a handshake_disconnect "
        "call is 2 requests).",
        "CPU per request is user + system time: client CPU is this process's; server CPU the sandbox "
        "process's (process mode only); server max/s = 1000 / server CPU ms.",
        f"GIL switch interval {sys.getswitchinterval() * 1000:g} ms.",
    ]
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Not bench.common.base_parser: no Redis here.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results (and the machine) as JSON here"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the sandbox files and its log go (default: a temp dir)",
    )
    parser.add_argument(
        "--mode",
        choices=("process", "inprocess", "both"),
        default="process",
        help="where the sandbox runs: its own process (default), a thread of this one, or both in turn",
    )
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="measured calls per benchmark")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured calls per client thread first"
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="client threads, each with its own connection"
    )
    parser.add_argument(
        "--events", type=int, default=DEFAULT_EVENTS, help="events of the CometD delivery benchmark"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each benchmark; the table shows the median and the best",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sys.setswitchinterval() of this process (default: Python's 0.005); matters with --mode inprocess",
    )
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"a subset of {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.events, args.repeat) < 1 or args.warmup < 0:
        parser.error(
            "--requests, --concurrency, --events and --repeat must be positive, --warmup not negative"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    modes = ("process", "inprocess") if args.mode == "both" else (args.mode,)
    # Taken first: it records the load average before the run (other work on the machine shows there).
    info = machine_info()
    tables: list[Table] = []
    results: list[Result] = []
    with Cleanup(), tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        for mode in modes:
            workdir = (args.workdir or Path(tmp)).absolute() / mode
            workdir.mkdir(parents=True, exist_ok=True)
            start = sandbox_process if mode == "process" else sandbox_inprocess
            with start(workdir) as target:
                mode_results = run_all(target, args)
            results += mode_results
            tables.append(results_table(mode, mode_results, args))
    data = {
        "settings": {
            "modes": list(modes),
            "requests": args.requests,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "events": args.events,
            "repeat": args.repeat,
            "switch_interval_s": sys.getswitchinterval(),
            "target_per_s": TARGET_PER_S,
        },
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": [asdict(r) for r in results],
    }
    emit("sandbox_throughput", args, info, tables, data)
    return 0


if __name__ == "__main__":
    run_main(main)
