"""The replay id, parsed once: each transport's own form in and out, never the other's."""

from __future__ import annotations

import pytest

from provisioning.core.replay_id import (
    EARLIEST,
    LATEST,
    ReplayId,
    Transport,
    describe_start,
    parse_preset,
    parse_start,
)


def test_a_cometd_id_is_shown_as_its_integer_not_the_hex_of_its_digits() -> None:
    replay_id = ReplayId.cometd(8230)
    assert replay_id.value == b"8230"
    assert str(replay_id) == "8230"
    assert replay_id.number == 8230


def test_a_pubsub_id_is_shown_as_the_hex_of_its_bytes() -> None:
    replay_id = ReplayId(Transport.PUBSUB, bytes.fromhex("00000000000018af"))
    assert str(replay_id) == "00000000000018af"
    with pytest.raises(ValueError, match="no number"):
        _ = replay_id.number


@pytest.mark.parametrize(
    "replay_id",
    [ReplayId.cometd(8230), ReplayId.cometd(0), ReplayId(Transport.PUBSUB, b"\x00\x00\x18\xaf\xff")],
)
def test_what_is_shown_parses_back_to_the_same_id(replay_id: ReplayId) -> None:
    assert ReplayId.parse(str(replay_id), replay_id.transport) == replay_id
    assert parse_start(describe_start(replay_id), replay_id.transport) == replay_id


@pytest.mark.parametrize(
    ("text", "transport", "value"),
    [
        ("8230", "cometd", b"8230"),
        (" 0042 ", "cometd", b"42"),
        ("00000000000018AF", "pubsub", bytes.fromhex("00000000000018af")),
        ("0x00ff", "pubsub", b"\x00\xff"),
        ("8230", "pubsub", b"\x82\x30"),
    ],
)
def test_an_operator_types_each_transport_s_own_form(text: str, transport: str, value: bytes) -> None:
    parsed = ReplayId.parse(text, transport)
    assert parsed.transport == transport
    assert parsed.value == value


@pytest.mark.parametrize(
    ("text", "transport", "message"),
    [
        ("00ff", "cometd", "a CometD replay id is an integer"),
        ("-5", "cometd", "a CometD replay id is an integer"),
        ("123", "pubsub", "even number of hex digits"),
        ("xyz0", "pubsub", "hex of its bytes"),
        ("", "pubsub", "hex of its bytes"),
    ],
)
def test_a_form_the_transport_does_not_use_is_refused_naming_the_one_it_does(
    text: str, transport: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReplayId.parse(text, transport)


@pytest.mark.parametrize(
    ("text", "preset"), [("LATEST", LATEST), ("latest", LATEST), ("-1", LATEST), ("-2", EARLIEST)]
)
def test_the_presets_read_the_same_on_both_transports(text: str, preset: object) -> None:
    assert parse_start(text, "pubsub") is preset
    assert parse_start(text, "cometd") is preset
    assert describe_start(parse_start(text, "cometd")) == getattr(preset, "value", None)


def test_a_stored_checkpoint_reads_back_as_its_transport_s_id_and_the_other_s_bytes_are_refused() -> None:
    assert ReplayId.from_stored(b"8230", "cometd") == ReplayId.cometd(8230)
    assert ReplayId.from_stored(b"\x00\x18", "pubsub").value == b"\x00\x18"
    with pytest.raises(ValueError, match="Pub/Sub replay id cannot start a CometD subscription"):
        ReplayId.from_stored(bytes.fromhex("00000000000018af"), "cometd")


def test_ids_of_two_transports_are_never_equal_even_with_the_same_bytes() -> None:
    assert ReplayId(Transport.PUBSUB, b"8230") != ReplayId.cometd(8230)


def test_the_fallback_preset_is_latest_or_earliest_only() -> None:
    assert parse_preset(" earliest ") is EARLIEST
    with pytest.raises(ValueError, match="LATEST or EARLIEST"):
        parse_preset("42")
