"""`make audit`: pip-audit on the locked set (requirements/dev.txt and runtime.txt, hashes required).

First it asks the vulnerability service the way pip-audit will (one release known to exist), so that a
service this machine cannot reach is said in one line, naming it, instead of pip-audit's traceback
(OSV) or its silent "could not be audited" and exit 0 (PyPI answering 404). Then pip-audit runs with
``--strict`` (a dependency it could not audit fails the audit) and JSON output: a known vulnerability
with a fixed version fails; one with no fix yet is listed and does not fail. Exceptions are only the
ids in requirements/audit-ignore.txt, each with its reason (``ID  # reason``), passed as
``--ignore-vuln``.

Exit codes: 0 audited, nothing to fix; 1 a vulnerability with a fix; 2 not audited (service out of
reach, a dependency not audited, a bad ignore file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements" / "dev.txt", ROOT / "requirements" / "runtime.txt")
IGNORE_FILE = ROOT / "requirements" / "audit-ignore.txt"
# What pip-audit asks each service (pip_audit/_service/pypi.py and osv.py).
SERVICES = {
    "pypi": "https://pypi.org/pypi/{name}/{version}/json",
    "osv": "https://api.osv.dev/v1/query",
}
PROBE_TIMEOUT_S = 15.0
NOT_AUDITED = 2


def probe(service: str, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``service`` answers a question about pip-audit's own release; else why not, in words."""
    release = version("pip-audit")
    if service == "osv":
        body = json.dumps({"package": {"name": "pip-audit", "ecosystem": "PyPI"}, "version": release})
        request = urllib.request.Request(
            url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        asked = f"POST {url} (pip-audit {release})"
    else:
        url = url.format(name="pip-audit", version=release)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        asked = f"GET {url}"
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return f"{asked} answered HTTP {exc.code} {exc.reason} (for a release that exists)"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{asked} failed: {reason}"
    except ValueError:
        return f"{asked} did not answer JSON"
    return None


def ignored(path: Path = IGNORE_FILE) -> list[str]:
    """The vulnerability ids of the exceptions file; each line ``ID  # reason`` (a reason is required)."""
    ids: list[str] = []
    if not path.exists():
        return ids
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        vuln, _, reason = text.partition("#")
        if not reason.strip() or len(vuln.split()) != 1:
            raise ValueError(f"{path.name}:{number}: write 'ID  # reason' (one id, and why it is accepted)")
        ids.append(vuln.strip())
    return ids


def audit(pip_audit: str, service: str, ignore: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "audit.json"
        command = [pip_audit, "--strict", "--require-hashes", "--disable-pip", "--progress-spinner", "off"]
        command += ["--vulnerability-service", service, "--format", "json", "--output", str(report)]
        for lock in LOCKS:
            command += ["--requirement", str(lock)]
        for vuln in ignore:
            command += ["--ignore-vuln", vuln]
        done = subprocess.run(command, check=False)
        if not report.exists():
            print(f"make audit: pip-audit stopped (exit {done.returncode}) before auditing", file=sys.stderr)
            return NOT_AUDITED
        found = json.loads(report.read_text())
    code, lines = verdict(found, service)
    for line in lines:
        print(line, file=sys.stderr if code == NOT_AUDITED else sys.stdout)
    return code


def verdict(report: dict[str, Any], service: str) -> tuple[int, list[str]]:
    """The exit code and the lines to print for pip-audit's JSON report."""
    fixable: list[str] = []
    unfixed: list[str] = []
    audited = 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            return NOT_AUDITED, [f"make audit: {dep['name']} not audited: {dep['skip_reason']}"]
        audited += 1
        for vuln in dep.get("vulns", []):
            fixes = ", ".join(vuln["fix_versions"])
            line = f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes or 'no release yet'})"
            (fixable if fixes else unfixed).append(line)
    lines = [f"known, no fix yet (not failing): {line}" for line in unfixed]
    lines += [f"VULNERABLE, a fix exists: {line}" for line in fixable]
    lines.append(f"make audit: {audited} locked dependencies audited ({service}); {len(fixable)} to fix")
    return (1 if fixable else 0), lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip-audit", default=str(Path(sys.executable).with_name("pip-audit")))
    parser.add_argument("--service", choices=sorted(SERVICES), default="pypi")
    parser.add_argument("--service-url", help="where to probe the service (default: pip-audit's own)")
    args = parser.parse_args()
    try:
        ignore = ignored()
    except ValueError as exc:
        print(f"make audit: {exc}", file=sys.stderr)
        return NOT_AUDITED
    unreachable = probe(args.service, args.service_url or SERVICES[args.service])
    if unreachable is not None:
        other = "osv" if args.service == "pypi" else "pypi"
        print(
            f"make audit: NOT AUDITED: pip-audit's {args.service} vulnerability service is unreachable "
            f"from this machine: {unreachable}. Try the other service: make audit AUDIT_SERVICE={other}. "
            "See docs/operations.md, 'Dependency audit'.",
            file=sys.stderr,
        )
        return NOT_AUDITED
    return audit(args.pip_audit, args.service, ignore)


if __name__ == "__main__":
    sys.exit(main())
