"""A mail message as a JSON object, for the ``http`` target's ``format = "json"`` and the directory metadata.

:func:`message_json` parses the RFC 5322 bytes with the standard :mod:`email` package (``policy.default``: headers
decoded from RFC 2047, file names from RFC 2231) into::

    {"from": "Alice <alice@corp.example>",           the From header, decoded ("" when missing)
     "to": ["Bob <bob@corp.example>"], "cc": [...],  one string per address
     "subject": "...", "date": "2024-05-01T10:00:00+02:00" (ISO 8601; the raw text when unparseable),
     "message_id": "<...>",
     "text": "..." | null, "html": "..." | null,     the bodies offered as text/plain and text/html (lines end in LF)
     "attachments": [{"filename": "a.pdf" | null, "content_type": "application/pdf", "size": 1234,
                      "content_base64": "..."}],     every other leaf part, decoded (byte-exact), inline ones too
     "headers": [{"name": "Received", "value": "..."}, ...],   all of them, in order, repeated ones repeated
     "postbridge": {"flow", "key", "idempotency_key", "mailbox", "uid", "received_at", "attempt"}}

A forwarded message (``message/rfc822``) is one attachment holding its bytes. Must not: do I/O or log.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from typing import Any

from postbridge.runtime.targets import Delivery


def parse(raw: bytes, *, headers_only: bool = False) -> EmailMessage:
    """The message as an EmailMessage (``policy.default``); never raises for malformed input."""
    message = BytesParser(policy=policy.default).parsebytes(raw, headersonly=headers_only)
    assert isinstance(message, EmailMessage)  # what policy.default makes
    return message


def header_text(message: Message, name: str) -> str:
    """The decoded header, "" when missing or so broken that the email package cannot read it."""
    try:
        value = message.get(name)
        return "" if value is None else str(value)
    except Exception:  # the header parser has bugs on hostile input; a missing value is the honest answer
        return ""


def _addresses(message: EmailMessage, name: str) -> list[str]:
    try:
        header = message.get(name)
        if header is None:
            return []
        return [str(address) for address in getattr(header, "addresses", ())]
    except Exception:
        return [header_text(message, name)]


def _date(message: EmailMessage) -> str:
    try:
        header = message.get("date")
        moment = getattr(header, "datetime", None)
        if moment is not None:
            return str(moment.isoformat())
    except Exception:
        pass
    return header_text(message, "date")


def _text(part: MIMEPart | None) -> str | None:
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown or lying charset
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return str(content).replace("\r\n", "\n")


def _headers(message: EmailMessage) -> list[dict[str, str]]:
    headers = []
    for name, raw in message.raw_items():
        try:
            value = str(message.policy.header_fetch_parse(name, raw))
        except Exception:  # see header_text
            value = str(raw)
        headers.append({"name": name, "value": value})
    return headers


def _leaves(part: MIMEPart) -> Iterator[MIMEPart]:
    if part.get_content_maintype() == "multipart":
        for sub in part.iter_parts():
            yield from _leaves(sub)
    else:
        yield part


def _content(part: MIMEPart) -> bytes:
    if part.is_multipart():  # message/rfc822 and friends: the enclosed message itself
        inner = part.get_payload(0)
        return inner.as_bytes() if isinstance(inner, Message) else b""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def message_json(delivery: Delivery) -> dict[str, Any]:
    """The delivery's message as the JSON object above. May raise on input the email package cannot handle."""
    message = parse(delivery.raw)
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    bodies = [part for part in (text_part, html_part) if part is not None]
    attachments = []
    for part in _leaves(message):
        if any(part is body for body in bodies):
            continue
        content = _content(part)
        attachments.append(
            {
                "filename": part.get_filename(),
                "content_type": part.get_content_type(),
                "size": len(content),
                "content_base64": base64.b64encode(content).decode("ascii"),
            }
        )
    return {
        "from": header_text(message, "from"),
        "to": _addresses(message, "to"),
        "cc": _addresses(message, "cc"),
        "subject": header_text(message, "subject"),
        "date": _date(message),
        "message_id": header_text(message, "message-id"),
        "text": _text(text_part),
        "html": _text(html_part),
        "attachments": attachments,
        "headers": _headers(message),
        "postbridge": {
            "flow": delivery.flow,
            "key": delivery.key,
            "idempotency_key": delivery.idempotency_key,
            "mailbox": delivery.mailbox,
            "uid": delivery.uid,
            "received_at": delivery.received_at,
            "attempt": delivery.attempt,
        },
    }
