"""The asyncio driver of one tunnel session (either role) over an established TLS transport.

It owns: feeding the sans-I/O :class:`TunnelConnection`, writing what it produces (coalesced once per loop turn),
dispatching stream events to the :class:`StreamSink` registered for each stream, liveness (PING every
``ping_interval``; no answer for ``dead_after`` = dead session, the transport is aborted), control requests and
orderly shutdown. It must not know about SOCKS, mappings or sockets other than its own transport.

Tunneled streams have no idle timeout: IMAP IDLE may stay silent for 29 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from postbridge.addresses import HostPort
from postbridge.errors import NetworkError, PostbridgeTimeout, TunnelProtocolError
from postbridge.tunnel import protocol as tp

log = logging.getLogger("postbridge.tunnel")

PING_INTERVAL = 10.0
DEAD_AFTER = 30.0


class StreamSink(Protocol):
    """What receives one stream's tunnel events (a bridge to a local socket)."""

    def tunnel_accepted(self) -> None: ...
    def tunnel_refused(self, reason: str, message: str) -> None: ...
    def tunnel_data(self, data: bytes, flow_length: int) -> None: ...
    def tunnel_eof(self) -> None: ...
    def tunnel_reset(self, error_code: int) -> None: ...
    def tunnel_window(self) -> None: ...
    def tunnel_draining(self) -> None: ...


class SessionHandler(Protocol):
    """Connector side: decides what to do with requests from the hub."""

    def connect_requested(self, session: TunnelSession, event: tp.ConnectRequested) -> None: ...
    def control_requested(self, session: TunnelSession, event: tp.ControlRequested) -> None: ...


class TunnelSession(asyncio.Protocol):
    """One tunnel over one transport. Create it as the protocol of a TLS connection."""

    def __init__(
        self,
        role: tp.Role,
        *,
        peer: str,
        handler: SessionHandler | None = None,
        ping_interval: float = PING_INTERVAL,
        dead_after: float = DEAD_AFTER,
        on_drain: Callable[[TunnelSession], None] | None = None,
    ) -> None:
        self.role = role
        self.peer = peer
        self.core = tp.TunnelConnection(role)
        self.handler = handler
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.on_drain = on_drain
        self.sinks: dict[int, StreamSink] = {}
        self.write_paused = False
        self.paused_sinks: set[StreamSink] = set()
        self.draining = False
        self.connected_at = time.time()
        self.rtt_ms: float | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.close_reason = ""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._controls: dict[int, asyncio.Future[tp.ControlAnswered]] = {}
        self._last_pong = time.monotonic()
        self._ping_sent_at: dict[bytes, float] = {}
        self._keepalive: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.core.initiate()
        self._flush()
        self._last_pong = time.monotonic()
        self._keepalive = self._loop.call_later(self.ping_interval, self._tick)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.core.receive_data(data)
        except TunnelProtocolError as exc:
            log.error("tunnel with %s: %s — closing the session", self.peer, exc)
            self.abort(str(exc))
            return
        self._last_pong = time.monotonic()  # any frame proves the peer is alive
        for event in events:
            try:
                self._dispatch(event)
            except Exception:  # a bug or OS error at one stream's local end must not kill every stream
                stream_id = getattr(event, "stream_id", 0)
                log.exception(
                    "tunnel with %s: handling %s failed; resetting stream %s only",
                    self.peer,
                    type(event).__name__,
                    stream_id,
                )
                if stream_id:
                    sink = self.sinks.pop(stream_id, None)
                    self.core.reset(stream_id)
                    if sink is not None:
                        sink.tunnel_reset(0)
        self._schedule_flush()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        paused, self.paused_sinks = self.paused_sinks, set()
        for sink in paused:
            sink.tunnel_window()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive:
            self._keepalive.cancel()
        if not self.close_reason:
            self.close_reason = f"connection lost: {exc}" if exc else "closed by peer"
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.tunnel_reset(0)
        for future in self._controls.values():
            if not future.done():
                future.set_exception(NetworkError(f"tunnel to {self.peer} closed: {self.close_reason}"))
        self._controls.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- stream operations used by bridges ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self.closed.done()

    def open_stream(self, target: HostPort, trace_id: str, sink: StreamSink) -> int:
        """Hub: open a tunneled connection; the sink hears ``tunnel_accepted`` or ``tunnel_refused``."""
        stream_id = self.core.open_stream(target, trace_id)
        self.sinks[stream_id] = sink
        self._schedule_flush()
        return stream_id

    def attach(self, stream_id: int, sink: StreamSink) -> None:
        self.sinks[stream_id] = sink

    def send(self, stream_id: int, data: bytes | memoryview, sink: StreamSink) -> int:
        """Send what the windows allow; when less than all was taken, the sink hears ``tunnel_window`` later."""
        sent = self.core.send_data(stream_id, data) if stream_id in self.sinks else 0
        self._schedule_flush()
        if self.write_paused:
            self.paused_sinks.add(sink)
        return sent

    def end_stream(self, stream_id: int) -> None:
        self.core.end_stream(stream_id)
        self._schedule_flush()

    def reset_stream(self, stream_id: int) -> None:
        if self.sinks.pop(stream_id, None) is not None:
            self.core.reset(stream_id)
            self._schedule_flush()

    def detach(self, stream_id: int) -> None:
        self.sinks.pop(stream_id, None)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        if self.is_open:
            self.core.acknowledge(stream_id, flow_length)
            self._schedule_flush()

    def accept(self, stream_id: int) -> tuple[bytes, int]:
        """Connector: answer a CONNECT with success; returns early data from the hub and its flow length."""
        early = self.core.accept(stream_id)
        self._schedule_flush()
        return early

    def refuse(self, stream_id: int, reason: str, message: str) -> None:
        """Connector: refuse a CONNECT (reason from ``protocol.REFUSALS``)."""
        self.sinks.pop(stream_id, None)
        if self.is_open:
            self.core.refuse(stream_id, reason, message)
            self._schedule_flush()

    # -- control requests ---------------------------------------------------------------------------------------

    async def control(self, method: str, path: str, body: bytes = b"", *, timeout: float = 15.0) -> tp.ControlAnswered:
        """Hub: send a control request and wait for its answer. Raises NetworkError / PostbridgeTimeout."""
        if not self.is_open:
            raise NetworkError(f"tunnel to {self.peer} is closed")
        stream_id = self.core.request(method, path, body)
        future: asyncio.Future[tp.ControlAnswered] = self._loop.create_future()
        self._controls[stream_id] = future
        self._schedule_flush()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as exc:
            self.core.reset(stream_id)
            raise PostbridgeTimeout(
                f"connector {self.peer} did not answer {method} {path} within {timeout:g} s"
            ) from exc
        finally:
            self._controls.pop(stream_id, None)

    def answer(self, stream_id: int, status: int, body: bytes) -> None:
        """Connector: answer a control request."""
        if self.is_open:
            self.core.answer(stream_id, status, body)
            self._schedule_flush()

    # -- shutdown -----------------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Connector: ask the hub for no new streams; running streams go on."""
        if self.is_open and not self.draining:
            self.draining = True
            self.core.drain()
            self._schedule_flush()

    async def shutdown(self, reason: str, *, grace: float = 10.0) -> None:
        """Drain, wait up to ``grace`` seconds for running streams, then GOAWAY and close."""
        if self.role is tp.Role.CONNECTOR:
            self.drain()
        self.draining = True
        for sink in list(self.sinks.values()):
            sink.tunnel_draining()  # a stream that only waits for its local side to close may end now
        deadline = time.monotonic() + grace
        while self.sinks and self.is_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.close(reason)

    def close(self, reason: str) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self.close_reason = reason
        self.core.close(reason)
        self._flush()
        self._transport.close()

    def abort(self, reason: str) -> None:
        self.close_reason = reason
        if self._transport is not None:
            self._transport.abort()

    # -- internals ----------------------------------------------------------------------------------------------

    def _dispatch(self, event: tp.Event) -> None:
        if isinstance(event, tp.DataReceived):
            sink = self.sinks.get(event.stream_id)
            if sink is None:
                self.core.acknowledge(event.stream_id, event.flow_length)
            else:
                sink.tunnel_data(event.data, event.flow_length)
        elif isinstance(event, tp.WindowOpened):
            if event.stream_id == 0:
                for sink in list(self.sinks.values()):
                    sink.tunnel_window()
            elif (sink := self.sinks.get(event.stream_id)) is not None:
                sink.tunnel_window()
        elif isinstance(event, tp.StreamEnded):
            if (sink := self.sinks.get(event.stream_id)) is not None:
                sink.tunnel_eof()
        elif isinstance(event, tp.StreamReset):
            if (sink := self.sinks.pop(event.stream_id, None)) is not None:
                sink.tunnel_reset(event.error_code)
        elif isinstance(event, tp.StreamAccepted):
            if (sink := self.sinks.get(event.stream_id)) is not None:
                sink.tunnel_accepted()
        elif isinstance(event, tp.StreamRefusal):
            if (sink := self.sinks.pop(event.stream_id, None)) is not None:
                sink.tunnel_refused(event.reason, event.message)
        elif isinstance(event, tp.ControlAnswered):
            future = self._controls.get(event.stream_id)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, tp.PingAnswered):
            sent = self._ping_sent_at.pop(event.payload, None)
            if sent is not None:
                self.rtt_ms = (time.monotonic() - sent) * 1000
        elif isinstance(event, tp.ConnectRequested | tp.ControlRequested):
            self._on_request(event)
        elif isinstance(event, tp.DrainRequested):
            self.draining = True
            if self.on_drain:
                self.on_drain(self)
        elif isinstance(event, tp.SessionEnded):
            self.close_reason = (
                f"peer closed the session (GOAWAY {event.error_code}{': ' + event.reason if event.reason else ''})"
            )
            if self._transport is not None:
                self._transport.close()

    def _on_request(self, event: tp.ConnectRequested | tp.ControlRequested) -> None:
        if self.handler is None:
            raise TunnelProtocolError(f"{self.role.value} side received a request it cannot serve")
        if isinstance(event, tp.ConnectRequested):
            if self.draining:
                self.refuse(event.stream_id, "draining", "connector is shutting down")
            else:
                self.handler.connect_requested(self, event)
        else:
            self.handler.control_requested(self, event)

    def _tick(self) -> None:
        if self.closed.done():
            return
        silent = time.monotonic() - self._last_pong
        if silent >= self.dead_after:
            log.error(
                "tunnel with %s: no answer for %.0f s — the peer or the network is dead, closing", self.peer, silent
            )
            self.abort(f"no answer for {silent:.0f} s")
            return
        payload = os.urandom(8)
        self._ping_sent_at = {payload: time.monotonic()}
        with contextlib.suppress(TunnelProtocolError):
            self.core.ping(payload)
        self._flush()
        # wake up again at the next ping or exactly when the silence would reach dead_after, whichever is first
        wait = max(0.05, min(self.ping_interval, self.dead_after - silent))
        self._keepalive = self._loop.call_later(wait, self._tick)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.core.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
