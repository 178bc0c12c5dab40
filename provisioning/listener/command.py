"""``provisioning listen``: the listener process, stopped cleanly by SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from provisioning.core import tracing
from provisioning.core.cli_context import Context, pass_ctx
from provisioning.core.logs import get_logger

log = get_logger(__name__)


@click.command()
@click.option(
    "--replay-from",
    metavar="LATEST|EARLIEST|REPLAY_ID",
    help="Ignore the stored checkpoint once and subscribe from here (e.g. to replay after an incident): "
    "an integer replayId for CometD, the hex of the replay id for Pub/Sub (as the log's checkpoint= "
    "and the console show them).",
)
@click.option(
    "--health-port",
    type=int,
    default=None,
    help="Port of /healthz, /livez and /metrics (default: LISTENER_HEALTH_PORT; 0 turns it off).",
)
@pass_ctx
def listen(ctx: Context, replay_from: str | None, health_port: int | None) -> None:
    """Subscribe to the provisioning Platform Event and publish one run (a chain of tasks) per event.

    Runs until SIGTERM or Ctrl-C: the batch in hand is finished, the checkpoint
    written and the leader lock released, then it exits 0. Start position: the
    stored checkpoint of the transport in use (SF_EVENTS_TRANSPORT), else
    SF_EVENTS_REPLAY; a checkpoint too old for the event bus falls back to
    SF_EVENTS_REPLAY_FALLBACK. Other replicas wait as hot standbys. The leader
    also runs the reconciler (every RECONCILE_INTERVAL_S) and the backfill.
    """
    from provisioning.core.replay_id import parse_start
    from provisioning.listener.health import serve_health
    from provisioning.listener.service import Listener
    from provisioning.listener.sources import make_event_source
    from provisioning.runs.publishing import make_publisher
    from provisioning.runs.services import Services

    settings = ctx.settings
    if not settings.sf_events_enabled:
        click.echo("SF_EVENTS_ENABLED is false: the listener has nothing to do.", err=True)
        return
    settings.require("sf_login_url", "sf_client_id", "sf_username", "sf_private_key_file")
    start = None
    if replay_from is not None:
        try:
            start = parse_start(replay_from, settings.sf_events_transport)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--replay-from") from None
    # The runs' traces begin at their events (TRACING_EXPORTER; off by default).
    tracing.start(settings, "provisioning-listener")
    listener = Listener(
        settings,
        services=Services(settings),
        publisher=make_publisher(settings),
        source=make_event_source(settings),
        replay_from=start,
    )
    port = settings.listener_health_port if health_port is None else health_port
    server = serve_health(listener, settings.listener_health_host, port) if port else None

    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # The handler only sets a flag: stopping the source takes locks the main thread may hold.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    def _stopper() -> None:
        stop_requested.wait()
        listener.stop()

    threading.Thread(target=_stopper, name="stopper", daemon=True).start()
    listener.run()
    if server is not None:
        server.shutdown()
    tracing.stop()
    log.info("listener_stopped", channel=settings.sf_provision_event_channel)
