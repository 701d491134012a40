"""Composing a message from a receiver channel's fields: addresses, text and/or HTML, attachments, headers.

Refuses header injection (line breaks or control characters in any value) and keeps Bcc out of the headers (it goes
into the envelope of :class:`OutgoingMail`). 7-bit transfer encodings, so that any SMTP server takes the message.
This module must not talk to a server; :mod:`postbridge.mail.smtp` sends what it builds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email import utils as email_utils
from email.message import EmailMessage

from postbridge.errors import ConfigurationError

# 7-bit transfer encodings (quoted-printable/base64) so that any server takes the message, 8BITMIME or not
MESSAGE_POLICY = email_policy.SMTP.clone(cte_type="7bit")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ':'
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_OWN_HEADERS = {"from", "to", "cc", "bcc", "subject", "mime-version", "content-type", "content-transfer-encoding",
                "content-disposition"}  # fmt: skip


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes = field(repr=False)
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class OutgoingMail:
    """A message and its envelope: ``recipients`` holds To, Cc and Bcc; the headers hold no Bcc."""

    message: EmailMessage
    sender: str
    recipients: tuple[str, ...]


def check_address(value: str, what: str, *, allow_empty: bool = False) -> str:
    """Refuse an address that is empty (unless allowed) or carries a line break; returns it unchanged."""
    if not isinstance(value, str) or (not value.strip() and not allow_empty):
        raise ConfigurationError(f"{what} {value!r} is not a mail address", hint="give e.g. 'alice@corp.example'")
    if _CONTROL.search(value):
        raise ConfigurationError(
            f"{what} {value!r} contains a line break or control character",
            hint="that is how header and command injection works: remove it",
        )
    return value


def _mailbox(value: str, what: str) -> str:
    """The addr-spec of one address (``Name <a@b>`` or ``a@b``); refuses lists and non-addresses."""
    check_address(value, what)
    found = email_utils.getaddresses([value])
    if len(found) != 1 or "@" not in found[0][1]:
        raise ConfigurationError(
            f"{what} {value!r} is not exactly one mail address",
            hint="give one address per entry, e.g. 'a@corp.example'",
        )
    return found[0][1]


def _header_value(name: str, value: str) -> str:
    if _CONTROL.search(value.replace("\t", " ")):
        raise ConfigurationError(
            f"header {name!r} has a line break or control character in its value {value!r}",
            hint="that is how header injection works: remove it (long values are folded automatically)",
        )
    return value


def build_message(
    *,
    sender: str,
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    charset: str = "utf-8",
    attachments: Sequence[Attachment] = (),
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
) -> OutgoingMail:
    """A MIME message from a receiver channel's fields, with its envelope.

    Text and HTML together become multipart/alternative; attachments make it multipart/mixed. Bcc addresses go
    into the envelope only. ``headers`` adds headers (Date and Message-ID may be overridden; From, To, Cc, Bcc,
    Subject and the MIME structure headers may not). Raises ConfigurationError for a bad address, charset,
    content type, or a line break in any header value.
    """
    envelope_sender = _mailbox(sender, "sender")
    envelope: list[str] = []
    for what, entries in (("to", to), ("cc", cc), ("bcc", bcc)):
        if isinstance(entries, str):
            raise ConfigurationError(f"{what} must be a list of addresses, not the string {entries!r}")
        envelope.extend(_mailbox(entry, what) for entry in entries)
    if not envelope:
        raise ConfigurationError("the message has no recipient", hint="give at least one of to, cc or bcc")
    extra = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    for name, value in extra:
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigurationError(f"header name {name!r} is not valid", hint="use printable ASCII without ':'")
        if name.lower() in _OWN_HEADERS:
            raise ConfigurationError(f"header {name!r} is set from its own setting", hint="use that setting instead")
        _header_value(name, value)
    message = EmailMessage(policy=MESSAGE_POLICY)
    message["From"] = sender
    if to:
        message["To"] = ", ".join(to)
    if cc:
        message["Cc"] = ", ".join(cc)
    message["Subject"] = _header_value("Subject", subject)
    names = {name.lower() for name, _ in extra}
    if "date" not in names:
        message["Date"] = email_utils.format_datetime(datetime.now(UTC))
    if "message-id" not in names:
        message["Message-ID"] = email_utils.make_msgid(domain=envelope_sender.rpartition("@")[2])
    for name, value in extra:
        message[name] = value
    try:
        if text is not None or html is None:
            message.set_content(text or "", charset=charset)
        if html is not None:
            if text is None:
                message.set_content(html, subtype="html", charset=charset)
            else:
                message.add_alternative(html, subtype="html", charset=charset)
    except LookupError:
        raise ConfigurationError(f"charset {charset!r} is unknown", hint="use e.g. 'utf-8'") from None
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"the body has characters charset {charset!r} cannot encode ({exc.object[exc.start : exc.end]!r})",
            hint="use charset 'utf-8'",
        ) from None
    for attachment in attachments:
        if not _CONTENT_TYPE.fullmatch(attachment.content_type):
            raise ConfigurationError(
                f"attachment {attachment.filename!r} has no valid content type ({attachment.content_type!r})",
                hint="use e.g. 'application/pdf'",
            )
        if not attachment.filename or _CONTROL.search(attachment.filename):
            raise ConfigurationError(f"attachment file name {attachment.filename!r} is empty or has control characters")
        maintype, subtype = attachment.content_type.lower().split("/")
        message.add_attachment(attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename)
    return OutgoingMail(message, envelope_sender, tuple(dict.fromkeys(envelope)))
