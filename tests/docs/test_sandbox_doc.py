"""docs/sandbox.md against the code: its examples run as written, and every name it gives exists.

The examples run against a sandbox started as the page says (``provisioning sandbox`` in a
directory, default workdir and env file), each in its own process with
``PROVISIONING_ENV_FILE=sandbox.env``, exactly as a reader would paste them.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from click.testing import CliRunner

from provisioning.cli import main
from provisioning.core.http import make_session
from provisioning.core.settings import ENV_FILE_VARIABLE, Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.pubsub import PubSubClient
from provisioning.sandbox import smdp, smtp, whmcs
from provisioning.sandbox.cli import sandbox as sandbox_command
from provisioning.sandbox.common import FAULT_KINDS, FaultInjector, Faults, new_app
from provisioning.sandbox.salesforce import SalesforceSimulator
from provisioning.sandbox.salesforce.cometd import CometD
from provisioning.sandbox.salesforce.org import KNOB_NAMES
from provisioning.sandbox.salesforce.pubsub import PubSub

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "sandbox.md"
# Starting the sandbox takes well under a second here; a shared CI machine gets more.
SANDBOX_READY_TIMEOUT_S = 60.0
# Each example makes a handful of local calls; this only guards against a hang.
EXAMPLE_TIMEOUT_S = 120.0
ADMIN_TIMEOUT_S = 10.0
HTTP_METHODS = "GET|POST|PATCH|DELETE|PUT"
# Flags of other tools the page uses (curl in the shell example).
OTHER_TOOLS_FLAGS = {"--cacert"}


def doc_text() -> str:
    return DOC.read_text()


def fenced_block_untitled(language: str, after: str) -> str:
    """The first ```language block after the text ``after``."""
    text = doc_text()
    found = re.search(rf"^```{language}\n(.*?)^```$", text[text.index(after) :], re.S | re.M)
    assert found, f"no ```{language} block after {after!r} in {DOC}"
    return str(found[1])


def fenced_block(language: str, title: str) -> str:
    blocks = re.findall(rf'^```{language} title="{re.escape(title)}"\n(.*?)^```$', doc_text(), re.S | re.M)
    assert len(blocks) == 1, f'expected one ```{language} title="{title}" block in {DOC}'
    return str(blocks[0])


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a full heading line) up to the next heading of the same level or above."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2 :]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: stop.start()] if stop else rest


def table_first_column(text: str, header: str) -> list[str]:
    """Backticked names in the first column of the table whose header row is ``header``."""
    start = text.index(header)
    names: list[str] = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


# -- the examples, against a sandbox started as documented -------------------------------------


@dataclass
class RunningSandbox:
    directory: Path
    env_file: dict[str, str]
    admin: requests.Session

    def url(self, variable: str, path: str) -> str:
        return self.env_file[variable].rstrip("/") + path

    def get(self, variable: str, path: str) -> Any:
        response = self.admin.get(self.url(variable, path), timeout=ADMIN_TIMEOUT_S)
        response.raise_for_status()
        return response.json()


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@pytest.fixture(scope="module")
def running_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    directory = tmp_path_factory.mktemp("doc-sandbox")
    exe = Path(sys.executable).with_name("provisioning")
    log_path = directory / "sandbox.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(exe), "sandbox", "--long-poll", "5"],
            cwd=directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SANDBOX_READY_TIMEOUT_S
        while "env file" not in log_path.read_text():
            assert proc.poll() is None, f"provisioning sandbox exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"provisioning sandbox not ready:\n{log_path.read_text()}"
            time.sleep(0.05)
        env_file = read_env_file(directory / "sandbox.env")
        admin = make_session(directory / env_file["TLS_CA_BUNDLE"])
        yield RunningSandbox(directory, env_file, admin)
        admin.close()
    finally:
        # Ctrl-C or SIGTERM stops it, as the page says.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0
    assert "sandbox stopped" in log_path.read_text()


def test_the_sandbox_writes_its_files_where_the_page_says(running_sandbox: RunningSandbox) -> None:
    workdir = running_sandbox.directory / ".sandbox"
    assert {p.name for p in workdir.iterdir()} >= {"sandbox-ca.pem", "sf-jwt-key.pem", "sf-jwt-cert.pem"}
    assert running_sandbox.env_file["TLS_CA_BUNDLE"] == ".sandbox/sandbox-ca.pem"
    assert running_sandbox.env_file["SF_PRIVATE_KEY_FILE"] == ".sandbox/sf-jwt-key.pem"
    assert oct((workdir / "sf-jwt-key.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("transport", ["pubsub", "cometd"])
def test_the_publish_and_receive_example_runs_as_written(
    running_sandbox: RunningSandbox, transport: str
) -> None:
    script = running_sandbox.directory / "publish.py"
    script.write_text(fenced_block("python", "publish-and-receive"))
    published_before = running_sandbox.get("SF_LOGIN_URL", "/__admin/calls")["calls"].get("event_publish", 0)
    env = {**os.environ, ENV_FILE_VARIABLE: "sandbox.env"}
    if transport == "cometd":
        env["SF_EVENTS_TRANSPORT"] = "cometd"  # as the page says: in front of the command
    else:
        env.pop("SF_EVENTS_TRANSPORT", None)  # the default

    result = subprocess.run(
        [sys.executable, script.name],
        cwd=running_sandbox.directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(
        r"published (e00xx\w+); received over (\w+): replay id ([0-9a-f]+) for Order (801\w{15})",
        result.stdout,
    )
    assert found, result.stdout
    assert found[2] == transport
    printed, order_id = found[3], found[4]
    # Printed as --replay-from takes it: Pub/Sub the hex of the sandbox's 8 bytes big-endian (its own
    # encoding: a client must never rely on it), CometD the integer itself.
    replay_id = int.from_bytes(bytes.fromhex(printed), "big") if transport == "pubsub" else int(printed)
    calls = running_sandbox.get("SF_LOGIN_URL", "/__admin/calls")["calls"]
    assert calls["event_publish"] == published_before + 1
    events = running_sandbox.get("SF_LOGIN_URL", "/__admin/events")["events"]
    mine = [e for e in events if e["data"]["event"]["replayId"] == replay_id]
    assert [e["data"]["payload"]["OrderId__c"] for e in mine] == [order_id]
    assert running_sandbox.get("SF_LOGIN_URL", f"/__admin/orders/{order_id}")["SIM_Type__c"] == "eSIM"
    stats = running_sandbox.get("SF_LOGIN_URL", "/__admin/stats")
    delivered = stats["pubsub"]["events_delivered"] if transport == "pubsub" else stats["events_delivered"]
    assert delivered >= 1


def test_the_admin_curl_example_runs_as_written(running_sandbox: RunningSandbox) -> None:
    assert shutil.which("curl"), "the shell example needs curl"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", fenced_block("bash", "admin-curl")],
        cwd=running_sandbox.directory,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    orders = running_sandbox.get("SF_LOGIN_URL", "/__admin/orders")["orders"]
    assert any(o["BillToContact"] and o["BillToContact"]["Email"] == "ann@example.com" for o in orders)
    clients = running_sandbox.get("WHMCS_URL", "/__admin/clients")["clients"]
    assert [(c["id"], [pm["type"] for pm in c["paymethods"]]) for c in clients] == [(1, ["CreditCard"])]
    assert running_sandbox.get("WHMCS_URL", "/__admin/faults")["error_rate"] == 0.2
    assert running_sandbox.get("SMDP_URL", "/__admin/faults")["force"] == {"confirmOrder": ["ambiguous"]}
    assert running_sandbox.get("SMDP_URL", "/__admin/profiles/summary")["available"] == 10
    assert '"calls"' in result.stdout
    assert '"handshakes"' in result.stdout


def test_the_env_file_table_lists_exactly_what_the_sandbox_writes(running_sandbox: RunningSandbox) -> None:
    documented = table_first_column(doc_text(), "| variable | value |")
    assert sorted(documented) == sorted(running_sandbox.env_file)


def test_the_printed_addresses_are_the_ones_the_page_shows(running_sandbox: RunningSandbox) -> None:
    printed = (running_sandbox.directory / "sandbox.log").read_text()
    shown = fenced_block_untitled("text", after="It prints one URL per simulator")
    names = [line.split()[0] for line in shown.splitlines() if line and not line.startswith("env file")]
    assert names == [
        line.split()[0] for line in printed.splitlines() if re.match(r"^\w+ +\S+://|^\w+ +\d", line)
    ]
    endpoint = running_sandbox.env_file["SF_PUBSUB_ENDPOINT"]
    assert f"salesforce_pubsub {endpoint}" in re.sub(r" +", " ", printed)


def test_the_pubsub_endpoint_in_the_env_file_answers_grpc_over_tls(
    running_sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(running_sandbox.directory)  # the file's paths are relative to it
    settings = Settings(_env_file="sandbox.env")  # type: ignore[call-arg]
    client = PubSubClient(
        auth=JWTBearerAuth.from_settings(settings),
        endpoint=running_sandbox.env_file["SF_PUBSUB_ENDPOINT"],
        topic=settings.sf_provision_event_channel,
        ca_bundle=settings.tls_ca_bundle,
    )
    try:
        info = client.topic_info()
    finally:
        client.close()
    assert (info.topic_name, info.can_subscribe) == (settings.sf_provision_event_channel, True)


# -- names the page gives ------------------------------------------------------------------------


def _route_set(app: web.Application) -> set[str]:
    return {
        f"{route.method} {_placeholders(route.resource.canonical)}"
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical.startswith("/__admin")
    }


def _placeholders(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def _documented_routes(text: str) -> set[str]:
    return {
        f"{method} {_placeholders(path)}"
        for method, path in re.findall(rf"\b({HTTP_METHODS}) (/__admin/[A-Za-z0-9_/{{}}.-]*)", text)
    }


def test_every_admin_route_is_documented_under_its_simulator_and_nothing_else_is(tmp_path: Path) -> None:
    common = _route_set(new_app(FaultInjector().admin_routes()))
    apps = {
        "Salesforce": SalesforceSimulator(tmp_path).build_app(),
        "WHMCS": whmcs.WhmcsSimulator().build_app(),
        "SM-DP+": smdp.SmdpSimulator().build_app(),
        "SMTP": smtp.SmtpSimulator().build_admin_app(),
    }
    reference = section(doc_text(), "## Admin API reference")

    assert _documented_routes(section(reference, "### Common to every simulator")) == common
    for heading, app in apps.items():
        routes = _route_set(app)
        assert routes >= common, heading
        assert _documented_routes(section(reference, f"### {heading}")) == routes - common, heading
    every_route = set().union(*(_route_set(app) for app in apps.values()))
    assert _documented_routes(doc_text()) <= every_route


def test_every_option_of_provisioning_sandbox_is_documented_and_every_flag_named_exists() -> None:
    options = {opt for param in sandbox_command.params for opt in param.opts}
    documented = set(table_first_column(doc_text(), "| option | default | meaning |"))
    documented = {name.split(" ")[0] for name in documented}

    assert documented == options | {"-h", "--help"}
    for flag in ("-h", "--help"):
        assert CliRunner().invoke(main, ["sandbox", flag]).exit_code == 0
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", doc_text()))
    assert named <= options | {"--help"} | OTHER_TOOLS_FLAGS


def test_every_command_the_page_names_exists() -> None:
    text = doc_text()
    commands = set(re.findall(r"\bprovisioning ([a-z][a-z-]*)", text))
    assert commands, "the page names no command"
    assert commands <= set(main.commands)
    targets = set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", text, re.M))
    makefile_targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert targets
    assert targets <= makefile_targets


def test_every_upper_case_name_is_a_setting_or_a_string_our_code_uses() -> None:
    """Environment variables must be settings; error codes and the like must be in the source."""
    settings_env = {name.upper() for name in Settings.model_fields} | {ENV_FILE_VARIABLE}
    upper_snake = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
    in_source = {
        name
        for path in (ROOT / "provisioning").rglob("*.py")
        for name in upper_snake.findall(path.read_text())
    }
    names = set(upper_snake.findall(doc_text()))
    assert names
    assert sorted(names - settings_env - in_source) == []


def test_every_fault_setting_and_operation_is_documented() -> None:
    text = doc_text()
    faults = section(text, "## Fault injection")
    assert set(table_first_column(faults, "| field | default | meaning |")) == {
        f.name for f in fields(Faults)
    }
    for kind in FAULT_KINDS:
        assert f"`{kind}`" in faults
    rows = {line.split("|")[1].strip(): line for line in faults.splitlines() if line.startswith("| ")}

    def operations(row: str) -> set[str]:
        return set(re.findall(r"`([A-Za-z_]+)`", rows[row].split("|")[2]))

    assert operations("WHMCS") == set(whmcs.ACTIONS.values())
    assert operations("SM-DP+") == set(smdp.FUNCTIONS)
    assert operations("SMTP") == {smtp.DATA_OPERATION}
    sf_source = "\n".join(
        (ROOT / "provisioning" / "sandbox" / "salesforce" / name).read_text()
        for name in ("simulator.py", "cometd.py", "pubsub.py")
    )
    for name in operations("Salesforce"):
        assert f'"{name}"' in sf_source or f'"{name.removeprefix("cometd_")}"' in sf_source, name


def test_every_streaming_knob_is_documented_and_nothing_else() -> None:
    faults = section(doc_text(), "## Fault injection")
    start = faults.index("| knob | effect |")
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), faults[start:].splitlines()[2:]))
    knobs = {re.findall(r"`([a-z_]+)", row.split("|")[1])[0] for row in rows}
    assert knobs == set(CometD.KNOBS | PubSub.KNOBS)


def test_every_org_knob_is_documented_and_nothing_else() -> None:
    faults = section(doc_text(), "## Fault injection")
    start = faults.index("| org knob | effect |")
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), faults[start:].splitlines()[2:]))
    assert {re.findall(r"`([a-z_]+)`", row.split("|")[1])[0] for row in rows} == set(KNOB_NAMES)
