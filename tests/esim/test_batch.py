"""A vendor's profile batch file read into canonical ICCIDs, every bad line reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.core.errors import PermanentError
from provisioning.core.iccid import make_iccid
from provisioning.esim.batch import parse_batch
from provisioning.esim.errors import InventoryFileError

pytestmark = pytest.mark.fast


def iccids(count: int, start: int = 0) -> list[str]:
    return [make_iccid(f"898829911{n:09d}") for n in range(start, start + count)]


A, B, C = iccids(3)
# Luhn-wrong: the last digit of a valid one, changed.
BAD_CHECK = A[:-1] + str((int(A[-1]) + 1) % 10)


def test_a_plain_batch_skips_blank_lines_and_comments_and_drops_the_f_pad() -> None:
    text = f"# batch 2024-07 from the vendor\n{A}\n\n  {B}F  \n# end\n{C}\n"
    assert parse_batch(text) == [A, B, C]


def test_malformed_lines_are_all_reported_with_their_line_numbers() -> None:
    text = f"{A}\n# comment\n{BAD_CHECK}\n12345\n{B}\n8988-2991\n{A}\n"
    with pytest.raises(InventoryFileError) as failed:
        parse_batch(text)
    problems = failed.value.problems
    assert [(p.line, p.value) for p in problems] == [(3, BAD_CHECK), (4, "12345"), (6, "8988-2991"), (7, A)]
    assert "Luhn" in problems[0].reason
    assert "digits" in problems[1].reason
    assert "duplicate of line 1" in problems[3].reason
    message = str(failed.value)
    assert "4 malformed line(s); nothing loaded" in message
    assert f"line 3: '{BAD_CHECK}'" in message
    assert isinstance(failed.value, PermanentError)


def test_a_vendor_csv_is_read_from_its_iccid_column_whatever_the_case() -> None:
    text = f"Imsi;Iccid;Profile\n# a comment\n001010000000001;{A};gold\n\n001010000000002;{B};gold\n"
    assert parse_batch(text) == [A, B]


def test_a_csv_row_without_an_iccid_is_reported_with_its_line_number() -> None:
    text = f"ICCID,IMSI\n{A},001010000000001\n,001010000000002\n{BAD_CHECK},001010000000003\n"
    with pytest.raises(InventoryFileError) as failed:
        parse_batch(text)
    assert [(p.line, p.value) for p in failed.value.problems] == [(3, ""), (4, BAD_CHECK)]


def test_a_batch_is_read_from_a_path_and_its_name_is_in_the_error(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(f"\ufeffICCID,PIN\n{A},1234\n{B},5678\n", encoding="utf-8")
    assert parse_batch(good) == [A, B]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{A}\nnot an iccid\n")
    with pytest.raises(InventoryFileError, match=r"bad\.txt"):
        parse_batch(bad)


def test_an_empty_batch_has_no_iccids() -> None:
    assert parse_batch("# nothing yet\n\n") == []


# -- load, claim, use, release -----------------------------------------------------------------


def test_a_csv_without_an_iccid_column_is_refused_with_a_hint() -> None:
    with pytest.raises(InventoryFileError) as failed:
        parse_batch(f"serial,imsi\n{A},001010000000001\n")
    assert [p.line for p in failed.value.problems] == [1, 2]
    assert "header line with an ICCID column" in failed.value.problems[1].reason


def test_the_message_of_a_very_bad_file_lists_the_first_lines_only() -> None:
    with pytest.raises(InventoryFileError) as failed:
        parse_batch("x\n" * 80)
    assert len(failed.value.problems) == 80
    assert "... and 30 more" in str(failed.value)
    assert "line 51:" not in str(failed.value)


def test_a_file_that_is_not_utf8_is_a_file_error_naming_the_line(tmp_path: Path) -> None:
    batch = tmp_path / "latin1.csv"
    batch.write_bytes(f"ICCID,Name\n{A},ok\n{B},Caf\xe9\n".encode("latin-1"))
    with pytest.raises(InventoryFileError) as failed:
        parse_batch(batch)
    assert [(p.line, p.reason) for p in failed.value.problems] == [(3, "not UTF-8 text")]
