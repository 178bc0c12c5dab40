"""CPU that the Salesforce REST client spends per call: ``fetch_order`` + ``update_order`` pairs.

The simulator runs on a thread of this process (HTTPS, the sandbox's CA) and the client on the
main thread; only the main thread's CPU time (``time.thread_time``) is counted, so the server's
work stays out of the figure. Each repeat makes ``--pairs`` pairs of calls on one Order over a
kept-alive connection, after a warm-up (the login and the first connection are not counted)::

    .venv/bin/python -m bench.salesforce_client_cpu                 # 3 x 1000 pairs
    .venv/bin/python -m bench.salesforce_client_cpu --pairs 200 --repeat 5 --json out.json

It prints the client's CPU per call and per pair (one run reads its Order once and writes it
at least once), the median of the repeats and their spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Table, emit, log, machine_info, run_main
from provisioning.core.http import make_session
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.client import SalesforceClient
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.salesforce import SalesforceSimulator

DEFAULT_PAIRS = 1000
DEFAULT_REPEAT = 3
WARMUP_PAIRS = 50
ADMIN_TIMEOUT_S = 10.0


def measure(client: SalesforceClient, order_id: str, pairs: int) -> dict[str, float]:
    """CPU (this thread) and wall time of ``pairs`` fetch + update pairs."""
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for n in range(pairs):
        client.fetch_order(order_id)
        client.update_order(order_id, {"WHMCS_Order_ID__c": str(n)})
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return {
        "cpu_ms_per_call": cpu * 1000 / (2 * pairs),
        "cpu_ms_per_pair": cpu * 1000 / pairs,
        "wall_ms_per_pair": wall * 1000 / pairs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="fetch + update pairs per repeat")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="repeats (the median is shown)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sf-cpu-") as tmp:
        workdir = Path(tmp)
        tls = SandboxTLS.create(workdir)
        sim = SalesforceSimulator(workdir, seed=1)
        server = ServerThread(ssl_context=tls.server_context)
        server.add_app("salesforce", sim.build_app())
        server.start()
        try:
            url = server.url("salesforce")
            env = sim.env(url)
            settings = Settings(
                _env_file=None,
                tls_ca_bundle=tls.ca_bundle,
                sf_login_url=env["SF_LOGIN_URL"],
                sf_client_id=env["SF_CLIENT_ID"],
                sf_username=env["SF_USERNAME"],
                sf_private_key_file=Path(env["SF_PRIVATE_KEY_FILE"]),
                sf_api_version=env["SF_API_VERSION"],
            )
            admin = make_session(tls.ca_bundle)
            seeded = admin.post(url + "/__admin/orders", json={}, timeout=ADMIN_TIMEOUT_S)
            seeded.raise_for_status()
            order_id = str(seeded.json()["ids"][0])
            client = SalesforceClient.from_settings(settings, auth=JWTBearerAuth.from_settings(settings))
            measure(client, order_id, WARMUP_PAIRS)
            runs = []
            for n in range(args.repeat):
                runs.append(measure(client, order_id, args.pairs))
                log(f"repeat {n + 1}: {runs[-1]['cpu_ms_per_call']:.3f} ms CPU per call")
        finally:
            server.stop()
    per_call = [r["cpu_ms_per_call"] for r in runs]
    table = Table(
        f"Salesforce REST client CPU, {args.pairs} x (fetch_order + update_order), median of {len(runs)}",
        ["client CPU ms/call", "spread", "client CPU ms/pair", "wall ms/pair"],
    )
    table.add(
        f"{statistics.median(per_call):.3f}",
        f"{min(per_call):.3f}-{max(per_call):.3f}",
        f"{statistics.median(r['cpu_ms_per_pair'] for r in runs):.3f}",
        f"{statistics.median(r['wall_ms_per_pair'] for r in runs):.2f}",
    )
    data: dict[str, Any] = {"pairs": args.pairs, "repeats": runs}
    emit("salesforce_client_cpu", args, machine_info(), [table], data)
    return 0


if __name__ == "__main__":
    run_main(main)
