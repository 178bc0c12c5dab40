"""Salesforce record Ids: the 18-character checksum, validation and generation."""

from __future__ import annotations

import random
import re
import string

CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_ID_SHAPE = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")

# Key prefixes of the objects the simulator serves.
PREFIX_ORDER = "801"
PREFIX_ORDER_ITEM = "802"
PREFIX_ACCOUNT = "001"
PREFIX_CONTACT = "003"
PREFIX_USER = "005"
PREFIX_ORG = "00D"
PREFIX_PRODUCT = "01t"
# The pod part of every generated Id (characters 4-5) and the reserved character.
POD = "Dn"


def checksum(id15: str) -> str:
    """The 3-character suffix that makes a 15-character Id case-insensitively unique."""
    suffix = ""
    for start in (0, 5, 10):
        bits = 0
        for i, char in enumerate(id15[start : start + 5]):
            if "A" <= char <= "Z":
                bits |= 1 << i
        suffix += CHECKSUM_ALPHABET[bits]
    return suffix


def to18(id15: str) -> str:
    return id15[:15] + checksum(id15[:15])


def is_valid_id(value: object) -> bool:
    """A 15-character Id, or an 18-character one whose checksum matches."""
    if not isinstance(value, str) or not _ID_SHAPE.match(value):
        return False
    return len(value) == 15 or value[15:] == checksum(value[:15])


def key15(value: str) -> str:
    """The case-sensitive part that identifies a record."""
    return value[:15]


class IdFactory:
    """Generates valid 18-character Ids, unique per simulator."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._counter = rng.randint(10_000, 90_000)

    def new(self, prefix: str) -> str:
        self._counter += self._rng.randint(1, 50)
        body = base62(self._counter, 6) + "".join(self._rng.choice(BASE62) for _ in range(3))
        return to18(f"{prefix}{POD}0{body}")

    def new15(self, prefix: str) -> str:
        return self.new(prefix)[:15]


def base62(number: int, width: int) -> str:
    digits = ""
    while number:
        number, rem = divmod(number, 62)
        digits = BASE62[rem] + digits
    return digits.rjust(width, "0")[-width:]
