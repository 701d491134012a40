"""The hub's SOCKS5 listener: one :class:`SocksConnection` per cloud client, driving the sans-I/O server.

Per client: SOCKS5 handshake (bounded by a handshake timeout), authentication and routing through a
:class:`SocksGate` (the hub), opening a tunnel stream, answering with the reply code that says what happened, and
then bridging bytes (it *is* a :class:`StreamBridge` once connected). The internal server's greeting is written only
after the success reply, in order, so it is never lost. Every refusal is logged with its cause and the fix.

This module must not know how credentials are stored or how connectors are chosen; the gate decides.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, SocksProtocolError, StreamRefused
from postbridge.socks.server import (
    ConnectRequested,
    Event,
    JwtAuthRequested,
    PasswordAuthRequested,
    PayloadReceived,
    Reply,
    Socks5Server,
)
from postbridge.tunnel.bridge import StreamBridge
from postbridge.tunnel.protocol import socks_reply_for
from postbridge.tunnel.session import TunnelSession

log = logging.getLogger("postbridge.socks")

HANDSHAKE_TIMEOUT = 10.0
OPEN_TIMEOUT = 30.0


@dataclass(frozen=True)
class Principal:
    """Who a SOCKS client is: its subaccount and the location ID it asked for ("" = default location)."""

    subaccount: str
    location: str


class SocksGate(Protocol):
    """What the listener needs from the hub."""

    def authenticate_password(self, username: str, password: str) -> Principal: ...
    def authenticate_jwt(self, token: str, location: str) -> Principal: ...
    def route(self, principal: Principal, target: HostPort) -> TunnelSession: ...  # raises StreamRefused


class SocksConnection(StreamBridge):
    """One SOCKS5 client of the hub."""

    def __init__(
        self, gate: SocksGate, *, handshake_timeout: float = HANDSHAKE_TIMEOUT, open_timeout: float = OPEN_TIMEOUT
    ) -> None:
        super().__init__()
        self.gate = gate
        self.socks = Socks5Server()
        self.principal: Principal | None = None
        self.auth_error: AuthenticationError | None = None
        self.target: HostPort | None = None
        self.trace_id = ""
        self.client = "?"
        self._open_timeout = open_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._handshake_timeout = handshake_timeout

    # -- handshake ----------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self._timed_out, "handshake")

    def data_received(self, data: bytes) -> None:
        if self.started:
            super().data_received(data)
            return
        try:
            events = self.socks.receive_data(data)
            while events:
                for event in events:
                    self._handle(event)
                events = self.socks.receive_data(b"") if self.socks.state.name != "CONNECT_PENDING" else []
        except SocksProtocolError as exc:
            log.warning("SOCKS5 client %s dropped: %s", self.client, exc)
            self._flush_socks()
            self._close()
            return
        self._flush_socks()
        if self.socks.closed and not self._finished:
            if self.socks.close_reason:
                log.warning("SOCKS5 client %s refused: %s", self.client, self.socks.close_reason)
            self._close()

    def eof_received(self) -> bool:
        if self.started:
            return super().eof_received()
        if self.session is not None:  # the client gave up while the connector was still connecting
            self._local_eof = True
            return True
        log.info("SOCKS5 client %s closed during the handshake", self.client)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self.started and self.session is not None and not self._finished:
            self.finish(reset=True)  # the stream was being opened: do not leak it
            return
        super().connection_lost(exc)

    def _handle(self, event: Event) -> None:
        if isinstance(event, PasswordAuthRequested):
            try:
                self.principal = self.gate.authenticate_password(event.username, event.password)
            except AuthenticationError as exc:
                self.auth_error = exc
            self.socks.accept_auth()  # failures answer the CONNECT with 0x05, as the design table says
        elif isinstance(event, JwtAuthRequested):
            try:
                self.principal = self.gate.authenticate_jwt(event.token, event.location_id)
            except AuthenticationError as exc:
                self.auth_error = exc
            self.socks.accept_auth()
        elif isinstance(event, ConnectRequested):
            self._connect(HostPort(event.host.lower(), event.port))
        elif isinstance(event, PayloadReceived):
            self._held += event.data

    def _connect(self, target: HostPort) -> None:
        self.target = target
        self.trace_id = uuid.uuid4().hex[:16]
        if self.principal is None:
            reason = self.auth_error or AuthenticationError("no authentication")
            self._refuse(Reply.CONNECTION_REFUSED, f"authentication failed: {reason}")
            return
        try:
            session = self.gate.route(self.principal, target)
        except StreamRefused as exc:
            self._refuse(Reply(exc.socks_reply), str(exc))
            return
        self._cancel_timer()
        self.stream_id = session.open_stream(target, self.trace_id, self)
        self.session = session
        self._pause_reading()  # hold pipelined bytes in the socket until the connector answered
        self._timer = asyncio.get_running_loop().call_later(self._open_timeout, self._timed_out, "open")
        log.debug("SOCKS5 %s -> %s trace %s: stream %d opened", self.client, target, self.trace_id, self.stream_id)

    # -- tunnel answers -----------------------------------------------------------------------------------------

    def tunnel_accepted(self) -> None:
        self._cancel_timer()
        self.socks.reply(Reply.SUCCEEDED)
        self._flush_socks()
        for event in self.socks.receive_data(b""):
            self._handle(event)
        log.debug("SOCKS5 %s -> %s (%s) trace %s: connected", self.client, self.target, self._who(), self.trace_id)
        self.start()

    def tunnel_refused(self, reason: str, message: str) -> None:
        self._refuse(Reply(socks_reply_for(reason)), f"connector refused ({reason}): {message}")

    def tunnel_reset(self, error_code: int) -> None:
        if self.started:
            super().tunnel_reset(error_code)
            return
        self._refuse(Reply.GENERAL_FAILURE, f"tunnel closed while connecting (error {error_code})")

    # -- helpers ------------------------------------------------------------------------------------------------

    def _refuse(self, reply: Reply, why: str) -> None:
        self._cancel_timer()
        if self.socks.closed:
            self._close()
            return
        log.warning(
            "SOCKS5 %s -> %s (%s) trace %s: reply 0x%02x %s: %s",
            self.client,
            self.target,
            self._who(),
            self.trace_id or "-",
            reply,
            reply.name.replace("_", " ").lower(),
            why,
        )
        if self.session is not None:
            self.session.detach(self.stream_id)
        self.socks.reply(reply)
        self._flush_socks()
        self._close()

    def _timed_out(self, phase: str) -> None:
        if phase == "handshake":
            log.warning(
                "SOCKS5 client %s did not finish its handshake within %g s — dropped",
                self.client,
                self._handshake_timeout,
            )
            self._close()
        else:
            if self.session is not None:
                self.session.reset_stream(self.stream_id)
            self._refuse(Reply.HOST_UNREACHABLE, f"connector did not answer within {self._open_timeout:g} s")

    def _who(self) -> str:
        if self.principal is None:
            return "unauthenticated"
        return f"{self.principal.subaccount}/{self.principal.location or '(default)'}"

    def _flush_socks(self) -> None:
        data = self.socks.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        self._cancel_timer()
        self._finished = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
