"""The tunnel wire protocol, sans-I/O: postbridge's rules on top of an ``h2`` connection.

One TLS connection between connector and hub carries every tunneled TCP connection as one HTTP/2 stream. Roles are
reversed: the hub is the HTTP/2 *client* (it opens streams), the connector the HTTP/2 *server*.

* A tunneled connection: the hub sends ``CONNECT`` with ``:authority = virtual-host:port`` and a
  ``postbridge-trace-id`` header. The connector answers ``200`` once the internal host is connected, or a refusal
  status with ``postbridge-error: <reason>`` and ``postbridge-message: <text>``. DATA frames carry the bytes;
  END_STREAM is the FIN of one direction (half-close), RST_STREAM aborts.
* A control request: the hub sends ``GET /v1/info`` or ``POST /v1/check`` with a JSON body; the connector answers
  with a status and a JSON body.
* Draining: the connector announces "no new streams" with ``SETTINGS_MAX_CONCURRENT_STREAMS = 0`` (h2 cannot go on
  sending after a GOAWAY, so GOAWAY is sent only when the last stream is done).

This module owns the translation between h2 events and tunnel events and every rule about which side may do what.
It must not do I/O, keep clocks or know about SOCKS sockets. Feed bytes with :meth:`receive_data`, send what
:meth:`data_to_send` returns. Anything the peer does wrong raises :class:`TunnelProtocolError`.
"""

from __future__ import annotations

import contextlib
import enum
import re

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame

from postbridge.addresses import HostPort, parse_host_port
from postbridge.errors import ConfigurationError, TunnelProtocolError
from postbridge.tunnel.events import (
    ConnectRequested,
    ControlAnswered,
    ControlRequested,
    DataReceived,
    DrainRequested,
    Event,
    PingAnswered,
    SessionEnded,
    StreamAccepted,
    StreamEnded,
    StreamRefusal,
    StreamReset,
    WindowOpened,
)

__all__ = [
    "CONNECTION_WINDOW",
    "CONTROL_PATHS",
    "MAX_CONTROL_BODY",
    "MAX_FRAME_SIZE",
    "MAX_STREAMS",
    "REFUSALS",
    "STREAM_WINDOW",
    "ConnectRequested",
    "ControlAnswered",
    "ControlRequested",
    "DataReceived",
    "DrainRequested",
    "Event",
    "FrameGuard",
    "PingAnswered",
    "Role",
    "SessionEnded",
    "StreamAccepted",
    "StreamEnded",
    "StreamRefusal",
    "StreamReset",
    "TunnelConnection",
    "WindowOpened",
    "socks_reply_for",
]

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024
MAX_STREAMS = 20_000
MAX_CONTROL_BODY = 1024 * 1024
CONTROL_PATHS = frozenset({"/v1/info", "/v1/check"})


class Role(enum.Enum):
    HUB = "hub"  # HTTP/2 client: opens streams
    CONNECTOR = "connector"  # HTTP/2 server: accepts or refuses them


# Refusal reasons as they travel in ``postbridge-error``: HTTP status and SOCKS5 reply (design table).
REFUSALS: dict[str, tuple[int, int]] = {
    "not-allowed": (403, 0x02),
    "host-unreachable": (502, 0x04),
    "timeout": (504, 0x04),
    "backend-tls": (502, 0x01),
    "backend-closed": (502, 0x01),
    "draining": (503, 0x01),
    "bad-request": (400, 0x01),
}


def socks_reply_for(reason: str) -> int:
    """SOCKS5 reply code for a refusal reason; unknown reasons are a general failure (0x01)."""
    return REFUSALS.get(reason, (0, 0x01))[1]


_HEADER_TEXT = re.compile(r"[^\x20-\x7e]")


def _clean(text: str, limit: int = 300) -> str:
    """Header-safe text: typographic dashes and quotes become ASCII, anything else unprintable '?'."""
    text = text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2018", "'").replace("\u2019", "'")
    return _HEADER_TEXT.sub("?", text)[:limit]


def _short_data_repr(data: bytes | None) -> str:
    """hyperframe's frame repr hex-encodes the whole payload before cutting it to 20 characters, and h2 builds that
    repr for every received frame even when nothing logs it (a fifth of the hub's CPU at full speed)."""
    if not data:
        return "None"
    return "<hex:" + bytes(data[:10]).hex() + ("..." if len(data) > 10 else "") + ">"


if hasattr(hyperframe.frame, "_raw_data_repr"):
    hyperframe.frame._raw_data_repr = _short_data_repr


class _H2Connection(h2.connection.H2Connection):
    """h2 counts open streams by walking every stream, on every new stream: O(n) per open, quadratic with thousands
    of streams. The count is needed only against limits in the thousands, so a count at most 128 opens old is exact
    enough; the walk (which also forgets closed streams) still runs every 128th time."""

    _RESCAN_EVERY = 128

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._counts: dict[int, int] = {}
        self._count_calls: dict[int, int] = {}

    def _open_streams(self, remainder: int) -> int:
        calls = self._count_calls.get(remainder, 0)
        self._count_calls[remainder] = calls + 1
        if calls % self._RESCAN_EVERY == 0 or remainder not in self._counts:
            self._counts[remainder] = super()._open_streams(remainder)
        return self._counts[remainder]


class FrameGuard:
    """Finds HTTP/2 frame headers in the byte stream and rejects an oversized frame at its header.

    h2 buffers a whole frame (up to 16 MiB) before it checks the length against SETTINGS_MAX_FRAME_SIZE; this
    guard refuses it as soon as the 9-byte header arrived, so a hostile peer cannot make us hold megabytes.
    """

    def __init__(self, preface_length: int, limit: int) -> None:
        self._skip = preface_length  # bytes until the next frame header
        self._header = bytearray()
        self.limit = limit

    def check(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = 9 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 9:
                length = int.from_bytes(self._header[:3], "big")
                if length > self.limit:
                    raise TunnelProtocolError(
                        f"tunnel peer broke HTTP/2: frame of {length} bytes announced, the limit is {self.limit}"
                    )
                self._header.clear()
                self._skip = length


class TunnelConnection:
    """One tunnel session's protocol state for either role (see module docstring)."""

    def __init__(self, role: Role) -> None:
        self.role = role
        config = h2.config.H2Configuration(client_side=role is Role.HUB, header_encoding=None)
        self._h2 = _H2Connection(config=config)
        self._control: dict[int, bytearray] = {}  # control streams: body collected so far
        self._control_meta: dict[int, tuple[str, str] | int] = {}  # request (method, path) or answer status
        self._pending_data: dict[int, bytearray] = {}  # connector: data received on a CONNECT before accept
        self._pending_flow: dict[int, int] = {}  # ... and its flow-controlled length, acknowledged on delivery
        # the connector (HTTP/2 server) first reads the 24-byte client preface, then frames
        self._guard_frames = FrameGuard(24 if role is Role.CONNECTOR else 0, MAX_FRAME_SIZE)

    # -- set-up -------------------------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface and our settings; call once, right after the TLS handshake."""
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
        }
        if self.role is Role.CONNECTOR:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
        else:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 0  # the connector never opens streams
        self._h2.local_settings = h2.settings.Settings(client=self.role is Role.HUB, initial_values=settings)
        self._h2.initiate_connection()
        # h2 applies a replaced local_settings object to its frame-size check only on a later ACKed change;
        # accept our advertised size from the start (the peer may use it as soon as it read our SETTINGS)
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)

    def data_to_send(self) -> bytes:
        data: bytes = self._h2.data_to_send()
        return data

    # -- hub (client) commands ----------------------------------------------------------------------------------

    def open_stream(self, target: HostPort, trace_id: str) -> int:
        """Hub: ask the connector for a tunneled connection; returns the stream id."""
        self._require(Role.HUB, "open_stream")
        stream_id: int = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", b"CONNECT"),
            (b":authority", str(target).encode("ascii")),
            (b"postbridge-trace-id", _clean(trace_id, 64).encode("ascii")),
        ]
        self._guard(self._h2.send_headers, stream_id, headers)
        return stream_id

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Hub: send a control request; the answer arrives as :class:`ControlAnswered`."""
        self._require(Role.HUB, "request")
        stream_id: int = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", method.encode("ascii")),
            (b":scheme", b"https"),
            (b":path", path.encode("ascii")),
            (b":authority", b"connector"),
            (b"content-type", b"application/json"),
        ]
        self._guard(self._h2.send_headers, stream_id, headers, end_stream=not body)
        if body:
            self._send_body(stream_id, body)
        self._control[stream_id] = bytearray()
        return stream_id

    def can_open_stream(self) -> bool:
        """Hub: False while the connector drains (no new streams allowed)."""
        open_streams: int = self._h2.open_outbound_streams
        limit: int = self._h2.remote_settings.max_concurrent_streams
        return open_streams < limit

    # -- connector (server) commands ----------------------------------------------------------------------------

    def accept(self, stream_id: int) -> tuple[bytes, int]:
        """Connector: the internal host is connected.

        Returns the data the hub sent before the answer and its flow-controlled length: deliver it onward, then
        :meth:`acknowledge` the length.
        """
        self._require(Role.CONNECTOR, "accept")
        self._guard(self._h2.send_headers, stream_id, [(b":status", b"200")])
        return bytes(self._pending_data.pop(stream_id, b"")), self._pending_flow.pop(stream_id, 0)

    def refuse(self, stream_id: int, reason: str, message: str) -> None:
        """Connector: refuse a CONNECT with a reason from :data:`REFUSALS` and a human-readable message."""
        self._require(Role.CONNECTOR, "refuse")
        status = REFUSALS.get(reason, (502, 1))[0]
        headers = [
            (b":status", str(status).encode("ascii")),
            (b"postbridge-error", reason.encode("ascii")),
            (b"postbridge-message", _clean(message).encode("ascii")),
        ]
        self._pending_data.pop(stream_id, None)
        early = self._pending_flow.pop(stream_id, 0)
        if early:
            self._h2.acknowledge_received_data(early, stream_id)
        self._guard(self._h2.send_headers, stream_id, headers, end_stream=True)

    def answer(self, stream_id: int, status: int, body: bytes) -> None:
        """Connector: answer a control request."""
        self._require(Role.CONNECTOR, "answer")
        headers = [(b":status", str(status).encode("ascii")), (b"content-type", b"application/json")]
        self._guard(self._h2.send_headers, stream_id, headers)
        self._send_body(stream_id, body)

    def drain(self) -> None:
        """Connector: tell the hub not to open new streams (running ones go on)."""
        self._require(Role.CONNECTOR, "drain")
        self._guard(self._h2.update_settings, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})

    # -- both sides ---------------------------------------------------------------------------------------------

    def send_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` can send now on this stream (0 when closed)."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed or stream.state_machine.state is h2.stream.StreamState.HALF_CLOSED_LOCAL:
            return 0
        try:
            window: int = self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0
        return window

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the flow-control windows allow; returns the number of bytes taken."""
        view = memoryview(data)
        sent = 0
        frame = self._h2.max_outbound_frame_size
        while sent < len(view):
            room = min(self.send_window(stream_id), frame, len(view) - sent)
            if room <= 0:
                break
            self._guard(self._h2.send_data, stream_id, view[sent : sent + room].tobytes())
            sent += room
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we will send no more on this stream. Ignored when the stream is already gone."""
        try:
            self._h2.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            pass
        except h2.exceptions.ProtocolError as exc:  # already half-closed locally
            if "SEND_END_STREAM" not in str(exc):
                raise TunnelProtocolError(f"cannot end stream {stream_id}: {exc}") from exc

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort a stream. Ignored when the stream is already gone."""
        self._pending_data.pop(stream_id, None)
        self._pending_flow.pop(stream_id, None)
        self._control.pop(stream_id, None)
        try:
            self._h2.reset_stream(stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            pass
        except h2.exceptions.ProtocolError:
            pass  # stream in a state where a reset is not allowed (idle): nothing to abort

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """Return window for bytes that were written onward (backpressure: call only after the write)."""
        if flow_length:
            self._guard(self._h2.acknowledge_received_data, flow_length, stream_id)

    def ping(self, payload: bytes) -> None:
        self._guard(self._h2.ping, payload.ljust(8, b"\0")[:8])

    def close(self, reason: str = "", error_code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY; nothing can be sent afterwards."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed
            self._h2.close_connection(error_code=error_code, additional_data=_clean(reason).encode("ascii"))

    # -- receiving ----------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns tunnel events. Raises TunnelProtocolError on any violation."""
        self._guard_frames.check(data)
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise TunnelProtocolError(f"tunnel peer broke HTTP/2: {type(exc).__name__}: {exc}") from exc
        events: list[Event] = []
        for event in h2_events:
            self._translate(event, events)
        return events

    def _translate(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event, out)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event, out)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event, out)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_stream_ended(event.stream_id, out)
        elif isinstance(event, h2.events.StreamReset):
            self._pending_data.pop(event.stream_id, None)
            self._pending_flow.pop(event.stream_id, None)
            self._control.pop(event.stream_id, None)
            out.append(StreamReset(event.stream_id, int(event.error_code or 0)))
        elif isinstance(event, h2.events.WindowUpdated):
            out.append(WindowOpened(event.stream_id))
        elif isinstance(event, h2.events.PingAckReceived):
            out.append(PingAnswered(bytes(event.ping_data)))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings
            limit = changed.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if self.role is Role.HUB and limit is not None and limit.new_value == 0:
                out.append(DrainRequested())
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                out.append(WindowOpened(0))
        elif isinstance(event, h2.events.ConnectionTerminated):
            reason = (event.additional_data or b"").decode("ascii", "replace")
            out.append(SessionEnded(int(event.error_code or 0), reason))
        # other h2 events (settings acks, priority, pings received: h2 answers them itself) need nothing

    def _on_request(self, event: h2.events.RequestReceived, out: list[Event]) -> None:
        headers = {name: value for name, value in event.headers}
        method = headers.get(b":method", b"").decode("ascii", "replace")
        stream_id = event.stream_id
        if method == "CONNECT":
            authority = headers.get(b":authority", b"").decode("ascii", "replace")
            try:
                target = parse_host_port(authority, what="tunnel target")
            except ConfigurationError as exc:
                with contextlib.suppress(TunnelProtocolError):  # the hub may have reset it in the same read
                    self.refuse(stream_id, "bad-request", exc.message)
                return
            trace_id = _clean(headers.get(b"postbridge-trace-id", b"").decode("ascii", "replace"), 64)
            self._pending_data[stream_id] = bytearray()
            out.append(ConnectRequested(stream_id, target, trace_id))
            return
        path = headers.get(b":path", b"").decode("ascii", "replace")
        if method in {"GET", "POST"} and path in CONTROL_PATHS:
            self._control[stream_id] = bytearray()
            self._control_meta[stream_id] = (method, path)
            return
        with contextlib.suppress(TunnelProtocolError):  # the hub may have reset it in the same read
            self.answer(stream_id, 404, b'{"error": "unknown control request"}')

    def _on_response(self, event: h2.events.ResponseReceived, out: list[Event]) -> None:
        headers = {name: value for name, value in event.headers}
        stream_id = event.stream_id
        raw_status = headers.get(b":status", b"")
        if not (len(raw_status) == 3 and raw_status.isdigit()):
            raise TunnelProtocolError(f"connector answered stream {stream_id} with an invalid :status {raw_status!r}")
        status = int(raw_status)
        if stream_id in self._control:
            self._control_meta[stream_id] = status
            return
        if status == 200:
            out.append(StreamAccepted(stream_id))
            return
        reason = headers.get(b"postbridge-error", b"").decode("ascii", "replace") or f"http-{status}"
        message = headers.get(b"postbridge-message", b"").decode("ascii", "replace")
        out.append(StreamRefusal(stream_id, reason, message or f"connector answered status {status}"))

    def _on_data(self, event: h2.events.DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        data = bytes(event.data)
        if stream_id in self._control:
            buffer = self._control[stream_id]
            buffer += data
            self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            if len(buffer) > MAX_CONTROL_BODY:
                self.reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        pending = self._pending_data.get(stream_id)
        if pending is not None:  # data before accept: hold it (it counts against the window until delivered)
            pending += data
            self._pending_flow[stream_id] = self._pending_flow.get(stream_id, 0) + event.flow_controlled_length
            return
        if data or event.flow_controlled_length:
            out.append(DataReceived(stream_id, data, event.flow_controlled_length))

    def _on_stream_ended(self, stream_id: int, out: list[Event]) -> None:
        if stream_id in self._control:
            body = bytes(self._control.pop(stream_id))
            meta = self._control_meta.pop(stream_id, 0)
            if isinstance(meta, tuple):
                out.append(ControlRequested(stream_id, meta[0], meta[1], body))
            else:
                out.append(ControlAnswered(stream_id, meta, body))
            return
        out.append(StreamEnded(stream_id))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _send_body(self, stream_id: int, body: bytes) -> None:
        frame = self._h2.max_outbound_frame_size
        chunks = [body[i : i + frame] for i in range(0, len(body), frame)] or [b""]
        for index, chunk in enumerate(chunks):
            self._guard(self._h2.send_data, stream_id, chunk, end_stream=index == len(chunks) - 1)

    def _require(self, role: Role, command: str) -> None:
        if self.role is not role:
            raise TunnelProtocolError(
                f"'{command}' is for the {role.value} side, this session is the {self.role.value}"
            )

    def _guard(self, method: object, *args: object, **kwargs: object) -> None:
        try:
            method(*args, **kwargs)  # type: ignore[operator]
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as exc:
            raise TunnelProtocolError(f"stream is already closed: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise TunnelProtocolError(f"HTTP/2 refused the operation: {type(exc).__name__}: {exc}") from exc
