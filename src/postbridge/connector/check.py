"""Availability check of one mapping: can the connector reach the internal mail server, and what does it say?

Owns :func:`check_mapping` (used by ``postbridge connector check VHOST:VPORT`` and the tunnel's
``POST /v1/check``) and its :class:`CheckResult`. It opens the backend exactly as a tunneled connection would
(:func:`postbridge.connector.dialer.open_backend`, so TLS is verified against the backend trust store), reads
the server's first line with a bounded buffer, recognises SMTP / IMAP / POP3 greetings, says goodbye politely
and closes.

Must not: send anything but the protocol's goodbye (``a LOGOUT`` / ``QUIT``) — never credentials, never a
command that changes state — or raise for a failed check (a failure is a result, not an exception).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postbridge.connector.dialer import BackendError, open_backend
from postbridge.connector.mappings import Mapping, Protocol

GREETING_LIMIT = 4096  # bytes read at most while waiting for the first line
GREETING_SHOWN = 200  # characters of the greeting kept in the result
CLOSE_GRACE = 0.5  # seconds to let the server close after our goodbye, then again after our close

_IMPLICIT_TLS_PORTS = {993: "IMAPS", 995: "POP3S", 465: "SMTPS"}
_SMTP = re.compile(r"^(220|421|554)(?:[ -]|$)")
_GOODBYE = {"IMAP": b"a LOGOUT\r\n", "POP3": b"QUIT\r\n", "SMTP": b"QUIT\r\n"}


@dataclass(frozen=True)
class CheckResult:
    """What one availability check found. ``summary()`` is the line to show; ``hint`` the next step, if any.

    ``reason`` is the :class:`BackendError` reason when the connection could not be opened, else ``None``.
    """

    mapping: Mapping
    reachable: bool
    protocol_seen: str | None
    greeting: str
    elapsed_ms: float
    tls_version: str | None
    error: str | None
    reason: str | None
    hint: str = ""
    greeting_timeout: float = 2.0

    def summary(self) -> str:
        """One line: ``reachable (IMAP greeting from mail.corp:143, 4 ms)`` or ``not reachable: ...``."""
        if not self.reachable:
            return f"not reachable: {self.error}"
        where = str(self.mapping.internal)
        tls = f"{_tls_label(self.tls_version)}, " if self.tls_version else ""
        took = f"{self.elapsed_ms:.0f} ms"
        if self.protocol_seen:
            return f"reachable ({tls}{self.protocol_seen} greeting from {where}, {took})"
        if self.greeting:
            return f"reachable ({tls}unknown greeting '{self.greeting}' from {where}, {took})"
        return (
            f"reachable ({tls}no greeting within {self.greeting_timeout:g} s from {where}: "
            "the server waits for the client to speak)"
        )

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object (for the tunnel's ``POST /v1/check`` and ``--json`` output)."""
        return {
            "virtual": str(self.mapping.virtual),
            "internal": str(self.mapping.internal),
            "protocol": self.mapping.protocol.value,
            "reachable": self.reachable,
            "protocol_seen": self.protocol_seen,
            "greeting": self.greeting,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "tls_version": self.tls_version,
            "error": self.error,
            "reason": self.reason,
            "hint": self.hint,
            "summary": self.summary(),
        }


class _GreetingReader(asyncio.Protocol):
    """Collects the first line (at most GREETING_LIMIT bytes) and notices when the server closes."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._buffer = bytearray()
        self.line: asyncio.Future[bytes | None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.line_at: float | None = None

    def data_received(self, data: bytes) -> None:
        if self.line.done():
            return  # after the greeting only the goodbye's answer comes; it is not needed
        self._buffer += data[: GREETING_LIMIT - len(self._buffer)]
        end = self._buffer.find(b"\n")
        if end >= 0:
            self._finish(bytes(self._buffer[:end]))
        elif len(self._buffer) >= GREETING_LIMIT:
            self._finish(bytes(self._buffer))

    def eof_received(self) -> bool | None:
        self._finish(bytes(self._buffer) if self._buffer else None)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(bytes(self._buffer) if self._buffer else None)
        if not self.closed.done():
            self.closed.set_result(None)

    def _finish(self, line: bytes | None) -> None:
        if not self.line.done():
            self.line_at = self._loop.time() if line is not None else None
            self.line.set_result(line)


async def check_mapping(
    mapping: Mapping,
    *,
    tls_context: Callable[[], ssl.SSLContext],
    timeout: float = 5.0,
    greeting_timeout: float = 2.0,
) -> CheckResult:
    """Open the backend of ``mapping``, read its greeting and tell what was found.

    Never raises for an unreachable or unhappy server: the :class:`CheckResult` says what went wrong.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    readers: list[_GreetingReader] = []

    def factory() -> asyncio.Protocol:
        readers.append(_GreetingReader())
        return readers[-1]

    def result(**changes: Any) -> CheckResult:
        unreachable = CheckResult(
            mapping=mapping,
            reachable=False,
            protocol_seen=None,
            greeting="",
            elapsed_ms=(loop.time() - started) * 1000,
            tls_version=None,
            error=None,
            reason=None,
            greeting_timeout=greeting_timeout,
        )
        return dataclasses.replace(unreachable, **changes)

    try:
        transport, _protocol = await open_backend(mapping, factory, tls_context=tls_context, timeout=timeout)
    except BackendError as exc:
        return result(error=exc.message, reason=exc.reason, hint=exc.hint)
    reader = readers[-1]
    ssl_object = transport.get_extra_info("ssl_object")
    tls_version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    connected_ms = (loop.time() - started) * 1000
    try:
        await asyncio.wait([reader.line], timeout=greeting_timeout)
        if not reader.line.done():
            return result(reachable=True, elapsed_ms=connected_ms, tls_version=tls_version, hint=_silent_hint(mapping))
        raw = reader.line.result()
        if raw is None:
            return result(
                elapsed_ms=connected_ms,
                tls_version=tls_version,
                error=f"{mapping.internal} accepted the connection and closed it without a greeting",
                hint="the mail server may refuse this client address or be overloaded; check its log",
            )
        elapsed_ms = ((reader.line_at or loop.time()) - started) * 1000
        greeting = clean_greeting(raw)
        protocol_seen, refused = classify_greeting(greeting)
        if protocol_seen is not None and not refused:
            transport.write(_GOODBYE[protocol_seen])
            await asyncio.wait([reader.closed], timeout=CLOSE_GRACE)
        common = {"protocol_seen": protocol_seen, "greeting": greeting, "elapsed_ms": elapsed_ms}
        if refused:
            return result(
                **common,
                tls_version=tls_version,
                error=f"the {protocol_seen} server at {mapping.internal} refuses the connection: '{greeting}'",
                hint="the mail server answered but will not serve this client now; check its log and limits",
            )
        return result(**common, reachable=True, tls_version=tls_version)
    finally:
        await _close(transport, reader)


def clean_greeting(raw: bytes) -> str:
    """Decode a greeting line for display: control and format characters removed, at most 200 characters."""
    spaced = raw.decode("utf-8", errors="replace").replace("\t", " ")
    text = "".join(char for char in spaced if unicodedata.category(char) not in ("Cc", "Cf"))
    return text.strip()[:GREETING_SHOWN]


def classify_greeting(greeting: str) -> tuple[str | None, bool]:
    """Return ``(protocol, refused)`` for a greeting line: ``("IMAP", True)`` for ``* BYE ...``, etc."""
    upper = greeting.upper()
    if upper.startswith(("* OK", "* PREAUTH")):
        return "IMAP", False
    if upper.startswith("* BYE"):
        return "IMAP", True
    if upper.startswith("+OK"):
        return "POP3", False
    if upper.startswith("-ERR"):
        return "POP3", True
    match = _SMTP.match(greeting)
    if match:
        return "SMTP", match.group(1) != "220"
    return None, False


async def _close(transport: asyncio.Transport, reader: _GreetingReader) -> None:
    if not reader.closed.done():
        transport.close()
        await asyncio.wait([reader.closed], timeout=CLOSE_GRACE)
    if not reader.closed.done():
        transport.abort()  # e.g. a TLS peer that never answers our close_notify
        await asyncio.wait([reader.closed], timeout=CLOSE_GRACE)


def _silent_hint(mapping: Mapping) -> str:
    name = _IMPLICIT_TLS_PORTS.get(mapping.internal.port)
    if name and mapping.protocol is Protocol.TCP:
        return (
            f"port {mapping.internal.port} usually speaks {name} (implicit TLS): use protocol 'tcp-tls' for "
            "this mapping, or let the client do TLS itself"
        )
    return ""


def _tls_label(version: str) -> str:
    return version.replace("TLSv", "TLS ") if version.startswith("TLSv") else version
