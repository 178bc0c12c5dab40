"""Record Ids of the Salesforce simulator: the documented checksum and what counts as an Id."""

from __future__ import annotations

import random

import pytest

from provisioning.sandbox.salesforce import ids


@pytest.mark.parametrize(
    ("id15", "id18"),
    [
        ("a0RE000000IJmcN", "a0RE000000IJmcNMAT"),
        ("001M000000qfPyS", "001M000000qfPySIAU"),
        ("aBcDEfgHIJKLMNO", "aBcDEfgHIJKLMNO025"),
    ],
)
def test_the_checksum_matches_the_published_vectors(id15: str, id18: str) -> None:
    assert ids.to18(id15) == id18


def test_generated_ids_are_valid_unique_18_character_ids_with_the_prefix() -> None:
    factory = ids.IdFactory(random.Random(3))
    made = [factory.new(ids.PREFIX_ORDER) for _ in range(500)]
    assert len(set(made)) == 500
    assert all(len(i) == 18 and i.startswith("801") and ids.is_valid_id(i) for i in made)
    assert len({ids.key15(i) for i in made}) == 500


@pytest.mark.parametrize(
    "value",
    ["a0RE000000IJmcNMAX", "a0RE000000IJmc", "a0RE000000IJmcN!", "", "a0RE000000IJmcNMA", None, 801],
)
def test_malformed_ids_are_not_valid(value: object) -> None:
    assert not ids.is_valid_id(value)


def test_15_and_18_character_forms_are_valid() -> None:
    assert ids.is_valid_id("a0RE000000IJmcN")
    assert ids.is_valid_id("a0RE000000IJmcNMAT")
