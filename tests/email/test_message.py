"""The activation e-mail: structure, QR code, Message-ID, escaping."""

from __future__ import annotations

import email.policy
import io
import re
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
import qrcode
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from provisioning.email.message import (
    MESSAGE_POLICY,
    QR_BORDER_MODULES,
    QR_BOX_PX,
    build_activation_email,
    message_id_for,
    qr_png,
)

RUN_ID = "a0RE000000IJmcNMAT:idem-1"
DOMAIN = "provisioning.local"
ACTIVATION_CODE = "LPA:1$smdp.example.com$MATCH-a0RE000000IJmcNMAT-1"
ICCID = "8988247000001234567"

# RFC 5322 msg-id without obsolete forms: "<" dot-atom-text "@" dot-atom-text ">".
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM = rf"{ATEXT}(?:\.{ATEXT})*"
MSG_ID = re.compile(rf"^<{DOT_ATOM}@{DOT_ATOM}>$")


def build(**overrides: Any) -> EmailMessage:
    args: dict[str, Any] = {
        "key": RUN_ID,
        "to_address": "Ana Lima <ana@example.com>",
        "first_name": "Ana",
        "order_number": "00000142",
        "whmcs_order_id": "981",
        "iccid": ICCID,
        "activation_code": ACTIVATION_CODE,
        "sender": "Provisioning <provisioning@example.com>",
        "message_id_domain": DOMAIN,
    }
    args.update(overrides)
    return build_activation_email(**args)


def reparsed(msg: EmailMessage) -> EmailMessage:
    """The message as a receiver sees it: serialised to bytes, parsed back."""
    parsed = BytesParser(policy=email.policy.default).parsebytes(msg.as_bytes())
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(msg: EmailMessage) -> dict[str, EmailMessage]:
    found = {}
    for part in msg.walk():
        assert isinstance(part, EmailMessage)
        found[part.get_content_type()] = part
    return found


def test_an_esim_email_is_text_and_html_alternatives_with_an_inline_png_referenced_by_cid() -> None:
    msg = reparsed(build())

    assert msg.get_content_type() == "multipart/alternative"
    [text, related] = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    [html, image] = list(related.iter_parts())
    assert html.get_content_type() == "text/html"
    assert image.get_content_type() == "image/png"
    png = image.get_content()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.get_content_disposition() == "inline"
    cid = image["Content-ID"].strip()
    assert MSG_ID.match(cid)
    assert f'src="cid:{cid[1:-1]}"' in html.get_content()


def test_the_qr_code_holds_the_activation_code() -> None:
    image = parts(reparsed(build()))["image/png"]
    picture = Image.open(io.BytesIO(image.get_content())).convert("L")

    expected = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_M, border=QR_BORDER_MODULES, mask_pattern=0
    )
    expected.add_data(ACTIVATION_CODE)
    expected.make(fit=True)
    matrix = expected.get_matrix()
    # Read the picture back module by module (the centre pixel of each box).
    assert picture.size == (len(matrix) * QR_BOX_PX,) * 2
    centre = QR_BOX_PX // 2
    read = [
        [picture.getpixel((x * QR_BOX_PX + centre, y * QR_BOX_PX + centre)) == 0 for x in range(len(matrix))]
        for y in range(len(matrix))
    ]
    assert read == matrix


def test_codes_of_one_length_reuse_the_version_found_for_the_first_and_each_holds_its_own_code() -> None:
    first, second = "LPA:1$smdp.example.com$AAAA-1111", "LPA:1$smdp.example.com$BBBB-2222"
    for code in (first, second, first):
        qr = qrcode.QRCode(
            error_correction=qrcode.constants.ERROR_CORRECT_M, border=QR_BORDER_MODULES, mask_pattern=0
        )
        qr.add_data(code)
        qr.make(fit=True)
        matrix = qr.get_matrix()
        picture = Image.open(io.BytesIO(qr_png(code))).convert("L")
        centre = QR_BOX_PX // 2
        read = [
            [
                picture.getpixel((x * QR_BOX_PX + centre, y * QR_BOX_PX + centre)) == 0
                for x in range(len(matrix))
            ]
            for y in range(len(matrix))
        ]
        assert read == matrix
    # A longer code gets a larger version, not the cached one.
    longer = first + "-" + "C" * 200
    assert Image.open(io.BytesIO(qr_png(longer))).size[0] > picture.size[0]


def test_the_text_part_gives_the_activation_code_and_the_iccid() -> None:
    text = parts(reparsed(build()))["text/plain"].get_content()

    assert ACTIVATION_CODE in text
    assert ICCID in text
    assert "00000142" in text
    assert "981" in text


def test_a_physical_sim_email_has_no_image_and_no_activation_code() -> None:
    msg = reparsed(build(activation_code=None, iccid=None))

    found = parts(msg)
    assert set(found) == {"multipart/alternative", "text/plain", "text/html"}
    assert "cid:" not in found["text/html"].get_content()
    assert "LPA:" not in found["text/plain"].get_content()
    assert "SIM card" in found["text/plain"].get_content()


def test_the_subject_names_the_order_number() -> None:
    assert reparsed(build())["Subject"] == "Your order 00000142 is active"


def test_the_html_escapes_a_hostile_first_name_and_the_text_keeps_it_verbatim() -> None:
    found = parts(reparsed(build(first_name='<script>alert("x")</script>')))

    html = found["text/html"].get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert '<script>alert("x")</script>' in found["text/plain"].get_content()


def test_a_missing_first_name_gives_a_plain_greeting() -> None:
    text = parts(reparsed(build(first_name=None)))["text/plain"].get_content()

    assert text.splitlines()[0] == "Hello,"


def test_the_email_has_no_remote_content() -> None:
    html = parts(reparsed(build()))["text/html"].get_content()

    assert "http://" not in html
    assert "https://" not in html
    assert re.findall(r'src="([^"]*)"', html) == [
        f"cid:{parts(reparsed(build()))['image/png']['Content-ID'].strip()[1:-1]}"
    ]


def test_non_ascii_text_is_sent_7bit_safe() -> None:
    raw = build(first_name="José").as_bytes()

    assert max(raw) < 128
    assert "José" in parts(reparsed(build(first_name="José")))["text/plain"].get_content()


def test_the_message_id_header_is_the_run_s_deterministic_id() -> None:
    msg = reparsed(build())

    assert msg["Message-ID"].strip() == message_id_for(RUN_ID, DOMAIN)
    assert reparsed(build())["Message-ID"].strip() == msg["Message-ID"].strip()
    assert not msg["Message-ID"].defects


def test_the_message_id_is_deterministic_and_differs_between_runs() -> None:
    assert message_id_for(RUN_ID, DOMAIN) == message_id_for(RUN_ID, DOMAIN)
    assert message_id_for(RUN_ID, DOMAIN) != message_id_for("a0RE000000IJmcNMAT:idem-2", DOMAIN)
    assert message_id_for(RUN_ID, DOMAIN) != message_id_for(RUN_ID, "other.example")


def test_the_message_id_names_the_order_and_the_domain() -> None:
    mid = message_id_for(RUN_ID, DOMAIN)

    assert mid.startswith("<a0RE000000IJmcNMAT.")
    assert mid.endswith(f"@{DOMAIN}>")
    assert MSG_ID.match(mid)


@given(idem_key=st.text(max_size=80), order_id=st.text(max_size=20))
def test_any_run_id_gives_a_valid_message_id(idem_key: str, order_id: str) -> None:
    mid = message_id_for(f"{order_id}:{idem_key}", DOMAIN)

    assert MSG_ID.match(mid), mid
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Message-ID"] = mid
    header = BytesParser(policy=email.policy.default).parsebytes(msg.as_bytes())["Message-ID"]
    assert str(header).strip() == mid
    assert not header.defects


@pytest.mark.parametrize("domain", ["", "bad domain", "a@b", "x..y", "-x.example"])
def test_a_message_id_domain_that_is_no_host_name_is_rejected(domain: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        message_id_for(RUN_ID, domain)


def test_an_esim_email_without_an_iccid_is_rejected() -> None:
    with pytest.raises(ValueError, match="ICCID"):
        build(iccid=None)


@pytest.mark.parametrize("address", ["not an address", "a@example.com, b@example.com"])
def test_a_bad_recipient_is_rejected_without_quoting_it(address: str) -> None:
    with pytest.raises(ValueError, match="to_address") as caught:
        build(to_address=address)

    assert address not in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"iccid": None, "activation_code": None},
        {"first_name": "Zoë", "order_number": "00000142  with  spaces", "sender": "Équipe <p@example.com>"},
        {"order_number": "9" * 90},
    ],
    ids=["esim", "physical", "non-ascii-and-double-spaces", "long-subject"],
)
def test_the_message_policy_writes_the_very_bytes_compat32_would(overrides: dict[str, Any]) -> None:
    msg = build(**overrides)
    ours, theirs = io.BytesIO(), io.BytesIO()
    BytesGenerator(ours, policy=MESSAGE_POLICY.clone(linesep="\r\n")).flatten(msg)
    BytesGenerator(theirs, policy=email.policy.compat32.clone(linesep="\r\n")).flatten(msg)
    assert ours.getvalue() == theirs.getvalue()


def test_the_boundaries_are_ours_and_occur_only_as_boundaries() -> None:
    msg = build()
    boundaries = [part.get_boundary() for part in msg.walk() if part.is_multipart()]
    assert len(boundaries) == 2
    assert all(b is not None and b.startswith("=_") and len(b) <= 70 for b in boundaries)
    wire = msg.as_bytes()
    for b in boundaries:
        assert b is not None
        # In its Content-Type, then as the delimiter lines (each part's, the closing one); nowhere else.
        assert wire.count(b.encode()) == wire.count(b"--" + b.encode()) + 1
    assert len(reparsed(msg).get_payload()) == 2
