"""ICCIDs: validation and the canonical form every part of the project stores.

An ICCID (ITU-T E.118, layout from ISO/IEC 7812) starts with the telecom
industry identifier ``89`` and ends with a Luhn check digit computed over every
digit before it. E.118 allows 19 digits (18 + check digit); older cards carry 20
(19 + check digit). A 19-digit ICCID is often padded to 20 characters with an
``F`` (pySim does this), so the canonical form drops that pad: digits only,
19 or 20 of them.
"""

from __future__ import annotations

ICCID_PREFIX = "89"
ICCID_LENGTHS = (19, 20)
_PAD = "F"


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits``."""
    total = 0
    # Doubling starts from the rightmost digit, since the check digit will follow it.
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2 == 0:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return str((10 - total % 10) % 10)


def normalize_iccid(value: str) -> str:
    """The canonical ICCID of ``value``; ``ValueError`` says what is wrong with it."""
    text = value.strip()
    if len(text) == max(ICCID_LENGTHS) and text[-1].upper() == _PAD:
        text = text[:-1]
    if not text:
        raise ValueError("empty")
    if not (text.isascii() and text.isdigit()):
        raise ValueError("not all digits (an ICCID is 19 or 20 digits, the 20th may be an F pad)")
    if len(text) not in ICCID_LENGTHS:
        raise ValueError(f"{len(text)} digits; an ICCID has 19 or 20")
    if not text.startswith(ICCID_PREFIX):
        raise ValueError(f"does not start with {ICCID_PREFIX}")
    expected = luhn_check_digit(text[:-1])
    if text[-1] != expected:
        raise ValueError(f"check digit is {text[-1]}, the Luhn check digit is {expected}")
    return text


def is_valid_iccid(value: str) -> bool:
    try:
        normalize_iccid(value)
    except ValueError:
        return False
    return True


def make_iccid(body: str) -> str:
    """``body`` (18 or 19 digits, starting 89) with its Luhn check digit appended."""
    return body + luhn_check_digit(body)
