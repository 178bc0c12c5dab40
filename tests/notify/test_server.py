"""The ES2+ notification endpoint: a real HTTPS server (mutual TLS), the SM-DP+ simulator calling it.

Real Redis, the real simulators, the endpoint in this process on a free port; the SM-DP+ simulator
sends handleDownloadProgressInfo after a release, or on request (duplicates, out-of-order arrivals).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from provisioning.core.iccid import make_iccid
from provisioning.core.run_id import RunId
from provisioning.esim.notifications import PATH
from provisioning.ledger.esim_status import EsimState
from provisioning.notify.server import NotifyServer
from provisioning.runs.chain import CHAIN
from provisioning.runs.lifecycle import run_step
from provisioning.runs.services import Services
from provisioning.salesforce.ids import id_checksum
from provisioning.sandbox.scenario import seed_orders, wait_until

HEADERS = {"X-Admin-Protocol": "gsma/rsp/v2.5.0", "Content-Type": "application/json"}
BURST = 500
BURST_THREADS = 16


@pytest.fixture
def endpoint(stack_settings, services) -> Iterator[NotifyServer]:
    server = NotifyServer(stack_settings, services, port=0).start()
    yield server
    server.stop()


@pytest.fixture
def smdp_calls_us(sandbox, endpoint):
    """Point the SM-DP+ simulator at the endpoint, with its client certificate (mutual TLS)."""

    def configure(outcome: str = "installed", delay_ms: int = 0) -> None:
        sandbox.admin("smdp").post(
            "/__admin/notify",
            {
                "url": f"https://127.0.0.1:{endpoint.port}{PATH}",
                "outcome": outcome,
                "delay_ms": delay_ms,
                "ca_file": str(sandbox.tls.ca_bundle),
                "cert_file": str(sandbox.tls.client_cert_file),
                "key_file": str(sandbox.tls.client_key_file),
            },
        )

    return configure


def _client(sandbox) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sandbox.tls.ca_bundle)
    session.cert = (str(sandbox.tls.client_cert_file), str(sandbox.tls.client_key_file))
    return session


def _body(
    iccid: str, point: int, timestamp: str, status: str = "Executed-Success", requester: str = "smdp-sandbox"
):
    return {
        "header": {
            "functionRequesterIdentifier": requester,
            "functionCallIdentifier": f"FCI-{point}-{timestamp}",
        },
        "iccid": iccid,
        "profileType": "default",
        "timestamp": timestamp,
        "notificationPointId": point,
        "notificationPointStatus": {"status": status},
    }


def _released(services: Services, iccid: str, order_id: str) -> None:
    pipe = services.redis.pipeline()
    services.ledger.esim_status.queue_released(pipe, iccid, order_id, order_id)
    pipe.execute()


def _counters(services: Services) -> dict[str, float]:
    pipe = services.redis.pipeline()
    services.ledger.metrics.read_commands(pipe)
    counters = services.ledger.metrics.parse(pipe.execute()).counter("esim_notifications")
    return {dict(labels)["outcome"]: value for labels, value in counters.items()}


def test_a_provisioned_esim_goes_released_downloaded_installed_and_the_order_shows_it(
    sandbox, services, endpoint, smdp_calls_us
):
    smdp_calls_us("installed")
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=5)
    run_id = RunId.parse(order.run_id)
    for name in CHAIN.names[:4]:
        run_step(services, run_id, CHAIN[name])
    iccid = services.ledger.orders.provisioning(order.order_id).step("activate_esim").result["iccid"]
    sf = sandbox.admin("salesforce")
    wait_until(lambda: sf.get(f"/__admin/orders/{order.order_id}").get("ESIM_Status__c") == "Installed", 60)
    status = services.ledger.esim_status.get(iccid)
    assert status.state is EsimState.INSTALLED
    assert [point for point, _, _ in status.notifications] == [3, 4]
    sent = sandbox.admin("smdp").get("/__admin/notify")["sent"]
    assert [(n["iccid"], n["point"], n["http_status"]) for n in sent] == [(iccid, 3, 204), (iccid, 4, 204)]
    assert sandbox.admin("smdp").get(f"/__admin/profiles/{iccid}")["state"] == "installed"
    # Written once: off the queue (right after the PATCH that the Order shows).
    wait_until(lambda: services.ledger.esim_status.writebacks() == [], 30)
    patches = sandbox.admin("salesforce").get("/__admin/calls")["calls"].get("order_patch")
    assert patches <= 3  # Activated (Released), then one per change at most: Downloaded, Installed


def test_a_download_that_failed_on_the_device_is_an_error_with_its_reason_on_the_order(
    sandbox, services, endpoint, smdp_calls_us
):
    smdp_calls_us("download_failed")
    (order,) = seed_orders(sandbox, services.inventory, count=1, esim_share=1.0, seed=6)
    run_id = RunId.parse(order.run_id)
    for name in CHAIN.names[:4]:
        run_step(services, run_id, CHAIN[name])
    iccid = services.ledger.orders.provisioning(order.order_id).step("activate_esim").result["iccid"]
    sf = sandbox.admin("salesforce")
    wait_until(lambda: sf.get(f"/__admin/orders/{order.order_id}").get("ESIM_Status__c") == "Error", 60)
    status = services.ledger.esim_status.get(iccid)
    assert status.reason == "download failed (8.2.6/3.8): download failed on the device"


def test_duplicates_and_out_of_order_arrivals_end_in_the_newest_state_each_recorded_once(
    sandbox, services, endpoint, smdp_calls_us
):
    smdp_calls_us("never")
    iccid = make_iccid("898829900000000010")
    _released(services, iccid, "801Dn0000HeJ6rrIQC")
    smdp = sandbox.admin("smdp")
    for point, ts in ((4, "2026-12-05T10:00:05Z"), (3, "2026-12-05T10:00:00Z"), (4, "2026-12-05T10:00:05Z")):
        assert (
            smdp.post("/__admin/notify/send", {"iccid": iccid, "point": point, "timestamp": ts})[
                "http_status"
            ]
            == 204
        )
    # The same instant in another zone's notation is the same notification.
    same = smdp.post(
        "/__admin/notify/send", {"iccid": iccid, "point": 3, "timestamp": "2026-12-05T12:00:00+02:00"}
    )
    assert same["http_status"] == 204
    status = services.ledger.esim_status.get(iccid)
    assert status.state is EsimState.INSTALLED
    assert len(status.notifications) == 2
    assert _counters(services) == {"changed": 1, "recorded": 1, "duplicate": 2}


def test_unknown_iccids_malformed_bodies_and_other_requesters_are_answered_and_counted(
    sandbox, services, endpoint
):
    url = f"https://127.0.0.1:{endpoint.port}{PATH}"
    client = _client(sandbox)
    unknown = make_iccid("898829900000000020")
    for _ in range(2):
        answer = client.post(url, json=_body(unknown, 3, "2026-12-05T10:00:00Z"), headers=HEADERS)
        assert (answer.status_code, answer.content) == (204, b"")
    malformed = client.post(url, data=b"{not json", headers=HEADERS)
    assert malformed.status_code == 200
    assert malformed.json()["header"]["functionExecutionStatus"]["statusCodeData"]["reasonCode"] == "2.1"
    missing = client.post(url, json={"header": {"functionRequesterIdentifier": "x"}}, headers=HEADERS)
    assert missing.json()["header"]["functionExecutionStatus"]["statusCodeData"]["message"] == (
        "header.functionCallIdentifier is required"
    )
    other = client.post(
        url, json=_body(unknown, 3, "2026-12-05T10:00:00Z", requester="someone"), headers=HEADERS
    )
    assert other.status_code == 403
    assert _counters(services) == {"unknown": 2, "malformed": 2, "refused": 1}
    assert client.get(f"https://127.0.0.1:{endpoint.port}/healthz").json() == {"ok": True}


def test_a_client_without_a_certificate_of_the_smdps_ca_gets_no_answer(sandbox, endpoint):
    plain = requests.Session()
    plain.trust_env = False
    plain.verify = str(sandbox.tls.ca_bundle)
    with pytest.raises(requests.exceptions.RequestException):
        plain.post(f"https://127.0.0.1:{endpoint.port}{PATH}", data=b"{}", headers=HEADERS, timeout=10)


def test_a_burst_of_500_notifications_is_answered_and_every_one_recorded_once(sandbox, services, endpoint):
    """125 profiles x 4 notification points = 500 distinct notifications, each sent twice, 16 at a time."""
    profiles = [make_iccid(f"89882990{n:010d}") for n in range(BURST // 4)]
    for n, iccid in enumerate(profiles):
        order15 = f"801Dn0000H{n:05d}"
        _released(services, iccid, order15 + id_checksum(order15))
    bodies = [
        json.dumps(_body(iccid, point, f"2026-12-05T10:00:0{point}Z")).encode()
        for iccid in profiles
        for point in (1, 2, 3, 4)
    ]
    url = f"https://127.0.0.1:{endpoint.port}{PATH}"
    local = threading.local()

    def post(body: bytes) -> int:
        if not hasattr(local, "session"):
            local.session = _client(sandbox)
        return int(local.session.post(url, data=body, headers=HEADERS, timeout=30).status_code)

    started = time.monotonic()
    with ThreadPoolExecutor(BURST_THREADS) as pool:
        answers = list(pool.map(post, bodies + bodies))
    elapsed = time.monotonic() - started
    print(
        f"\n{len(answers)} notifications ({BURST} distinct) answered in {elapsed:.2f} s, {len(answers) / elapsed:.0f}/s"
    )
    assert answers == [204] * (2 * BURST)
    counted = _counters(services)
    assert counted["changed"] + counted["recorded"] == BURST
    assert counted["duplicate"] == BURST
    statuses = services.ledger.esim_status.get_many(profiles)
    assert {s.state for s in statuses} == {EsimState.INSTALLED}
    assert {len(s.notifications) for s in statuses} == {4}
    assert services.ledger.esim_status.counts()["installed"] == len(profiles)
