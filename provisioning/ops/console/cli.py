"""``provisioning console``: serve the operators' console (waitress); ``hash-password`` for CONSOLE_USERS;
``revoke-sessions`` and ``unlock`` for an operator handling a user's logins (Redis only: no console
extra needed)."""

from __future__ import annotations

import sys

import click

from provisioning.core.cli_context import Context
from provisioning.ops.console import CONSOLE_INSTALL_HINT, missing_console_packages

# Requests the console serves at once (waitress's worker threads).
CONSOLE_THREADS = 8


def _require_extra() -> None:
    missing = missing_console_packages()
    if missing:
        raise click.ClickException(
            f"`provisioning console` needs the console extra, which is not installed "
            f"(missing: {', '.join(missing)}). Install it with: {CONSOLE_INSTALL_HINT}"
        )


@click.group(invoke_without_command=True)
@click.option("--host", default=None, help="Address to listen on (default: CONSOLE_HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: CONSOLE_PORT).")
@click.pass_context
def console(click_ctx: click.Context, host: str | None, port: int | None) -> None:
    """The operators' web console: runs, Orders, failed runs (requeue), e-mails (resend), stock, listener.

    Users and roles come from CONSOLE_USERS (passwords as argon2 hashes: see
    `provisioning console hash-password`) or an auth proxy's header
    (CONSOLE_AUTH_PROXY_HEADER). Binds to 127.0.0.1 unless CONSOLE_HOST says otherwise.
    Runs until SIGTERM or Ctrl-C.
    """
    if click_ctx.invoked_subcommand is not None:
        return
    _require_extra()
    ctx = click_ctx.ensure_object(Context)
    settings = ctx.settings
    from waitress import serve

    from provisioning.core.logs import get_logger
    from provisioning.ops.console.app import create_app

    log = get_logger("provisioning.ops.console")
    try:
        app = create_app(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.console_secret_key is None:
        log.warning(
            "console_secret_key_random",
            hint="set CONSOLE_SECRET_KEY to keep open forms and dry runs valid across restarts",
        )
    bind_host = host or settings.console_host
    bind_port = settings.console_port if port is None else port
    log.info("console_serving", host=bind_host, port=bind_port, users=len(settings.console_users))
    serve(app, host=bind_host, port=bind_port, threads=CONSOLE_THREADS, ident="provisioning-console")


@console.command("hash-password")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from standard input (one line).")
def hash_password(from_stdin: bool) -> None:
    """Print the argon2id hash of a password, for the user's password_hash in CONSOLE_USERS."""
    _require_extra()
    from provisioning.ops.console.auth import hash_password as make_hash

    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        click.echo(make_hash(password))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@console.command("revoke-sessions")
@click.argument("user")
@click.pass_context
def revoke_sessions(click_ctx: click.Context, user: str) -> None:
    """End every console session of USER now (a lost laptop, a leaver, a password changed).

    Their next request gets the login page; logging in again works (remove USER from
    CONSOLE_USERS, or change the password hash, to keep them out).
    """
    from provisioning.core.logs import get_logger
    from provisioning.core.redis_client import redis_from_settings
    from provisioning.ops.console.stores import console_sessions

    settings = click_ctx.ensure_object(Context).settings
    client = redis_from_settings(settings)
    try:
        ended = console_sessions(settings, client).revoke_user(user)
    finally:
        client.close()
    get_logger("provisioning.ops.console").warning("console_sessions_revoked", user=user, sessions=ended)
    click.echo(f"Ended {ended} session{'s' if ended != 1 else ''} of {user}.")
    if user not in settings.console_users:
        click.echo(f"Note: {user!r} is not in CONSOLE_USERS.", err=True)


@console.command("unlock")
@click.argument("user", required=False)
@click.option(
    "--address", help="A client address whose failed logins to forget (as the lock's log line says)."
)
@click.pass_context
def unlock(click_ctx: click.Context, user: str | None, address: str | None) -> None:
    """Let USER (and/or --address) try to log in again at once: their failed logins are forgotten.

    For a user locked out by someone else's guesses, once the guessing is dealt with;
    the lock would otherwise pass by itself after CONSOLE_LOGIN_LOCK_S.
    """
    if user is None and address is None:
        raise click.UsageError("name a USER, an --address, or both")
    from provisioning.core.logs import get_logger
    from provisioning.core.redis_client import redis_from_settings
    from provisioning.ops.console.stores import login_throttle

    settings = click_ctx.ensure_object(Context).settings
    client = redis_from_settings(settings)
    try:
        forgotten = login_throttle(settings, client).unlock(user=user, address=address)
    finally:
        client.close()
    get_logger("provisioning.ops.console").warning("console_login_unlocked", user=user, remote=address)
    named = " and ".join(x for x in (user, address) if x)
    if forgotten:
        click.echo(f"Unlocked {named}: their failed logins are forgotten.")
    else:
        click.echo(f"{named} had no failed logins to forget.")
