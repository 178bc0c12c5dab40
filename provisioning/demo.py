"""``provisioning demo``: the whole flow on this machine, against the simulators, in a couple of minutes.

What runs: the sandbox (Salesforce, WHMCS, SM-DP+, SMTP) in this process; the
listener and two Celery workers as real processes on the local Redis. What
happens: Orders are seeded (eSIM and physical SIM, two whose WHMCS client has no
pay method), 10% of the external calls fail transiently, events are published
through the Salesforce REST API (a few twice), every Order is provisioned, the
two that fail are fixed in WHMCS and requeued with ``provisioning requeue``.
The SM-DP+ simulator tells ``provisioning esim-notify`` (a real process) that each
eSIM was downloaded and installed, and the Orders show it; then one Order is
cancelled with ``provisioning cancel`` and what it got is undone.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioning.core.backoff import retrying_transient
from provisioning.core.cli_context import Context, pass_ctx
from provisioning.core.settings import Settings
from provisioning.runs.services import Services
from provisioning.salesforce.client import SalesforceClient
from provisioning.sandbox import processes
from provisioning.sandbox.runner import Sandbox
from provisioning.sandbox.scenario import SeededOrder, count_effects, seed_orders, settled, wait_until

# How long the demo waits for every Order to finish before it gives up.
SETTLE_TIMEOUT_S = 240.0
PROGRESS_POLL_S = 0.5
WORKERS = 2
WORKER_CONCURRENCY = 8
TRANSIENT_ERROR_RATE = 0.10
DUPLICATE_EVENTS = 3
# Orders approved twice (a Flow firing twice): a second event with a new IdemKey__c.
SECOND_APPROVALS = 3
# Publishing an event through the (faulty) REST API: a few quick tries.
PUBLISH_ATTEMPTS = 10
PUBLISH_BACKOFF_S = 0.1
PUBLISH_BACKOFF_MAX_S = 1.0
WITHOUT_PAY_METHOD = 2
# Faults go to the business calls only, so the demo's own logins stay quiet.
FAULTY_OPERATIONS = {
    "salesforce": ["query", "order_patch"],
    "whmcs": [],
    "smdp": [],
    "smtp": [],
}
FAULT_STATUS = {"salesforce": 503, "whmcs": 200, "smdp": 503, "smtp": 503}
# The device's download and installation, this long after the release.
NOTIFY_DELAY_MS = 300


@dataclass
class DemoResult:
    transport: str
    orders: int
    activated: int
    failed: int
    requeued: int
    duplicates_published: int
    second_approvals_published: int
    whmcs_orders: int
    esim_profiles_confirmed: int
    emails: int
    sf_api_calls: int
    elapsed_s: float
    latency_p50_s: float
    latency_p95_s: float
    # eSIM Orders whose ESIM_Status__c says Installed (the SM-DP+'s notifications), and the one cancelled.
    esim_installed: int = 0
    cancelled: int = 0

    def ok(self) -> bool:
        return self.activated == self.orders and self.cancelled == (1 if self.orders > 1 else 0)


def _sf_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def _activated_at(view: dict[str, Any]) -> float | None:
    for patch in view.get("patches", []):
        if patch["fields"].get("Activation_Status__c") == "Activated":
            return _sf_time(patch["at"])
    return None


def _check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(str(settings.redis_url), socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        raise click.ClickException(
            f"the demo needs Redis at {settings.redis_url} ({exc}); start it, or set REDIS_URL"
        ) from None
    finally:
        client.close()


def run_demo(
    settings: Settings,
    *,
    orders: int,
    workdir: Path,
    console: Console,
    quiet: bool,
    transport: str = "pubsub",
) -> DemoResult:
    started = time.monotonic()
    _check_redis(settings)
    run_tag = uuid.uuid4().hex[:8]
    box = Sandbox(workdir / "sandbox", seed=42, long_poll_s=20.0, pubsub_keepalive_s=5.0).start()
    procs: list[processes.ManagedProcess] = []
    demo_settings = Settings(
        _env_file=None,
        **{
            **settings.model_dump(),
            **{k.lower(): v for k, v in box.env().items()},
            "ledger_prefix": f"demo-{run_tag}",
            "celery_queue": f"demo-{run_tag}",
            "sf_events_replay": "EARLIEST",
            "sf_events_transport": transport,
            "listener_health_port": 0,
            "task_retry_backoff_s": 0.5,
            "task_retry_backoff_max_s": 5.0,
            "log_format": "json",
        },
    )
    services = Services(demo_settings)
    try:
        env = demo_settings.to_env()
        logs = workdir / "logs"

        def say(text: str) -> None:
            if not quiet:
                console.print(text)

        say(
            f"[bold]Sandbox[/bold] up: Salesforce {box.url('salesforce')}, WHMCS {box.url('whmcs')}, "
            f"SM-DP+ {box.url('smdp')}, SMTP {box.urls['smtp']}  (logs in {logs})"
        )
        seeded = seed_orders(
            box,
            services.inventory,
            count=orders,
            esim_share=0.6,
            without_pay_method=min(WITHOUT_PAY_METHOD, orders),
            seed=42,
        )
        say(
            f"Seeded {len(seeded)} Orders ({sum(o.esim for o in seeded)} eSIM, "
            f"{sum(not o.esim for o in seeded)} physical SIM; "
            f"{sum(not o.has_pay_method for o in seeded)} whose WHMCS client has no pay method)"
        )
        for name, ops in FAULTY_OPERATIONS.items():
            box.admin(name).post(
                "/__admin/faults",
                {"error_rate": TRANSIENT_ERROR_RATE, "error_status": FAULT_STATUS[name], "operations": ops},
            )
        say(
            f"{int(TRANSIENT_ERROR_RATE * 100)}% of WHMCS, SM-DP+, SMTP and Salesforce REST calls fail transiently"
        )

        notify_port = processes.free_port()
        procs.append(processes.esim_notify(env, logs, port=notify_port).start())
        procs[-1].wait_for_log("esim_notify_listening", 60)
        box.admin("smdp").post(
            "/__admin/notify",
            {
                "url": f"https://127.0.0.1:{notify_port}/gsma/rsp2/es2plus/handleDownloadProgressInfo",
                "outcome": "installed",
                "delay_ms": NOTIFY_DELAY_MS,
                "ca_file": str(box.tls.ca_bundle),
                "cert_file": str(box.tls.client_cert_file),
                "key_file": str(box.tls.client_key_file),
            },
        )
        say(
            f"ES2+ notification endpoint (provisioning esim-notify, mutual TLS) on port {notify_port}: "
            "the SM-DP+ says when each eSIM is downloaded and installed"
        )
        listener = processes.listener(env, logs).start()
        procs.append(listener)
        for n in range(WORKERS):
            procs.append(
                processes.start_worker(env, logs, name=f"demo-worker{n + 1}", concurrency=WORKER_CONCURRENCY)
            )
        listener.wait_for_log("listener_subscribing", 60)
        say(
            f"Listener ({transport}) and {WORKERS} workers running "
            f"(celery -A tasks worker, {WORKER_CONCURRENCY} threads each)"
        )

        published_at, duplicates, approvals = _publish(box, demo_settings, seeded)
        say(
            f"Published {len(seeded)} OrderProvisionRequested__e events through the Salesforce REST API "
            f"({duplicates} of them twice, and {approvals} Orders approved a second time with a new key: "
            "each Order is still provisioned once)"
        )
        _follow(box, seeded, console, quiet)
        first_pass = _views(box, seeded)
        failed_ids = [o for o in seeded if first_pass[o.order_id]["Activation_Status__c"] == "Failed"]
        if not quiet:
            _summary(console, seeded, first_pass, services)
        requeued = 0
        if failed_ids:
            say(
                f"\n[bold]{len(failed_ids)} Orders failed[/bold]: their clients get a pay method in WHMCS, "
                "then the operator requeues them:"
            )
            for o in failed_ids:
                box.admin("whmcs").post(
                    f"/__admin/clients/{o.whmcs_client_id}/paymethods",
                    {"type": "CreditCard", "card_last_four": "1111", "expiry_date": "12/30"},
                )
            requeued = _requeue_all(env, console, quiet)
            _follow(box, failed_ids, console, quiet, label="Requeued")
        final = _views(box, seeded)
        # Every run has ended (an Order approved twice has a joined or skipped run beside its done one).
        wait_until(settled(box, services.ledger, [o.order_id for o in seeded]), timeout_s=SETTLE_TIMEOUT_S)
        effects = count_effects(box)
        esim_orders = [o for o in seeded if o.esim]
        wait_until(
            lambda: all(v.get("ESIM_Status__c") == "Installed" for v in _views(box, esim_orders).values()),
            timeout_s=SETTLE_TIMEOUT_S,
        )
        esim_installed = sum(
            1 for v in _views(box, esim_orders).values() if v.get("ESIM_Status__c") == "Installed"
        )
        say(f"\n[bold]{esim_installed} eSIMs installed[/bold]: the Orders' ESIM_Status__c says Installed")
        cancelled = _cancel_one(box, env, seeded, console, quiet) if len(seeded) > 1 else 0
        latencies = sorted(
            at - published_at[o.order_id]
            for o in seeded
            if o.has_pay_method and (at := _activated_at(final[o.order_id])) is not None
        )
        result = DemoResult(
            transport=transport,
            orders=len(seeded),
            activated=sum(1 for v in final.values() if v["Activation_Status__c"] == "Activated"),
            failed=len(failed_ids),
            requeued=requeued,
            duplicates_published=duplicates,
            second_approvals_published=approvals,
            whmcs_orders=effects.whmcs_orders,
            esim_profiles_confirmed=effects.esim_confirmed,
            emails=effects.emails,
            # What the listener and the workers spent of the org's allowance (the events' own
            # publication stands in for the org's Flow, and logins and CometD are not API calls).
            sf_api_calls=sum(
                n
                for op, n in effects.sf_api_calls.items()
                if op not in ("token", "event_publish") and not op.startswith("cometd")
            ),
            elapsed_s=round(time.monotonic() - started, 2),
            latency_p50_s=round(_percentile(latencies, 0.50), 3),
            latency_p95_s=round(_percentile(latencies, 0.95), 3),
            esim_installed=esim_installed,
            cancelled=cancelled,
        )
        if not quiet and failed_ids:
            _summary(console, failed_ids, final, services, title="After the requeue")
        return result
    finally:
        for proc in procs:
            proc.stop()
        box.stop()
        _cleanup(services, demo_settings)


def _publish(
    box: Sandbox, settings: Settings, seeded: list[SeededOrder]
) -> tuple[dict[str, float], int, int]:
    client = SalesforceClient.from_settings(settings)
    rng = random.Random(7)
    twice = set(rng.sample(range(len(seeded)), min(DUPLICATE_EVENTS, len(seeded))))
    paying = [n for n, o in enumerate(seeded) if o.has_pay_method and n not in twice]
    approved_twice = set(rng.sample(paying, min(SECOND_APPROVALS, len(paying))))
    published_at: dict[str, float] = {}
    for n, order in enumerate(seeded):
        _publish_one(client, order.order_id, order.idem_key)
        published_at[order.order_id] = time.time()
        if n in twice:
            _publish_one(client, order.order_id, order.idem_key)
        if n in approved_twice:
            _publish_one(client, order.order_id, "approval-2")
    return published_at, len(twice), len(approved_twice)


def _publish_one(client: SalesforceClient, order_id: str, idem_key: str) -> None:
    # The org's REST API has the same 10% transient faults; publishing is retried like any client would.
    for attempt in retrying_transient(
        attempts=PUBLISH_ATTEMPTS, base_s=PUBLISH_BACKOFF_S, cap_s=PUBLISH_BACKOFF_MAX_S
    ):
        with attempt:
            client.publish_event(order_id, idem_key)


def _views(box: Sandbox, seeded: list[SeededOrder]) -> dict[str, dict[str, Any]]:
    wanted = {o.order_id for o in seeded}
    return {v["Id"]: v for v in box.admin("salesforce").get("/__admin/orders")["orders"] if v["Id"] in wanted}


def _follow(
    box: Sandbox, seeded: list[SeededOrder], console: Console, quiet: bool, label: str = "Provisioning"
) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    columns = [
        TextColumn(f"{label} "),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        task = progress.add_task(label, total=len(seeded), detail="")
        while True:
            views = _views(box, seeded)
            states = [views[o.order_id]["Activation_Status__c"] for o in seeded]
            done = sum(s in ("Activated", "Failed") for s in states)
            progress.update(
                task,
                completed=done,
                detail=f"activated {states.count('Activated')}, failed {states.count('Failed')}",
            )
            if done == len(seeded):
                return
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"not every Order finished within {SETTLE_TIMEOUT_S:.0f}s; see the logs"
                )
            time.sleep(PROGRESS_POLL_S)


def _summary(
    console: Console,
    seeded: list[SeededOrder],
    views: dict[str, dict[str, Any]],
    services: Services,
    title: str = "Orders",
) -> None:
    table = Table(title=title)
    for col in ("Order", "SIM", "status", "WHMCS order", "ICCID", "attempts", "error"):
        table.add_column(col)
    for o in seeded:
        v = views[o.order_id]
        run = services.ledger.runs.get(o.run_id)
        attempts = sum(r.attempts for r in run.own_steps.values()) if run else 0
        table.add_row(
            o.order_id,
            "eSIM" if o.esim else "physical",
            v["Activation_Status__c"] or "",
            str(v.get("WHMCS_Order_ID__c") or ""),
            str(v.get("ESIM_ICCID__c") or ""),
            str(attempts),
            (v.get("Activation_Error__c") or "")[:70],
        )
    console.print(table)


def _requeue_all(env: dict[str, str], console: Console, quiet: bool) -> int:
    argv = [str(Path(sys.executable).with_name("provisioning")), "requeue", "--all", "--json"]
    if not quiet:
        console.print("  $ provisioning requeue --all")
    out = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise click.ClickException(f"provisioning requeue failed: {out.stderr.strip()[-500:]}")
    outcomes = json.loads(out.stdout)
    if not quiet:
        for o in outcomes:
            console.print(f"    {o['target']}: {o['action']} at {o['step']}")
    return sum(1 for o in outcomes if o["action"] == "requeued")


def _cancel_one(
    box: Sandbox, env: dict[str, str], seeded: list[SeededOrder], console: Console, quiet: bool
) -> int:
    """The customer withdraws: the last physical-SIM Order (else the last one) is cancelled; 1 once the
    Order says Cancelled."""
    target = next((o for o in reversed(seeded) if not o.esim), seeded[-1])
    cli = str(Path(sys.executable).with_name("provisioning"))
    argv = [cli, "cancel", target.order_id, "--reason", "the customer withdrew"]
    if not quiet:
        console.print(f"\n  $ provisioning cancel {target.order_id} --reason 'the customer withdrew'")
    out = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise click.ClickException(f"provisioning cancel failed: {out.stderr.strip()[-500:]}")
    if not quiet:
        for line in out.stdout.splitlines():
            console.print(f"    {line}")
    wait_until(
        lambda: _views(box, [target])[target.order_id]["Activation_Status__c"] == "Cancelled",
        timeout_s=SETTLE_TIMEOUT_S,
    )
    view = _views(box, [target])[target.order_id]
    if not quiet:
        console.print(
            f"  Order {target.order_id}: {view['Activation_Status__c']}: {view['Activation_Error__c']}"
        )
    return 1


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def _cleanup(services: Services, settings: Settings) -> None:
    """The demo's namespace goes away with it: ledger keys and its queue."""
    for client in (services.redis, redis.Redis.from_url(settings.celery_broker_url)):
        try:
            keys = list(client.scan_iter(f"*{settings.ledger_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.exceptions.RedisError:
            pass


@click.command()
@click.option(
    "--orders", default=50, show_default=True, type=click.IntRange(1, 2000), help="How many Orders to seed."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object with the counts instead of tables."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".sandbox/demo"),
    show_default=True,
    help="Where the sandbox's CA, keys and the process logs go.",
)
@click.option(
    "--transport",
    type=click.Choice(["pubsub", "cometd"]),
    default="pubsub",
    show_default=True,
    help="How the listener receives the events: the Pub/Sub API (gRPC) or the Streaming API (CometD).",
)
@pass_ctx
def demo(ctx: Context, orders: int, as_json: bool, workdir: Path, transport: str) -> None:
    """Run the whole flow end to end against the simulators, on the local Redis.

    Starts the sandbox, the listener and two workers; seeds Orders (two of them
    fail for want of a pay method, 10% of calls fail transiently, a few events
    arrive twice); then fixes and requeues the failed ones; the SM-DP+ notifies each eSIM's
    installation; one Order is cancelled. Exit 0 when every Order was Activated and the
    cancelled one ends Cancelled.
    """
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console = Console(stderr=as_json, width=140)
    result = run_demo(
        ctx.settings, orders=orders, workdir=workdir, console=console, quiet=as_json, transport=transport
    )
    if as_json:
        click.echo(json.dumps(result.__dict__))
    else:
        table = Table(title="Demo result")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in result.__dict__.items():
            table.add_row(key, str(value))
        console.print(table)
        verdict = (
            "[green]every Order Activated[/green]" if result.ok() else "[red]not every Order Activated[/red]"
        )
        console.print(f"{verdict} in {result.elapsed_s:.1f}s")
    sys.exit(0 if result.ok() else 1)
