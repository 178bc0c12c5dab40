from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from provisioning.core.errors import PermanentError
from provisioning.salesforce.errors import InvalidSalesforceId
from provisioning.salesforce.ids import CHECKSUM_ALPHABET, id_checksum, is_valid_id, normalize_id

pytestmark = pytest.mark.fast

ID_CHARS = string.ascii_letters + string.digits
id15 = st.text(alphabet=ID_CHARS, min_size=15, max_size=15)


@pytest.mark.parametrize(
    ("short", "full"),
    [
        ("a0RE000000IJmcN", "a0RE000000IJmcNMAT"),
        ("001M000000qfPyS", "001M000000qfPySIAU"),
        ("aBcDEfgHIJKLMNO", "aBcDEfgHIJKLMNO025"),
    ],
)
def test_known_ids_get_their_published_checksum(short: str, full: str) -> None:
    assert normalize_id(short) == full
    assert normalize_id(full) == full


@given(id15)
def test_a_15_character_id_becomes_18_characters_that_start_with_it(text: str) -> None:
    full = normalize_id(text)
    assert len(full) == 18
    assert full[:15] == text
    assert all(c in CHECKSUM_ALPHABET for c in full[15:])


@given(id15)
def test_normalizing_is_idempotent(text: str) -> None:
    full = normalize_id(text)
    assert normalize_id(full) == full


@given(id15)
def test_the_checksum_suffix_may_come_in_lower_case(text: str) -> None:
    full = normalize_id(text)
    assert normalize_id(full[:15] + full[15:].lower()) == full


@given(id15, st.integers(min_value=0, max_value=14))
def test_changing_the_case_of_one_letter_breaks_the_checksum(text: str, position: int) -> None:
    assume(text[position].isalpha())
    full = normalize_id(text)
    flipped = full[:position] + full[position].swapcase() + full[position + 1 :]
    with pytest.raises(InvalidSalesforceId, match="checksum"):
        normalize_id(flipped)


@given(id15)
def test_each_checksum_character_encodes_the_upper_case_letters_of_its_chunk(text: str) -> None:
    suffix = id_checksum(text)
    for chunk in range(3):
        bits = CHECKSUM_ALPHABET.index(suffix[chunk])
        for i in range(5):
            assert bool(bits & (1 << i)) == text[chunk * 5 + i].isupper()


@given(st.text(alphabet=ID_CHARS, max_size=30).filter(lambda t: len(t) not in (15, 18)))
def test_any_other_length_is_rejected_naming_the_length(text: str) -> None:
    with pytest.raises(InvalidSalesforceId, match=f"{len(text)} characters, expected 15 or 18"):
        normalize_id(text)


@given(id15, st.integers(min_value=0, max_value=14), st.characters(blacklist_characters=ID_CHARS))
def test_a_character_outside_a_z_and_digits_is_rejected(text: str, position: int, bad: str) -> None:
    broken = text[:position] + bad + text[position + 1 :]
    assume(len(broken) == 15)
    with pytest.raises(InvalidSalesforceId, match="only the letters"):
        normalize_id(broken)


def test_a_wrong_checksum_is_rejected_with_the_expected_one() -> None:
    with pytest.raises(InvalidSalesforceId, match="expected 'MAT'"):
        normalize_id("a0RE000000IJmcNAAA")


def test_an_invalid_id_is_a_value_error_and_a_permanent_error() -> None:
    with pytest.raises(InvalidSalesforceId) as caught:
        normalize_id("not-an-id")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PermanentError)


def test_a_non_text_id_is_rejected() -> None:
    assert not is_valid_id(12345)
    with pytest.raises(InvalidSalesforceId, match="must be text"):
        normalize_id(None)  # type: ignore[arg-type]


def test_a_huge_input_is_not_quoted_whole_in_the_message() -> None:
    with pytest.raises(InvalidSalesforceId) as caught:
        normalize_id("x" * 10_000)
    assert len(str(caught.value)) < 200


def test_is_valid_id_tells_valid_from_invalid() -> None:
    assert is_valid_id("a0RE000000IJmcN")
    assert is_valid_id("a0RE000000IJmcNMAT")
    assert not is_valid_id("a0RE000000IJmcNMAX")
