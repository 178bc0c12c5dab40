"""How the pages write things: e-mail addresses masked, times in UTC, ages and waits in words."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])([A-Za-z0-9._%+-]*)@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_emails(text: object) -> str:
    """Every e-mail address in ``text`` reduced to its first character and its domain."""
    return _EMAIL.sub(lambda m: f"{m.group(1)}•••@{m.group(3)}", "" if text is None else str(text))


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def duration(seconds: float) -> str:
    """A wait, rounded up to the second (a wait that is not over never reads "0 s"): "15 min", "1 min 5 s"."""
    left = max(1, math.ceil(seconds))
    parts = []
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
    return " ".join(parts)
