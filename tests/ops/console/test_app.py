"""The console's pages and rules, in-process (Flask's test client) on real Redis and the real simulators.

Authentication (401 without a user, passwords, the auth proxy), server-side
sessions (logout, rotation, the TTL), login throttling, roles, CSRF, the dry run
before an action, bad input, masking. The browser test
(``test_browser.py``) drives the real server and workers end to end.
"""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.retry import Wait
from provisioning.core.run_id import RunId
from provisioning.ledger import RunState
from provisioning.ops.console.app import create_app, mask_emails
from provisioning.ops.console.stores import console_sessions
from provisioning.runs.lifecycle import RunFailed, run_step
from provisioning.sandbox.scenario import seed_orders
from provisioning.step.results import PaymentChecked
from tests.ops.console.conftest import (
    COOKIE,
    PASSWORDS,
    console_settings,
    csrf_token,
    login,
    try_login,
)
from tests.steps import at

PAGES = ["/runs", "/failed", "/emails", "/quarantine", "/esim", "/listener", "/orders/801Dn0000HeJ6rrIQC"]


class NoPayMethod(PermanentError):
    pass


@pytest.fixture
def console_env(stack_settings, console_users):
    return console_settings(stack_settings, console_users)


@pytest.fixture
def app(console_env, services):
    return create_app(console_env, services=services)


def text(response) -> str:
    return response.get_data(as_text=True)


def alert(response) -> str:
    found = re.search(r'role="alert">(.*?)</div>', text(response), flags=re.S)
    return html.unescape(found.group(1)) if found else ""


def _flaky(ctx: Any) -> PaymentChecked:
    raise TransientError("WHMCS answered 503")


@pytest.fixture
def failed_run(sandbox, services) -> RunId:
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=81)
    run_id = RunId.parse(order.run_id)

    def refuse(ctx: Any) -> PaymentChecked:
        raise NoPayMethod("no valid payment method: the card of customer0@example.test expired")

    with pytest.raises(RunFailed):
        run_step(services, run_id, at("validate_payment", refuse))
    return run_id


@pytest.mark.parametrize("path", PAGES)
def test_every_page_without_a_user_answers_401_with_the_login_form(app, path):
    answer = app.test_client().get(path)
    assert answer.status_code == 401
    assert 'name="password"' in text(answer)
    assert answer.headers["WWW-Authenticate"].startswith("Cookie")


def test_an_action_without_a_user_answers_401_and_changes_nothing(app, services, failed_run):
    client = app.test_client()
    form = client.get("/login").get_data(as_text=True)
    answer = client.post("/failed/dry-run", data={"run_id": str(failed_run), "csrf_token": csrf_token(form)})
    assert answer.status_code == 401
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(app):
    client = app.test_client()
    for name, password in (("olivia", "not hers"), ("mallory", PASSWORDS["olivia"])):
        token = csrf_token(text(client.get("/login")))
        answer = client.post("/login", data={"username": name, "password": password, "csrf_token": token})
        assert answer.status_code == 401
        assert alert(answer) == "Unknown user or wrong password."
    assert client.get("/runs").status_code == 401


def test_a_login_without_the_csrf_token_is_refused(app):
    answer = app.test_client().post("/login", data={"username": "olivia", "password": PASSWORDS["olivia"]})
    assert answer.status_code == 400
    assert "CSRF token is missing" in alert(answer)


def test_login_sets_a_strict_http_only_cookie_and_only_redirects_within_the_site(app):
    client = app.test_client()
    token = csrf_token(text(client.get("/login")))
    answer = client.post(
        "/login",
        data={
            "username": "olivia",
            "password": PASSWORDS["olivia"],
            "csrf_token": token,
            "next": "https://evil.example/",
        },
    )
    assert answer.status_code == 302
    assert answer.location == "/runs"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    page = client.get("/runs")
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_a_viewer_reads_every_page_but_cannot_requeue(app, services, failed_run):
    client = app.test_client()
    login(client, "victor")
    page = client.get("/failed")
    assert page.status_code == 200
    assert str(failed_run) in text(page)
    assert 'name="run_id"' not in text(page)  # no checkboxes, no button
    answer = client.post(
        "/failed/dry-run", data={"run_id": str(failed_run), "csrf_token": csrf_token(text(page))}
    )
    assert answer.status_code == 403
    assert "Your role (viewer) cannot requeue runs" in alert(answer)
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED


def test_an_operators_form_without_the_csrf_token_changes_nothing(app, services, failed_run):
    client = app.test_client()
    login(client, "olivia")
    answer = client.post("/failed/requeue", data={"run_id": str(failed_run), "confirmation": "x"})
    assert answer.status_code == 400
    assert "The CSRF token is missing" in alert(answer)
    assert "Nothing was changed" in alert(answer)
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED


def test_a_requeue_needs_the_confirmation_of_a_dry_run_of_the_same_runs(app, services, failed_run):
    client = app.test_client()
    login(client, "olivia")
    token = csrf_token(text(client.get("/failed")))
    forged = client.post(
        "/failed/requeue", data={"run_id": str(failed_run), "csrf_token": token, "confirmation": "forged"}
    )
    assert forged.status_code == 400
    assert "run the dry run again" in alert(forged)
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED

    dry = client.post(
        "/failed/dry-run", data={"run_id": [str(failed_run), "801Dn0000HeJ6rrIQC:nope"], "csrf_token": token}
    )
    assert dry.status_code == 200
    body = text(dry)
    assert "would requeue" in body
    assert "nothing to requeue: it is not in the ledger" in body
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED
    confirmation = re.search(r'name="confirmation" value="([^"]+)"', body).group(1)
    # The confirmation covers exactly what the dry run found requeueable, by this user.
    widened = client.post(
        "/failed/requeue",
        data={
            "run_id": [str(failed_run), "801Dn0000HeJ6rrIQC:other"],
            "csrf_token": token,
            "confirmation": confirmation,
        },
    )
    assert widened.status_code == 400
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED
    done = client.post(
        "/failed/requeue", data={"run_id": str(failed_run), "csrf_token": token, "confirmation": confirmation}
    )
    assert done.status_code == 200
    assert "resumed at validate_payment" in text(done)
    assert services.ledger.runs.get(failed_run).state is RunState.RUNNING


def test_nothing_selected_and_unknown_ids_get_a_clear_message(app):
    client = app.test_client()
    login(client, "olivia")
    token = csrf_token(text(client.get("/failed")))
    empty = client.post("/failed/dry-run", data={"csrf_token": token})
    assert empty.status_code == 400
    assert "Nothing was selected" in alert(empty)
    bad_order = client.post("/emails/dry-run", data={"order_id": "not-an-id", "csrf_token": token})
    assert bad_order.status_code == 400
    assert "is not a Salesforce Order Id" in alert(bad_order)
    unknown_run = client.get("/runs/801Dn0000HeJ6rrIQC:nope")
    assert unknown_run.status_code == 404
    assert "is not in the ledger" in alert(unknown_run)
    assert client.get("/orders/nope").status_code == 404
    bad_filter = client.get("/runs?older_than=yesterday")
    assert bad_filter.status_code == 400
    assert "like 30m, 12h or 7d" in alert(bad_filter)


def test_the_runs_list_filters_by_state_step_and_order(app, services, failed_run, sandbox):
    client = app.test_client()
    login(client, "victor")
    (other,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=82)
    # Begun, its first step to be tried again: running at validate_payment.
    with pytest.raises(Wait):
        run_step(services, RunId.parse(other.run_id), at("validate_payment", _flaky))
    all_runs = text(client.get("/runs"))
    assert str(failed_run) in all_runs
    assert other.run_id in all_runs
    failed = text(client.get("/runs?state=failed"))
    assert str(failed_run) in failed
    assert other.run_id not in failed
    at_step = text(client.get("/runs?step=validate_payment"))
    assert str(failed_run) in at_step
    assert other.run_id in at_step
    by_order = text(client.get(f"/runs?order={other.order_id}"))
    assert other.run_id in by_order
    assert str(failed_run) not in by_order
    assert "No run matches" in text(client.get("/runs?older_than=1d"))


def test_the_order_page_shows_each_runs_timeline_with_e_mail_addresses_masked(app, services, failed_run):
    client = app.test_client()
    login(client, "olivia")
    page = text(client.get(f"/orders/{failed_run.order_id}"))
    assert "created by an event" in page
    assert "failed at validate_payment" in page
    assert "the card of c•••@example.test expired" in page
    assert "customer0@example.test" not in page
    assert "Requeue… (dry run first)" in page


def test_mask_emails_keeps_the_first_character_and_the_domain():
    assert mask_emails("550 <customer0@mailbox.invalid> unknown") == "550 <c•••@mailbox.invalid> unknown"
    assert mask_emails(None) == ""
    assert mask_emails("no address here") == "no address here"


def test_the_auth_proxy_header_names_the_user_only_from_a_trusted_address(
    stack_settings, console_users, services
):
    proxied = console_settings(stack_settings, console_users, console_auth_proxy_header="X-Forwarded-User")
    client = create_app(proxied, services=services).test_client()
    assert client.get("/runs", headers={"X-Forwarded-User": "victor"}).status_code == 200
    stranger = client.get("/runs", headers={"X-Forwarded-User": "mallory"})
    assert stranger.status_code == 403
    assert "'mallory', who is not in CONSOLE_USERS" in alert(stranger)
    # From an address the proxy list does not hold, the header is ignored.
    far = client.get(
        "/runs", headers={"X-Forwarded-User": "victor"}, environ_base={"REMOTE_ADDR": "10.1.2.3"}
    )
    assert far.status_code == 401
    # Without the proxy mode, the header means nothing.
    plain = create_app(console_settings(stack_settings, console_users), services=services).test_client()
    assert plain.get("/runs", headers={"X-Forwarded-User": "victor"}).status_code == 401


def test_the_console_refuses_to_start_without_users(stack_settings, services):
    with pytest.raises(ValueError, match="CONSOLE_USERS has no user"):
        create_app(stack_settings, services=services)


# -- sessions on the server ------------------------------------------------------------------------


def test_after_logout_the_old_session_cookie_gets_the_login_page_and_cannot_run_a_dry_run(
    app, services, failed_run
):
    client = app.test_client()
    login(client, "olivia")
    token = csrf_token(text(client.get("/failed")))
    stolen = client.get_cookie(COOKIE).value
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get_cookie(COOKIE) is None
    replay = app.test_client()
    replay.set_cookie(COOKIE, stolen)
    page = replay.get("/runs")
    assert page.status_code == 401
    assert 'name="password"' in text(page)
    dry = replay.post("/failed/dry-run", data={"run_id": str(failed_run), "csrf_token": token})
    assert dry.status_code == 401
    assert "would requeue" not in text(dry)
    assert services.ledger.runs.get(failed_run).state is RunState.FAILED


def test_a_login_gives_a_new_session_id_and_the_one_held_before_it_is_dead(app):
    client = app.test_client()
    client.get("/login")
    before_login = client.get_cookie(COOKIE).value  # the login form's CSRF secret, signed
    login(client, "olivia")
    first = client.get_cookie(COOKIE).value
    assert first != before_login
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", first)  # an opaque id: nothing about the user
    login(client, "victor")  # logging in again, here as someone else
    second = client.get_cookie(COOKIE).value
    assert second != first
    assert "victor (viewer)" in text(client.get("/runs"))
    for dead in (first, before_login):
        stale = app.test_client()
        stale.set_cookie(COOKIE, dead)
        assert stale.get("/runs").status_code == 401


def test_a_session_ends_on_the_server_its_ttl_after_the_login_whatever_the_use(console_env, services, clock):
    app = create_app(console_env, services=services, clock=clock)
    client = app.test_client()
    login(client, "olivia")
    sessions = console_sessions(console_env, services.redis, clock)
    assert sessions.running("olivia") == 1
    clock.advance(console_env.console_session_ttl_s - 1)
    assert client.get("/runs").status_code == 200
    clock.advance(1)
    assert client.get("/runs").status_code == 401
    assert sessions.running("olivia") == 0


def test_a_cookie_signed_by_the_old_console_naming_a_user_logs_nobody_in(app):
    from flask.sessions import SecureCookieSessionInterface

    forged = SecureCookieSessionInterface().get_signing_serializer(app).dumps({"user": "olivia"})
    client = app.test_client()
    client.set_cookie(COOKIE, forged)
    assert client.get("/runs").status_code == 401


# -- login throttling --------------------------------------------------------------------------------


@pytest.fixture
def throttled(stack_settings, console_users, services, clock):
    """A console whose users are locked at the fifth wrong password, for a minute; its clock moved by hand."""

    def build(**settings: object):
        env = console_settings(
            stack_settings,
            console_users,
            **{"console_login_max_failures": 5, "console_login_lock_s": 60, **settings},
        )
        return create_app(env, services=services, clock=clock)

    return build


def test_wrong_passwords_make_the_next_try_wait_then_lock_the_user_even_against_the_right_password(
    throttled, clock
):
    client = throttled().test_client()
    for _ in range(3):
        assert alert(try_login(client, "olivia", "guess")) == "Unknown user or wrong password."
    fourth = try_login(client, "olivia", "guess")
    assert fourth.status_code == 401
    assert alert(fourth) == (
        "Unknown user or wrong password. Too many failed logins for this user: wait 1 s before trying again."
    )
    too_soon = try_login(client, "olivia", PASSWORDS["olivia"])
    assert too_soon.status_code == 429
    assert too_soon.headers["Retry-After"] == "1"
    assert alert(too_soon) == "Too many failed logins for this user: wait 1 s before trying again."
    clock.advance(1)
    fifth = try_login(client, "olivia", "guess")
    assert "Too many failed logins for this user: logins are locked for 1 min" in alert(fifth)
    for wait in (0, 30, 29):
        clock.advance(wait)
        refused = try_login(client, "olivia", PASSWORDS["olivia"])
        assert refused.status_code == 429
        assert "Too many failed logins for this user: logins are locked for" in alert(refused)
        assert client.get("/runs").status_code == 401
    assert "locked for 1 s" in alert(refused)
    clock.advance(1)
    login(client, "olivia")
    assert client.get("/runs").status_code == 200


def test_a_successful_login_resets_the_users_failures(throttled):
    client = throttled().test_client()
    for _ in range(3):
        try_login(client, "olivia", "guess")
    login(client, "olivia")
    for _ in range(3):
        assert alert(try_login(client, "olivia", "guess")) == "Unknown user or wrong password."
    assert "wait 1 s" in alert(try_login(client, "olivia", "guess"))


def test_wrong_passwords_from_one_address_lock_it_for_every_user_and_only_that_address(throttled):
    app = throttled(console_login_max_failures_per_address=4)
    far = {"environ_base": {"REMOTE_ADDR": "203.0.113.9"}}
    client = app.test_client()
    for n in range(3):
        assert alert(try_login(client, f"user{n}", "guess", **far)) == "Unknown user or wrong password."
    locking = try_login(client, "user3", "guess", **far)
    assert "Too many failed logins from your address: logins are locked for 1 min" in alert(locking)
    refused = try_login(client, "olivia", PASSWORDS["olivia"], **far)
    assert refused.status_code == 429
    assert "from your address" in alert(refused)
    login(client, "olivia")  # from another address


def test_behind_a_trusted_proxy_the_address_counted_is_the_client_x_forwarded_for_names(throttled):
    app = throttled(console_login_max_failures_per_address=2)
    client = app.test_client()

    def via_proxy(client_address: str) -> dict[str, object]:
        return {"headers": {"X-Forwarded-For": f"{client_address}, 127.0.0.1"}}

    for user in ("user0", "user1"):
        try_login(client, user, "guess", **via_proxy("203.0.113.9"))
    assert try_login(client, "olivia", PASSWORDS["olivia"], **via_proxy("203.0.113.9")).status_code == 429
    assert try_login(client, "olivia", PASSWORDS["olivia"], **via_proxy("198.51.100.1")).status_code == 302
    # From an address that is no trusted proxy, the header is the client's own word: not believed.
    untrusted = {"environ_base": {"REMOTE_ADDR": "10.1.2.3"}}
    for n in range(2):
        try_login(
            client, f"user{n}", "guess", headers={"X-Forwarded-For": f"198.51.100.{n + 2}"}, **untrusted
        )
    assert try_login(client, "victor", PASSWORDS["victor"], **untrusted).status_code == 429


def test_the_listener_page_shows_each_systems_circuit_and_the_salesforce_api_allowance(app, services):
    from provisioning.ledger.limits import BreakerPolicy, Outcome

    services.ledger.limits.record(
        "smdp", Outcome.THROTTLED, BreakerPolicy(failures=5, cooldown_s=60, cooldown_max_s=60)
    )
    services.ledger.limits.record_api_usage(3000, 15000)
    client = app.test_client()
    login(client, "victor")
    page = client.get("/listener")
    assert page.status_code == 200
    body = text(page)
    assert "A circuit is not closed: its steps wait (no retry budget spent) until a probe succeeds." in body
    assert re.search(
        r'<td class="mono">smdp</td><td>open \((59|60) s to the next probe\)</td><td>1</td>', body
    )
    assert '<td class="mono">whmcs</td><td>closed</td><td>0</td><td class="mono">none</td>' in body
    assert "3000 of 15000 used (20 %)" in body
