"""The newcomer's demo: one command, every Order Activated, the counts in JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("provisioning"))


@pytest.mark.parametrize("transport", [None, "cometd"], ids=["pubsub (the default)", "cometd"])
def test_the_demo_activates_every_order_and_reports_matching_counts_in_json(tmp_path, transport):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_"))}
    extra = ["--transport", transport] if transport else []
    out = subprocess.run(
        [CLI, "demo", "--orders", "12", "--json", "--workdir", str(tmp_path / "demo"), *extra],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["transport"] == (transport or "pubsub")
    assert result["orders"] == 12
    assert result["whmcs_orders"] == result["emails"] == result["activated"] == 12
    assert result["failed"] == result["requeued"] == 2
    assert result["duplicates_published"] == 3
    assert result["second_approvals_published"] == 3
    assert 0 < result["latency_p50_s"] <= result["latency_p95_s"]
    # Every eSIM Order reached Installed (the SM-DP+'s notifications), and one Order was cancelled.
    assert result["esim_installed"] == result["esim_profiles_confirmed"] > 0
    assert result["cancelled"] == 1
    for key in ("esim_profiles_confirmed", "sf_api_calls", "elapsed_s"):
        assert key in result
