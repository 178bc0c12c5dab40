"""The activation e-mail: text and HTML from the templates, the eSIM QR code, a deterministic Message-ID.

Structure (no remote content, no tracking)::

    multipart/alternative
    ├── text/plain
    └── multipart/related          (text/html alone for a physical SIM)
        ├── text/html              <img src="cid:...">
        └── image/png              the activation code as a QR code, inline

The Message-ID derives from the Order's effect key only (the Order id, plus the
generation after a deliberate reprovision), so a resend after a crash, or by an
operator, carries the same one and duplicates can be traced (SMTP itself has no
idempotency).
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import re
from email import charset as email_charset
from email.header import Header
from email.message import Message
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.policy import default as default_policy
from email.utils import formatdate
from importlib import resources
from string import Template
from typing import Any

import qrcode
from PIL import Image
from qrcode.constants import ERROR_CORRECT_M
from qrcode.util import QRData

# Built with email's classic (compat32) classes: the modern API's header registry cost three times
# the CPU of the rest of the e-mail step. 7bit transfer encodings only (quoted-printable text,
# base64 image): safe with servers that lack 8BITMIME.
_UTF8_QP = email_charset.Charset("utf-8")
_UTF8_QP.body_encoding = email_charset.QP
_UTF8_QP.header_encoding = email_charset.QP
SUBJECT = "Your order {order_number} is active"
# QR code geometry: pixels per module, quiet zone in modules (the standard asks for 4).
QR_BOX_PX = 6
QR_BORDER_MODULES = 4
# Shown size of the QR image in the HTML part.
QR_DISPLAY_PX = 220

_ORDER_ID = re.compile(r"^[A-Za-z0-9]{15,18}(?=$|[:#])")
_DOMAIN = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# 96 bits of the run id's hash: unique enough, and the header stays on one line.
_DIGEST_HEX_CHARS = 24
# A boundary's hash: 80 bits, and "Content-Type: multipart/alternative; boundary=..." fits one line.
_BOUNDARY_HEX_CHARS = 20


def _id_left(key: str) -> str:
    """The left part of our ids: the Order id (when the key starts with one) and a hash of the whole key.

    The key may carry arbitrary text, so only its hash goes in; the Order id
    keeps the header readable for operators.
    """
    if not key:
        raise ValueError("the key is empty")
    digest = hashlib.sha256(f"activation:{key}".encode()).hexdigest()[:_DIGEST_HEX_CHARS]
    match = _ORDER_ID.match(key)
    return f"{match.group(0)}.{digest}" if match else f"run.{digest}"


class _PlainHeadersCompat32(Compat32):
    """compat32, writing a header that needs no folding or encoding as it is.

    What compat32's folding makes of a short, single-spaced, printable ASCII value is that
    value: the same bytes, without building an ``email.header.Header`` per header (a third
    of the CPU of sending the e-mail). Anything else goes through compat32 itself.
    """

    def _as_is(self, name: str, value: object) -> str | None:
        if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            return None
        limit = self.max_line_length
        if "  " in value or value != value.strip() or (limit and len(name) + 2 + len(value) > limit):
            return None
        return f"{name}: {value}{self.linesep}"

    def fold(self, name: str, value: Any) -> str:
        plain = self._as_is(name, value)
        return plain if plain is not None else super().fold(name, value)

    def fold_binary(self, name: str, value: Any) -> bytes:
        plain = self._as_is(name, value)
        return plain.encode("ascii") if plain is not None else super().fold_binary(name, value)


# The policy of every part of the e-mail.
MESSAGE_POLICY = _PlainHeadersCompat32()


def _boundary(key: str, part: str) -> str:
    """A multipart boundary of our own (the generator otherwise draws one and compiles a regular
    expression for it per message, to check the parts do not hold it). Ours cannot occur in them:
    the bodies are quoted-printable (an "=" is always followed by hex digits or a line end) and
    base64 (no "_"), and the headers hold no "=_". Short enough that its Content-Type needs no
    folding."""
    digest = hashlib.sha256(f"boundary:{part}:{key}".encode()).hexdigest()[:_BOUNDARY_HEX_CHARS]
    return f"=_{digest}_="


def _check_domain(domain: str) -> str:
    if not _DOMAIN.match(domain):
        raise ValueError("message id domain must be a host name such as provisioning.example.com")
    return domain


def message_id_for(key: str, domain: str) -> str:
    """The activation e-mail's Message-ID for ``key``: ``<{order id}.{hash}@{domain}>``."""
    return f"<{_id_left(key)}@{_check_domain(domain)}>"


def _qr_content_id(key: str, domain: str) -> str:
    return f"qr.{_id_left(key)}@{_check_domain(domain)}"


# The smallest QR version that holds data of one encoding mode and length (the same for every such
# data): found once, by qrcode's own fit, which otherwise encodes the data twice per code (a third of
# its CPU). Activation codes of one deployment come in one or two lengths.
_QR_VERSIONS: dict[tuple[int, int], int] = {}


def qr_png(data: str) -> bytes:
    """``data`` as a QR code, in PNG."""
    chunk = QRData(data)
    key = (chunk.mode, len(chunk))
    version = _QR_VERSIONS.get(key)
    # A fixed mask: choosing the best of eight costs two thirds of the QR code's CPU, and any mask scans.
    qr = qrcode.QRCode(
        version=version, error_correction=ERROR_CORRECT_M, border=QR_BORDER_MODULES, mask_pattern=0
    )
    qr.add_data(chunk)
    qr.make(fit=version is None)
    if version is None:
        _QR_VERSIONS[key] = int(qr.version)
    matrix = qr.get_matrix()  # modules, quiet zone included; True is dark
    size = len(matrix)
    # One pixel per module, then scaled: drawing each box (qrcode's own image) costs twice as much.
    modules = Image.new("1", (size, size), 1)
    modules.putdata([0 if dark else 1 for row in matrix for dark in row])
    picture = modules.resize((size * QR_BOX_PX, size * QR_BOX_PX), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _template(name: str) -> Template:
    text = resources.files("provisioning.email").joinpath("templates", name).read_text(encoding="utf-8")
    return Template(text)


def _header(value: str) -> str:
    """A header value as is when it is ASCII, else RFC 2047-encoded (7bit on the wire)."""
    return value if value.isascii() else Header(value, _UTF8_QP).encode()


def _render(
    name: str, values: dict[str, str], *, as_html: bool, sections: dict[str, str] | None = None
) -> str:
    """Fill template ``name``; in HTML every value is escaped, ``sections`` (already rendered) are not."""
    if as_html:
        values = {k: html.escape(v, quote=True) for k, v in values.items()}
    return _template(name).substitute({**values, **(sections or {})})


def build_activation_email(
    *,
    key: str,
    to_address: str,
    first_name: str | None,
    order_number: str,
    whmcs_order_id: str,
    iccid: str | None,
    activation_code: str | None,
    sender: str,
    message_id_domain: str,
) -> Message:
    """The e-mail telling the customer the order is active.

    With an ``activation_code`` it is the eSIM e-mail (code in the text, QR code
    inline in the HTML; ``iccid`` required); without, the physical SIM one.
    """
    esim = activation_code is not None
    if esim and not iccid:
        raise ValueError("an eSIM e-mail needs the ICCID")
    values = {
        "greeting_name": f" {first_name.strip()}" if first_name and first_name.strip() else "",
        "order_number": order_number,
        "whmcs_order_id": whmcs_order_id,
        "iccid": iccid or "",
        "activation_code": activation_code or "",
        "qr_cid": _qr_content_id(key, message_id_domain),
        "qr_size": str(QR_DISPLAY_PX),
    }
    section = "esim" if esim else "physical"
    text = _render(
        "activation.txt",
        values,
        as_html=False,
        sections={"sim_section": _render(f"{section}.txt", values, as_html=False)},
    )
    body_html = _render(
        "activation.html",
        values,
        as_html=True,
        sections={"sim_section": _render(f"{section}.html", values, as_html=True)},
    )

    # The address itself stays out of any error: it is personal data.
    parsed_to = default_policy.header_factory("To", to_address)
    if len(parsed_to.addresses) != 1 or parsed_to.defects or not parsed_to.addresses[0].domain:
        raise ValueError("to_address must be exactly one valid e-mail address")
    msg = MIMEMultipart("alternative", boundary=_boundary(key, "alternative"), policy=MESSAGE_POLICY)
    msg["Message-ID"] = message_id_for(key, message_id_domain)
    msg["Date"] = formatdate(usegmt=True)
    msg["From"] = _header(sender)
    msg["To"] = _header(str(parsed_to))
    msg["Subject"] = _header(SUBJECT.format(order_number=order_number))
    # typeshed says str, but MIMEText takes a Charset (how the body gets quoted-printable).
    msg.attach(MIMEText(text, "plain", _UTF8_QP, policy=MESSAGE_POLICY))  # type: ignore[arg-type]
    html_part = MIMEText(body_html, "html", _UTF8_QP, policy=MESSAGE_POLICY)  # type: ignore[arg-type]
    if esim:
        assert activation_code is not None
        related = MIMEMultipart("related", boundary=_boundary(key, "related"), policy=MESSAGE_POLICY)
        related.attach(html_part)
        image = MIMEImage(qr_png(activation_code), "png", policy=MESSAGE_POLICY)
        image["Content-ID"] = f"<{values['qr_cid']}>"
        image["Content-Disposition"] = "inline"
        related.attach(image)
        msg.attach(related)
    else:
        msg.attach(html_part)
    return msg
