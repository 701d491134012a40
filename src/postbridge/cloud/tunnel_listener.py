"""The hub's tunnel port: TLS 1.3, then by ALPN either a connector tunnel (``h2``, client certificate required) or
enrollment (``postbridge-enroll/1``: one JSON request line, one JSON answer line).

Enrollment requests::

    {"op": "ca"}                                   -> {"ca": PEM}            (no secret; the connector pins it)
    {"op": "enroll", "token": T, "csr": PEM}       -> {"certificate": PEM, "identity": {...}}
    {"op": "renew", "csr": PEM}  (with a valid client certificate) -> {"certificate": PEM, "identity": {...}}
    any failure                                    -> {"error": text, "hint": text}

TLS is started by hand (``loop.start_tls``) so that a client speaking the wrong protocol, or one that never finishes
its handshake, gets a clear line in the log and is dropped without disturbing anything else. This module must not
know about SOCKS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from postbridge.errors import PostbridgeError, TrustError
from postbridge.trust import pki

log = logging.getLogger("postbridge.hub")

ALPN_TUNNEL = "h2"
ALPN_ENROLL = "postbridge-enroll/1"
MAX_ENROLL_REQUEST = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0


def server_context(chain_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """TLS 1.3 server context; asks for a client certificate issued by the hub CA (optional: enrollment has none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(chain_path, key_path)
    context.load_verify_locations(cafile=ca_path)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols([ALPN_TUNNEL, ALPN_ENROLL])
    return context


class EnrollmentService:
    """Answers enrollment requests. ``issue`` signs a CSR for an identity; ``redeem`` checks a token."""

    def __init__(
        self,
        ca_pem: Callable[[], bytes],
        redeem: Callable[[str], tuple[str, str]],
        issue: Callable[[bytes, pki.ConnectorIdentity], bytes],
        revoked: Callable[[int], bool],
    ) -> None:
        self.ca_pem = ca_pem
        self.redeem = redeem
        self.issue = issue
        self.revoked = revoked

    def handle(self, request: dict[str, Any], peer_cert: dict[str, Any] | None, serial: int | None) -> dict[str, Any]:
        op = request.get("op")
        if op == "ca":
            return {"ca": self.ca_pem().decode()}
        csr = str(request.get("csr", "")).encode()
        if op == "enroll":
            subaccount, location = self.redeem(str(request.get("token", "")))
            identity = pki.ConnectorIdentity(subaccount, location, "c-" + secrets.token_hex(5))
        elif op == "renew":
            if not peer_cert or serial is None:
                raise TrustError(
                    "renewal needs the current connector certificate", hint="enroll again with a new token"
                )
            if self.revoked(serial):
                raise TrustError("this connector certificate was revoked", hint="enroll again with a new token")
            identity = pki.ConnectorIdentity.from_peercert(peer_cert)
        else:
            raise PostbridgeError(f"unknown enrollment request '{op}'", hint="update the connector")
        certificate = self.issue(csr, identity)
        log.info(
            "%s connector %s for subaccount %s, location %r",
            "enrolled" if op == "enroll" else "renewed certificate of",
            identity.connector_id,
            identity.subaccount,
            identity.location,
        )
        return {
            "certificate": certificate.decode(),
            "identity": {
                "subaccount": identity.subaccount,
                "location": identity.location,
                "connector_id": identity.connector_id,
            },
        }


class _Enrollment(asyncio.Protocol):
    def __init__(self, service: EnrollmentService, peer: str) -> None:
        self.service = service
        self.peer = peer
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > MAX_ENROLL_REQUEST:
                log.warning(
                    "enrollment request from %s is larger than %d bytes — dropped", self.peer, MAX_ENROLL_REQUEST
                )
                self.transport.abort()
            return
        line = bytes(self.buffer.split(b"\n", 1)[0])
        ssl_object = self.transport.get_extra_info("ssl_object")
        peer_cert = ssl_object.getpeercert() if ssl_object else None
        serial: int | None = None
        if peer_cert:
            der = ssl_object.getpeercert(binary_form=True)
            serial = pki.load_certificates(der, source="client certificate")[0].serial_number
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            answer = self.service.handle(request, peer_cert or None, serial)
        except ValueError:
            answer = {"error": "enrollment request is not JSON", "hint": "use 'postbridge connector enroll'"}
        except PostbridgeError as exc:
            log.warning("enrollment request from %s refused: %s", self.peer, exc)
            answer = {"error": exc.message, "hint": exc.hint}
        self.transport.write(json.dumps(answer).encode() + b"\n")
        self.transport.close()


class TunnelAcceptor(asyncio.Protocol):
    """First protocol of every connection to the tunnel port: does TLS, then hands over by ALPN."""

    def __init__(
        self,
        context: ssl.SSLContext,
        enrollment: EnrollmentService,
        on_tunnel: Callable[[TunnelAcceptor, asyncio.Transport, dict[str, Any], int], None],
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.context = context
        self.enrollment = enrollment
        self.on_tunnel = on_tunnel
        self.handshake_timeout = handshake_timeout
        self.peer = "?"
        self.early = bytearray()  # application data that arrived between the handshake and the hand-over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing may be read before TLS takes over
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        task = asyncio.get_running_loop().create_task(self._start_tls(transport), name=f"tls-accept {self.peer}")
        task.add_done_callback(_log_crash)

    def data_received(self, data: bytes) -> None:
        self.early += data

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def _hand_over(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.early:
            early, self.early = bytes(self.early), bytearray()
            protocol.data_received(early)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw, self, self.context, server_side=True, ssl_handshake_timeout=self.handshake_timeout
            )
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            if isinstance(exc, TimeoutError) or "taking longer" in str(exc):  # asyncio says ConnectionAbortedError
                log.warning(
                    "tunnel port: %s did not finish its TLS handshake within %g s — dropped",
                    self.peer,
                    self.handshake_timeout,
                )
            else:
                log.warning(
                    "tunnel port: TLS handshake with %s failed: %s — dropped", self.peer, _explain_tls_error(exc)
                )
            raw.abort()
            return
        if transport is None:
            return
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        if alpn == ALPN_ENROLL:
            self._hand_over(transport, _Enrollment(self.enrollment, self.peer))
            return
        if alpn != ALPN_TUNNEL:
            log.warning(
                "tunnel port: %s negotiated no known protocol (ALPN %r) — dropped; is it a postbridge connector?",
                self.peer,
                alpn,
            )
            transport.abort()
            return
        peer_cert = ssl_object.getpeercert()
        if not peer_cert:
            log.warning(
                "tunnel port: %s presented no client certificate — dropped (enroll the connector first)", self.peer
            )
            transport.abort()
            return
        serial = pki.load_certificates(ssl_object.getpeercert(binary_form=True), source="client certificate")[
            0
        ].serial_number
        self.on_tunnel(self, transport, peer_cert, serial)

    def hand_over(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        """Give the TLS connection to its real protocol (the tunnel session), replaying early data."""
        self._hand_over(transport, protocol)


def _explain_tls_error(exc: BaseException) -> str:
    text = str(exc)
    reason = getattr(exc, "reason", "") or ""
    if reason == "HTTP_REQUEST":
        return "the client spoke plain HTTP to the tunnel port (it expects TLS)"
    if reason in {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW"}:
        return f"the client does not speak TLS 1.3 ({reason}); is it a postbridge connector? ({text})"
    if "certificate" in text.lower():
        return f"client certificate rejected: {text} — enroll the connector again"
    return text or type(exc).__name__


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tunnel accept task crashed", exc_info=task.exception())
