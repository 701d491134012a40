"""One stream's local socket failing must never take the tunnel (and every other stream) down with it."""

from __future__ import annotations

import asyncio

import pytest

from postbridge.addresses import HostPort
from postbridge.tunnel import bridge as bridge_module
from postbridge.tunnel import protocol as tp
from postbridge.tunnel.bridge import StreamBridge
from postbridge.tunnel.session import SessionHandler, TunnelSession


class _FakeTransport(asyncio.Transport):
    """A local socket whose peer is already gone: shutdown() fails like the kernel's ENOTCONN."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.aborted = False
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class _Pipe(asyncio.Transport):
    """Carries one session's bytes to the other session."""

    def __init__(self) -> None:
        super().__init__()
        self.peer: TunnelSession | None = None
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.peer is not None
        asyncio.get_running_loop().call_soon(self.peer.data_received, bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _linked(handler: SessionHandler) -> tuple[TunnelSession, TunnelSession]:
    """A hub session and a connector session (with ``handler``) whose bytes travel through in-memory pipes."""
    hub = TunnelSession(tp.Role.HUB, peer="connector")
    connector = TunnelSession(tp.Role.CONNECTOR, peer="hub", handler=handler)
    to_connector, to_hub = _Pipe(), _Pipe()
    to_connector.peer, to_hub.peer = connector, hub
    connector.connection_made(to_hub)
    hub.connection_made(to_connector)
    return hub, connector


async def test_a_local_socket_that_fails_on_eof_resets_only_its_stream() -> None:
    class Handler:
        def connect_requested(self, session: TunnelSession, event: tp.ConnectRequested) -> None:
            session.accept(event.stream_id)
            session.end_stream(event.stream_id)  # the internal server says goodbye at once

        def control_requested(self, session: TunnelSession, event: tp.ControlRequested) -> None:
            raise AssertionError("not used")

    hub, connector = _linked(Handler())

    bridge = StreamBridge()
    local = _FakeTransport()
    bridge.connection_made(local)
    stream_id = hub.open_stream(HostPort("mail.corp.example", 143), "trace", bridge)
    bridge.session, bridge.stream_id = hub, stream_id  # what the SOCKS listener does after opening
    for _ in range(50):
        await asyncio.sleep(0)
    assert hub.is_open and not hub.closed.done(), "the tunnel died with the stream"
    assert local.aborted or local.closed  # the failing local socket was given up ...
    assert stream_id not in hub.sinks  # ... and its stream forgotten
    hub.close("test over")
    connector.close("test over")


async def test_any_failure_in_one_streams_handler_resets_that_stream_and_keeps_the_tunnel() -> None:
    class Handler:
        def connect_requested(self, session: TunnelSession, event: tp.ConnectRequested) -> None:
            session.accept(event.stream_id)
            session.core.send_data(event.stream_id, b"* OK greeting\r\n")

        def control_requested(self, session: TunnelSession, event: tp.ControlRequested) -> None:
            raise AssertionError("not used")

    class Exploding(StreamBridge):
        def tunnel_data(self, data: bytes, flow_length: int) -> None:
            raise RuntimeError("bug in one stream's code")

    hub, connector = _linked(Handler())
    bad, good = Exploding(), StreamBridge()
    bad_local, good_local = _FakeTransport(), _FakeTransport()
    bad.connection_made(bad_local)
    good.connection_made(good_local)
    for bridge in (bad, good):
        bridge.session, bridge.stream_id = hub, hub.open_stream(HostPort("mail.corp.example", 143), "t", bridge)
    for _ in range(50):
        await asyncio.sleep(0)
    assert hub.is_open
    assert bad.stream_id not in hub.sinks and bad_local.aborted
    assert good.stream_id in hub.sinks and good_local.written == b"* OK greeting\r\n"
    hub.close("test over")
    connector.close("test over")


class _TlsTransport(_FakeTransport):
    """A local TLS socket: it cannot half-close."""

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise AssertionError("a TLS transport cannot write EOF")


async def test_a_draining_connector_ends_a_tls_stream_whose_client_left_without_waiting_for_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bridge_module, "NO_HALF_CLOSE_LINGER", 3600.0)  # only the drain can end it in time
    backend = _TlsTransport()

    class Handler:
        def connect_requested(self, session: TunnelSession, event: tp.ConnectRequested) -> None:
            bridge = StreamBridge()
            bridge.bind(session, event.stream_id)
            bridge.connection_made(backend)
            session.accept(event.stream_id)
            bridge.start()

        def control_requested(self, session: TunnelSession, event: tp.ControlRequested) -> None:
            raise AssertionError("not used")

    hub, connector = _linked(Handler())
    client = StreamBridge()
    client.connection_made(_FakeTransport())
    stream_id = hub.open_stream(HostPort("mail.corp.example", 993), "trace", client)
    client.session, client.stream_id = hub, stream_id
    for _ in range(50):
        await asyncio.sleep(0)
    hub.end_stream(stream_id)  # the cloud client's FIN
    for _ in range(50):
        await asyncio.sleep(0)
    assert connector.sinks and not backend.closed  # lingering: the server may still answer

    await asyncio.wait_for(connector.shutdown("connector is shutting down", grace=3600), timeout=10)

    assert backend.closed and not backend.aborted  # closed cleanly (close_notify), not reset
    hub.close("test over")
