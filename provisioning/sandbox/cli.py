"""``provisioning sandbox``: run the simulators until Ctrl-C or SIGTERM; and what says the extra is missing."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

import click

from provisioning.sandbox import SANDBOX_INSTALL_HINT, missing_sandbox_packages


def require_sandbox_extra(command: str) -> None:
    """Stop with what to install when the ``sandbox`` extra is not installed."""
    missing = missing_sandbox_packages()
    if missing:
        raise click.ClickException(
            f"`provisioning {command}` needs the sandbox extra, which is not installed "
            f"(missing: {', '.join(missing)}). Install it with: {SANDBOX_INSTALL_HINT}"
        )


def needs_sandbox_extra(name: str, summary: str) -> click.Command:
    """A stand-in for a command whose module cannot be imported without the extra."""

    @click.command(
        name,
        help=f"{summary}\n\nNeeds the sandbox extra: {SANDBOX_INSTALL_HINT}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    def stand_in() -> None:
        require_sandbox_extra(name)

    return stand_in


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".sandbox"),
    show_default=True,
    help="Where the CA, the JWT key and logs go.",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("sandbox.env"),
    show_default=True,
    help="Env file to write; use it with PROVISIONING_ENV_FILE.",
)
@click.option("--seed", type=int, default=None, help="Seed of the simulators' randomness (faults, ids).")
@click.option(
    "--salesforce-port", type=int, default=0, help="Port of the Salesforce simulator (0: any free port)."
)
@click.option("--whmcs-port", type=int, default=0, help="Port of the WHMCS simulator (0: any free port).")
@click.option("--smdp-port", type=int, default=0, help="Port of the SM-DP+ simulator (0: any free port).")
@click.option("--smtp-port", type=int, default=0, help="Port of the SMTP simulator (0: any free port).")
@click.option("--smtp-admin-port", type=int, default=0, help="Port of the SMTP simulator's admin API.")
@click.option(
    "--pubsub-port", type=int, default=0, help="Port of the Salesforce Pub/Sub API (gRPC; 0: any free port)."
)
@click.option(
    "--long-poll",
    "long_poll_s",
    type=float,
    default=110.0,
    show_default=True,
    help="Seconds the CometD connect is held open without events.",
)
@click.option(
    "--pubsub-keepalive",
    "pubsub_keepalive_s",
    type=float,
    default=270.0,
    show_default=True,
    help="Seconds between the Pub/Sub API's empty keepalive responses on an idle stream.",
)
def sandbox(
    workdir: Path,
    env_file: Path,
    seed: int | None,
    salesforce_port: int,
    whmcs_port: int,
    smdp_port: int,
    smtp_port: int,
    smtp_admin_port: int,
    pubsub_port: int,
    long_poll_s: float,
    pubsub_keepalive_s: float,
) -> None:
    """Start local simulators of Salesforce (REST, CometD, Pub/Sub API), WHMCS, SM-DP+ and SMTP (TLS, local CA).

    Prints their URLs and writes an env file that points `provisioning listen`
    and `celery -A tasks worker` at them:

        PROVISIONING_ENV_FILE=sandbox.env celery -A tasks worker
    """
    require_sandbox_extra("sandbox")
    from provisioning.sandbox.runner import Sandbox

    started = time.perf_counter()
    ports = {
        "salesforce": salesforce_port,
        "whmcs": whmcs_port,
        "smdp": smdp_port,
        "smtp": smtp_port,
        "smtp_admin": smtp_admin_port,
        "salesforce_pubsub": pubsub_port,
    }
    box = Sandbox(
        workdir, seed=seed, ports=ports, long_poll_s=long_poll_s, pubsub_keepalive_s=pubsub_keepalive_s
    ).start()
    box.write_env_file(env_file)
    for name, url in box.urls.items():
        click.echo(f"{name:<17} {url}")
    click.echo(f"{'env file':<17} {env_file}  (ready in {time.perf_counter() - started:.2f}s; Ctrl-C stops)")

    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    box.stop()
    click.echo("sandbox stopped")
