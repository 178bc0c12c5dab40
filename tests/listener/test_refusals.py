"""A real listener against the sandbox's Salesforce refusing it for good: slow retries, few lines.

Issue 28: with an event the org does not have (NOT_FOUND), a missing read permission on it
(PERMISSION_DENIED) or a key the connected app does not know, the listener used to try once a
second: an ERROR line, a few INFO lines and a Subscribe or a JWT login against the org each
time (about 20 of each in this test's window). Now: one ERROR line with the remedy, a summary
line per SF_REFUSED_RETRY_MAX_S, a handful of calls, the reason on /healthz, one recovery line.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from provisioning.sandbox.scenario import wait_until

# Short, so that the window shows the steady state: waits of 0.5-1, 1-2, 2-4, then 3-6 s.
CAP_S = 6.0
# The old listener tried once a second: about 20 tries, ERROR lines and calls in this window.
WINDOW_S = 20.0
# Tries at most (the shortest waits: 0.5 + 1 + 2 + 3 + 3 ... reach 20 s after the 8th), plus one.
MOST_TRIES = 10
# Summary lines at most: one per CAP_S after the first line.
MOST_SUMMARIES = int(WINDOW_S // CAP_S) + 1
MISSING = "/event/NotDeployed__e"

CASES = {
    "not found, pubsub": ("pubsub", "not_found", "deploy the Platform Event NotDeployed__e"),
    "permission denied, pubsub": ("pubsub", "permission", "grant Read on the Platform Event"),
    "refused key, pubsub": ("pubsub", "key", "upload the certificate of SF_PRIVATE_KEY_FILE's key"),
    "not found, cometd": ("cometd", "not_found", "deploy the Platform Event NotDeployed__e"),
}
# What one try costs the org, per case: the calls counted by the sandbox.
TRY_CALLS = {
    ("pubsub", "not_found"): "pubsub_get_topic",
    ("pubsub", "permission"): "pubsub_get_topic",
    ("pubsub", "key"): "token",
    ("cometd", "not_found"): "cometd_subscribe",
}


def _lines(proc):
    return [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]


def _health(proc):
    response = requests.get(f"http://127.0.0.1:{proc.health_port}/healthz", timeout=5)
    return response.status_code, response.json()


@pytest.mark.parametrize(("transport", "case", "remedy"), list(CASES.values()), ids=list(CASES))
def test_a_refusal_is_tried_again_slowly_logged_once_then_summarized_and_named_on_healthz(
    sandbox, stack_settings, listeners, transport, case, remedy
):
    update = {"sf_events_transport": transport, "sf_refused_retry_max_s": CAP_S}
    if case == "not_found":
        update["sf_provision_event_channel"] = MISSING
    settings = stack_settings.model_copy(update=update)
    admin = sandbox.admin("salesforce")
    if case == "permission":
        admin.post("/__admin/streaming", {"pubsub_permission_denied": True})
    elif case == "key":
        admin.post("/__admin/app", {"foreign_certificate": True})
    admin.post("/__admin/calls/reset")

    listener = listeners(settings, wait=None)
    listener.wait_for_log('"listener_source_failed"', 60)
    time.sleep(WINDOW_S)
    calls = admin.get("/__admin/calls")["calls"]
    status, health = _health(listener)
    lines = _lines(listener)

    first = [line for line in lines if line["event"] == "listener_source_failed"]
    assert len(first) == 1
    assert first[0]["level"] == "error"
    assert remedy in first[0]["remedy"]
    summaries = [line for line in lines if line["event"] == "listener_source_failed_repeated"]
    assert 1 <= len(summaries) <= MOST_SUMMARIES
    assert summaries[-1]["failures"] == 1 + sum(line["since_last_line"] for line in summaries)
    # The tries: a handful, where the old listener made about twenty.
    tries = calls.get(TRY_CALLS[(transport, case)], 0)
    assert 2 <= tries <= MOST_TRIES, calls
    assert summaries[-1]["failures"] <= tries
    if transport == "pubsub" and case != "key":
        assert calls.get("pubsub_subscribe", 0) == 0  # GetTopic said so: no Subscribe spent
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == (2 if case == "key" else 1)  # the key: the login's own line, once too
    assert len(lines) <= 12 + len(summaries) * (2 if case == "key" else 1), [line["event"] for line in lines]
    assert "Traceback" not in listener.log_text()
    assert status == 503
    assert health["ok"] is False
    assert health["subscribed"] is False
    assert remedy in health["reason"]

    if case == "not_found":
        return
    # Fixed while it runs: the next try subscribes; one recovery line, /healthz says nothing more.
    if case == "permission":
        admin.post("/__admin/streaming", {"pubsub_permission_denied": False})
    else:
        admin.post("/__admin/app", {"foreign_certificate": False})
    listener.wait_for_log("listener_source_failed_recovered", CAP_S + 30)
    wait_until(lambda: _health(listener)[0] == 200, timeout_s=30)
    assert _health(listener)[1]["reason"] is None
    recovered = [line for line in _lines(listener) if line["event"] == "listener_source_failed_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["failures"] >= 2
