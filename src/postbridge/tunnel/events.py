"""Events of the tunnel protocol: small frozen dataclasses named as facts, produced by
:meth:`postbridge.tunnel.protocol.TunnelConnection.receive_data`. No behaviour lives here."""

from __future__ import annotations

from dataclasses import dataclass

from postbridge.addresses import HostPort


@dataclass(frozen=True)
class ConnectRequested:
    """Connector side: the hub asks for a tunneled connection to ``target`` (a virtual host:port)."""

    stream_id: int
    target: HostPort
    trace_id: str


@dataclass(frozen=True)
class ControlRequested:
    """Connector side: a complete control request (``GET /v1/info``, ``POST /v1/check``)."""

    stream_id: int
    method: str
    path: str
    body: bytes


@dataclass(frozen=True)
class StreamAccepted:
    """Hub side: the connector connected the internal host; data may flow."""

    stream_id: int


@dataclass(frozen=True)
class StreamRefusal:
    """Hub side: the connector refused the stream (``reason`` as in :data:`REFUSALS`)."""

    stream_id: int
    reason: str
    message: str


@dataclass(frozen=True)
class ControlAnswered:
    """Hub side: the complete answer to a control request."""

    stream_id: int
    status: int
    body: bytes


@dataclass(frozen=True)
class DataReceived:
    """Bytes of a tunneled connection; acknowledge ``flow_length`` once they were written onward."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(frozen=True)
class StreamEnded:
    """The peer will send no more on this stream (its FIN)."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The peer aborted the stream."""

    stream_id: int
    error_code: int


@dataclass(frozen=True)
class WindowOpened:
    """The peer granted more send window; ``stream_id`` 0 means the whole connection."""

    stream_id: int


@dataclass(frozen=True)
class PingAnswered:
    payload: bytes


@dataclass(frozen=True)
class DrainRequested:
    """Hub side: the connector asked for no new streams (it is shutting down)."""


@dataclass(frozen=True)
class SessionEnded:
    """The peer closed the session with GOAWAY."""

    error_code: int
    reason: str


Event = (
    ConnectRequested
    | ControlRequested
    | StreamAccepted
    | StreamRefusal
    | ControlAnswered
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingAnswered
    | DrainRequested
    | SessionEnded
)
