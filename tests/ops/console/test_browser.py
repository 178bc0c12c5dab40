"""The console in a real browser (headless Chromium driven by Playwright) against the real stack.

The sandbox, a real listener, real workers and ``provisioning console`` as a real
process (waitress). A viewer logs in, filters the runs and opens an Order; an
operator requeues a failed run after its dry run and watches it finish. A session
cookie put back after logout gets the login page; wrong passwords get the wait. With
``SCREENSHOTS_DIR`` set, each page is saved there as PNG (docs/screenshots/ holds
the committed ones: ``SCREENSHOTS_DIR=docs/screenshots make test PYTEST_ARGS=tests/ops/console``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from provisioning.ledger import RunState
from provisioning.sandbox.processes import ManagedProcess, free_port
from provisioning.sandbox.scenario import event_payload, publish_events_admin, seed_orders, wait_until
from tests.ops.console.conftest import COOKIE, PASSWORDS, console_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# How long a page may take to show what it should (a requeued run finishing included).
UI_TIMEOUT_MS = 60_000
VIEWPORT = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Served:
    base: str
    proc: ManagedProcess


@pytest.fixture
def serve_console(stack_settings, console_users, tmp_path) -> Iterator[Callable[..., Served]]:
    """``provisioning console`` as a real process (waitress); keyword arguments are settings."""
    started: list[ManagedProcess] = []

    def serve(**extra: object) -> Served:
        port = free_port()
        env = console_settings(stack_settings, console_users, **extra).to_env()
        proc = ManagedProcess(
            "console",
            [str(Path(os.sys.executable).with_name("provisioning")), "console", "--port", str(port)],
            env,
            tmp_path / "logs" / f"console{len(started) + 1}.log",
        ).start()
        started.append(proc)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return requests.get(base + "/login", timeout=2).status_code == 200
            except requests.RequestException:
                assert proc.alive(), proc.log_text()[-3000:]
                return False

        wait_until(up, timeout_s=30)
        return Served(base, proc)

    yield serve
    for proc in started:
        proc.stop()
        log = proc.log_text()
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def console(serve_console) -> str:
    return serve_console().base


def shot(page: Page, name: str) -> None:
    target = os.environ.get("SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"console-{name}.png"), full_page=True)


def log_in(browser: Browser, base: str, name: str) -> Page:
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    answer = page.goto(base + "/runs")
    assert answer is not None
    assert answer.status == 401
    if name == "olivia":
        shot(page, "login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    expect(page.locator("#who")).to_contain_text(name)
    return page


def test_operators_find_a_failed_run_requeue_it_after_its_dry_run_and_see_it_finish(
    browser, console, sandbox, services, workers, listeners
):
    ok, bouncing, bad = seed_orders(
        sandbox, services.inventory, count=3, esim_share=1.0, without_pay_method=1, seed=91
    )
    salesforce = sandbox.admin("salesforce")
    salesforce.patch(f"/__admin/orders/{bouncing.order_id}", {"email": "customer1@mailbox.invalid"})
    workers(concurrency=4)
    listeners()
    publish_events_admin(sandbox, [event_payload(o) for o in (ok, bouncing, bad)])
    wait_until(
        lambda: (
            all(_state(services, o.run_id) is RunState.DONE for o in (ok, bouncing))
            and _state(services, bad.run_id) is RunState.FAILED
        )
    )
    services.ledger.registries.quarantine(
        [
            {
                "replay_id": 7,
                "uuid": "u-1",
                "reason": "OrderId__c is missing",
                "payload": {"IdemKey__c": "k"},
                "received_at": 1.0,
            }
        ]
    )

    # Without credentials: 401, for a browser and for a script.
    assert requests.get(console + "/runs", timeout=5).status_code == 401
    assert (
        requests.post(console + "/failed/requeue", data={"run_id": bad.run_id}, timeout=5).status_code == 401
    )

    # A viewer filters the runs, opens the Order, and cannot requeue.
    viewer = log_in(browser, console, "victor")
    viewer.select_option("select[name=state]", "failed")
    viewer.click("form.filters button[type=submit]")
    rows = viewer.locator("#runs tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(bad.run_id)
    expect(rows.first).to_contain_text("validate_payment")
    shot(viewer, "runs")
    viewer.click(f"text={bad.run_id}")
    expect(viewer.locator("h1")).to_contain_text(bad.order_id)
    expect(viewer.locator(".timeline").first).to_contain_text("created by an event")
    expect(viewer.locator(".timeline").first).to_contain_text("failed at validate_payment")
    expect(viewer.get_by_text("Requeue… (dry run first)")).to_have_count(0)
    viewer.goto(console + "/failed")
    expect(viewer.locator("#failed")).to_contain_text(bad.run_id)
    expect(viewer.locator("#dry-run")).to_have_count(0)
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
    forbidden = viewer.request.post(
        console + "/failed/dry-run", form={"run_id": bad.run_id, "csrf_token": token}
    )
    assert forbidden.status == 403
    assert "cannot requeue runs" in forbidden.text()
    for path in ("quarantine", "esim", "listener"):
        viewer.goto(f"{console}/{path}")
        shot(viewer, path)
    expect(viewer.locator("#listener")).to_contain_text("held")
    viewer.goto(console + "/quarantine")
    expect(viewer.locator("#quarantine")).to_contain_text("OrderId__c is missing")

    # An operator's form without its CSRF token changes nothing.
    operator = log_in(browser, console, "olivia")
    forged = operator.request.post(
        console + "/failed/requeue", form={"run_id": bad.run_id, "confirmation": "x"}
    )
    assert forged.status == 400
    assert "CSRF token is missing" in forged.text()
    assert _state(services, bad.run_id) is RunState.FAILED

    # The operator requeues the failed run: the dry run first, which changes nothing.
    operator.goto(console + "/failed")
    shot(operator, "failed")
    operator.check(f"input[name=run_id][value='{bad.run_id}']")
    operator.click("#dry-run")
    expect(operator.locator("#outcomes")).to_contain_text("would requeue")
    expect(operator.locator("#outcomes")).to_contain_text("would resume at validate_payment")
    shot(operator, "dry-run")
    assert _state(services, bad.run_id) is RunState.FAILED
    sandbox.admin("whmcs").post(
        f"/__admin/clients/{bad.whmcs_client_id}/paymethods", {"type": "CreditCard", "expiry_date": "12/30"}
    )
    operator.click("#confirm")
    expect(operator.locator("#outcomes")).to_contain_text("requeued")
    operator.click(f"#outcomes >> text={bad.run_id}")
    # The Order page reloads itself while the run is in flight.
    expect(operator.locator(f'div.run[id="run-{bad.run_id}"] [data-state="done"]')).to_be_visible()
    expect(operator.locator("#effects")).to_contain_text("sent")
    expect(operator.locator(".timeline").first).to_contain_text("requeued by console:olivia")
    expect(operator.locator(".timeline").first).to_contain_text("validate_payment: no valid payment method")
    shot(operator, "order")
    assert _state(services, bad.run_id) is RunState.DONE
    view = sandbox.admin("salesforce").get(f"/__admin/orders/{bad.order_id}")
    assert view["Activation_Status__c"] == "Activated"
    operator.goto(console + "/runs")
    expect(operator.locator("#runs tbody tr")).to_have_count(3)

    # The refused welcome e-mail: listed with the reply (addresses masked), resent after a dry run.
    operator.goto(console + "/emails")
    expect(operator.locator("#emails")).to_contain_text(bouncing.order_id)
    expect(operator.locator("#emails")).to_contain_text("550")
    expect(operator.locator("#emails")).not_to_contain_text("customer1@mailbox.invalid")
    shot(operator, "emails")
    salesforce.patch(f"/__admin/orders/{bouncing.order_id}", {"email": "customer1@example.test"})
    operator.check(f"input[name=order_id][value='{bouncing.order_id}']")
    operator.click("text=Dry run: what would a resend do?")
    expect(operator.locator("#outcomes")).to_contain_text("would send")
    assert sandbox.admin("smtp").get("/__admin/messages")["count"] == 2
    operator.click("#confirm")
    expect(operator.locator("#outcomes")).to_contain_text("delivered")
    assert sandbox.admin("smtp").get("/__admin/messages")["count"] == 3
    operator.close()
    viewer.close()


def _state(services, run_id):
    run = services.ledger.runs.get(run_id)
    return run.state if run else None


def test_a_session_cookie_put_back_after_logout_gets_the_login_page(browser, serve_console):
    served = serve_console()
    page = log_in(browser, served.base, "olivia")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE]
    page.click("text=Log out")
    expect(page.locator("input[name=password]")).to_be_visible()
    assert all(c["value"] != cookie["value"] for c in page.context.cookies())
    page.context.add_cookies([cookie])  # a copy of the cookie taken before the logout
    answer = page.goto(served.base + "/failed")
    assert answer is not None
    assert answer.status == 401
    expect(page.locator("h1")).to_have_text("Log in")
    expect(page.locator("#who")).to_have_count(0)
    page.close()
    assert cookie["value"] not in served.proc.log_text()


def test_the_login_page_says_how_long_to_wait_after_repeated_wrong_passwords(browser, serve_console):
    served = serve_console(console_login_max_failures=3)  # the defaults otherwise: a 15-minute lock
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(served.base + "/login")
    alert = page.locator("[role=alert]")
    for n in range(3):
        page.fill("input[name=username]", "olivia")
        page.fill("input[name=password]", f"wrong guess {n}")
        page.click("button[type=submit]")
        expect(alert).to_contain_text("Unknown user or wrong password.")
    expect(alert).to_contain_text("Too many failed logins for this user: logins are locked for")
    page.fill("input[name=username]", "olivia")
    page.fill("input[name=password]", PASSWORDS["olivia"])
    page.click("button[type=submit]")
    expect(alert).to_have_text(
        re.compile(
            r"Too many failed logins for this user: logins are locked for 1[45] min.* \(until .+ UTC\)"
        )
    )
    expect(page.locator("#who")).to_have_count(0)
    print("the lock message:", alert.inner_text())
    shot(page, "login-locked")
    page.close()
    lines = [json.loads(line) for line in served.proc.log_text().splitlines() if line.startswith("{")]
    locks = [line for line in lines if line.get("event") == "console_login_locked"]
    assert len(locks) == 1
    assert (locks[0]["user"], locks[0]["remote"], locks[0]["scope"]) == ("olivia", "127.0.0.1", "user")
    log = served.proc.log_text()
    assert "wrong guess" not in log
    assert PASSWORDS["olivia"] not in log
