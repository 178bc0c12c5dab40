"""A rate as operators write it: ``10/s``, ``600/m``, ``50000/h``, parsed once.

The global rate limits of the external systems (``RATE_LIMIT_WHMCS`` and its
siblings) are written this way; the window is the unit's length, and the
limit holds in every window of that length, however it is placed (a sliding
window: see :mod:`provisioning.ledger.limits`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")


class Rate(NamedTuple):
    calls: int
    window_s: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``ValueError`` naming the expected form when ``text`` is not a rate."""
        match = _RATE.match(text)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"{text!r}: expected calls per unit, like 10/s, 600/m or 50000/h")
        return cls(int(match.group(1)), _UNITS_S[match.group(2)])

    @property
    def per_s(self) -> float:
        return self.calls / self.window_s

    def __str__(self) -> str:
        unit = next(u for u, s in _UNITS_S.items() if s == self.window_s)
        return f"{self.calls}/{unit}"
