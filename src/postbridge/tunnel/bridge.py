"""A bridge between one local TCP (or TLS) connection and one tunnel stream, with backpressure both ways.

Local -> tunnel: bytes are sent as far as the HTTP/2 windows allow; the rest is held and the local socket stops
being read until the peer opens the window again (at most one read chunk is held).
Tunnel -> local: bytes are written to the local socket and acknowledged (window returned to the peer) only while
the socket's write buffer is below its high-water mark; otherwise the acknowledgement waits for ``resume_writing``.
So memory per stream stays bounded by the stream window plus the transport's high-water mark.

Half-close: a local EOF becomes END_STREAM; END_STREAM from the peer becomes ``write_eof()`` where the transport
supports it (plain TCP). A TLS transport cannot half-close: the local server then has :data:`NO_HALF_CLOSE_LINGER`
seconds to answer and close (less when the session shuts down), after which the bridge ends its direction too and
closes the TLS connection (close_notify). The stream is finished when both directions ended; a local close before
that resets it.

This module must not know about SOCKS, mappings or TLS configuration. Subclasses add a set-up phase (the SOCKS
handshake on the hub) by overriding :meth:`data_received` until :meth:`start` is called.
"""

from __future__ import annotations

import asyncio
import logging

from postbridge.tunnel.session import TunnelSession

log = logging.getLogger("postbridge.tunnel")

NO_HALF_CLOSE_LINGER = 5.0  # seconds a TLS local side may still answer after the peer's END_STREAM


class StreamBridge(asyncio.Protocol):
    """Local socket <-> tunnel stream. Usable as an asyncio protocol and as a :class:`StreamSink`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.session: TunnelSession | None = None
        self.stream_id = 0
        self.started = False
        self.bytes_up = 0  # local -> tunnel
        self.bytes_down = 0  # tunnel -> local
        self._held = b""  # local bytes not yet taken by the tunnel (or read before start)
        self._local_eof = False  # the local side sent FIN
        self._eof_sent = False  # ... and it went into the tunnel
        self._remote_eof = False
        self._write_paused = False
        self._unacked = 0
        self._reading_paused = False
        self._finished = False
        self._linger: asyncio.TimerHandle | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def bind(self, session: TunnelSession, stream_id: int) -> None:
        """Associate with a tunnel stream (data does not flow before :meth:`start`)."""
        self.session = session
        self.stream_id = stream_id
        session.attach(stream_id, self)

    @property
    def stream_closed(self) -> bool:
        """True once the stream was reset or finished (e.g. the peer gave up before :meth:`start`)."""
        return self._finished

    def start(self) -> None:
        """Let data flow: send what the local side already sent and resume reading."""
        self.started = True
        if self._remote_eof:
            self._pass_on_eof()  # the peer half-closed before we were connected
        self._pump()
        if not self._held and not self._local_eof:
            self._resume_reading()

    def finish(self, *, reset: bool) -> None:
        """Stop the bridge: reset the stream (if ``reset``) and close the local socket."""
        if self._finished:
            return
        self._finished = True
        if self._linger is not None:
            self._linger.cancel()
        if self.session is not None:
            if reset:
                self.session.reset_stream(self.stream_id)
            else:
                self.session.detach(self.stream_id)
        if self.transport is not None and not self.transport.is_closing():
            if reset:
                self.transport.abort()
            else:
                self.transport.close()

    # -- asyncio.Protocol (local socket) -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.started:
            self._pause_reading()

    def data_received(self, data: bytes) -> None:
        self._held += data
        if self.started:
            self._pump()

    def eof_received(self) -> bool:
        self._local_eof = True
        if self.started:
            self._pump()
        # keep a plain socket open for the other direction; TLS transports cannot half-close (asyncio warns if asked)
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked and self.session is not None:
            unacked, self._unacked = self._unacked, 0
            self.session.acknowledge(self.stream_id, unacked)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._finished:
            return
        done = self._eof_sent and self._remote_eof
        if exc is not None:
            log.debug("stream %s: local connection lost: %s", self.stream_id, exc)
        self.finish(reset=not done)

    # -- StreamSink (tunnel side) --------------------------------------------------------------------------------

    def tunnel_accepted(self) -> None:
        self.start()

    def tunnel_refused(self, reason: str, message: str) -> None:
        self.finish(reset=False)

    def tunnel_data(self, data: bytes, flow_length: int) -> None:
        if self.transport is None or self.transport.is_closing():
            if self.session is not None:
                self.session.acknowledge(self.stream_id, flow_length)
            return
        if data:
            self.transport.write(data)
            self.bytes_down += len(data)
        if self._write_paused:
            self._unacked += flow_length
        elif self.session is not None:
            self.session.acknowledge(self.stream_id, flow_length)

    def tunnel_eof(self) -> None:
        self._remote_eof = True
        if self.transport is None:
            return
        if self._eof_sent:
            self.finish(reset=False)
        elif self.started:
            self._pass_on_eof()

    def tunnel_draining(self) -> None:
        """The session shuts down: a stream whose peer ended and that only lingers for the local TLS side ends now."""
        if self._linger is not None:
            self._linger.cancel()
            self._end_local_side()

    def _pass_on_eof(self) -> None:
        """The peer's END_STREAM to the local side: a FIN, or (TLS) a close after the linger."""
        if self.transport is None or self._finished:
            return
        if not self.transport.can_write_eof():
            if self._linger is None:
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(NO_HALF_CLOSE_LINGER, self._end_local_side)
            return
        try:
            self.transport.write_eof()
        except OSError as exc:  # the local peer is gone (ENOTCONN): give up this stream only
            log.debug("stream %s: local socket cannot take the FIN: %s", self.stream_id, exc)
            self.finish(reset=True)

    def _end_local_side(self) -> None:
        """The linger is over: stop reading the local side, end our direction and close (reset if bytes are held)."""
        self._linger = None
        if self._finished:
            return
        log.debug("stream %s: the peer ended and the local TLS side cannot half-close: closing it", self.stream_id)
        self._local_eof = True
        self._pump()
        if not self._finished:
            self.finish(reset=True)

    def tunnel_reset(self, error_code: int) -> None:
        self._finished = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def tunnel_window(self) -> None:
        if self.started:
            self._pump()

    # -- internals ----------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        session = self.session
        if session is None or self._finished:
            return
        if self._held:
            sent = session.send(self.stream_id, self._held, self)
            self.bytes_up += sent
            self._held = self._held[sent:]
        if self._held or session.write_paused:
            if session.write_paused:
                session.paused_sinks.add(self)
            self._pause_reading()
            return
        if self._local_eof:
            if not self._eof_sent:
                self._eof_sent = True
                session.end_stream(self.stream_id)
                if self._remote_eof:
                    self.finish(reset=False)
            return
        self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()
