"""Salesforce record Ids: 15 case-sensitive characters, or 18 with a case checksum.

The 3-character suffix encodes which of the first 15 characters are upper case:
for each 5-character chunk, bit *i* is set when character *i* is A-Z, and the
5-bit value indexes ``ABCDEFGHIJKLMNOPQRSTUVWXYZ012345``.
"""

from __future__ import annotations

import re

from provisioning.salesforce.errors import InvalidSalesforceId

CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")
# How much of a bad value an error message quotes (Ids are not secret, but inputs may be anything).
_QUOTE_MAX = 40


def id_checksum(id15: str) -> str:
    """The 3-character checksum of a 15-character Id (not validated: see :func:`normalize_id`)."""
    suffix = []
    for start in (0, 5, 10):
        bits = 0
        for i, char in enumerate(id15[start : start + 5]):
            if "A" <= char <= "Z":
                bits |= 1 << i
        suffix.append(CHECKSUM_ALPHABET[bits])
    return "".join(suffix)


def normalize_id(text: str) -> str:
    """The 18-character form of a 15- or 18-character Id; InvalidSalesforceId if it is not one.

    The first 15 characters are case-sensitive and kept as given; an 18-character
    Id's checksum must match them (its own letters may be in either case).
    """
    if not isinstance(text, str):
        raise InvalidSalesforceId(f"a Salesforce Id must be text, not {type(text).__name__}")
    shown = text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "..."
    if len(text) not in (15, 18):
        raise InvalidSalesforceId(
            f"invalid Salesforce Id {shown!r}: {len(text)} characters, expected 15 or 18"
        )
    if not text.isascii() or not _ID_CHARS.fullmatch(text):
        raise InvalidSalesforceId(
            f"invalid Salesforce Id {shown!r}: only the letters A-Z, a-z and the digits 0-9 are allowed"
        )
    expected = id_checksum(text[:15])
    if len(text) == 18 and text[15:].upper() != expected:
        raise InvalidSalesforceId(
            f"invalid Salesforce Id {shown!r}: checksum {text[15:]!r} does not match "
            f"the first 15 characters (expected {expected!r}; was the Id's case changed?)"
        )
    return text[:15] + expected


def is_valid_id(text: object) -> bool:
    """Whether ``text`` is a valid 15- or 18-character Id."""
    try:
        normalize_id(text)  # type: ignore[arg-type]
    except InvalidSalesforceId:
        return False
    return True
