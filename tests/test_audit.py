"""`make audit` (.ci/audit.py): a service out of reach is said in one line; the verdict on pip-audit's report.

No internet here: the service is a local HTTP server that answers 404 (as pypi.org does from this
machine for every /pypi/<name>/<version>/json), or a port nobody listens on.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "audit.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering_404() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi/{{name}}/{{version}}/json"
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_pypi_service_answering_404_is_named_with_its_url_and_the_audit_exits_2_without_a_traceback(
    answering_404,
):
    done = _run("--service", "pypi", "--service-url", answering_404)
    assert done.returncode == 2
    assert "NOT AUDITED: pip-audit's pypi vulnerability service is unreachable" in done.stderr
    assert "/pypi/pip-audit/" in done.stderr
    assert "HTTP 404" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_an_osv_service_nobody_answers_is_named_and_the_audit_exits_2_without_a_traceback():
    done = _run("--service", "osv", "--service-url", f"http://127.0.0.1:{_closed_port()}/v1/query")
    assert done.returncode == 2
    assert "pip-audit's osv vulnerability service is unreachable" in done.stderr
    assert "Connection refused" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_vulnerability_with_a_fixed_release_fails_and_one_without_a_fix_is_only_listed():
    audit = _script()
    report = {
        "dependencies": [
            {"name": "flask", "version": "3.1.0", "vulns": [{"id": "GHSA-x", "fix_versions": ["3.1.1"]}]},
            {"name": "six", "version": "1.17.0", "vulns": [{"id": "PYSEC-y", "fix_versions": []}]},
            {"name": "vine", "version": "5.1.0", "vulns": []},
        ],
        "fixes": [],
    }
    code, lines = audit.verdict(report, "pypi")
    assert code == 1
    assert "VULNERABLE, a fix exists: flask 3.1.0: GHSA-x (fixed in: 3.1.1)" in lines
    assert "known, no fix yet (not failing): six 1.17.0: PYSEC-y (fixed in: no release yet)" in lines
    assert lines[-1] == "make audit: 3 locked dependencies audited (pypi); 1 to fix"
    report["dependencies"] = report["dependencies"][1:]
    assert audit.verdict(report, "pypi")[0] == 0


def test_a_dependency_pip_audit_could_not_audit_fails_the_audit_instead_of_passing_silently():
    audit = _script()
    report = {"dependencies": [{"name": "amqp", "skip_reason": "Dependency not found on PyPI"}]}
    code, lines = audit.verdict(report, "pypi")
    assert code == 2
    assert lines == ["make audit: amqp not audited: Dependency not found on PyPI"]


def test_an_accepted_vulnerability_needs_its_reason_in_the_exceptions_file(tmp_path):
    audit = _script()
    good = tmp_path / "ok.txt"
    good.write_text("# comment\n\nGHSA-aaaa-bbbb-cccc  # no fix released; the code never calls it\n")
    assert audit.ignored(good) == ["GHSA-aaaa-bbbb-cccc"]
    bad = tmp_path / "bad.txt"
    bad.write_text("GHSA-aaaa-bbbb-cccc\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: write 'ID  # reason'"):
        audit.ignored(bad)
    assert audit.ignored(audit.IGNORE_FILE) == []
