"""One line of a check's table: what was checked, OK/FAIL/WARN/SKIP, and what was found or what to fix.

Its own module so that the probes that say many lines (the Salesforce org's) and the table that
prints them share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckResult:
    name: str
    status: str  # OK, FAIL, WARN or SKIP
    detail: str
