"""The standard test set for the sans-I/O tunnel protocol (``postbridge.tunnel.protocol``).

A hub and a connector are linked in memory (:class:`Pair`): what one side's ``data_to_send()`` returns is
fed into the other's ``receive_data()`` until both are quiet, and the events of each side are collected. On
top of that: transcripts of every exchange, flow control, the role rules, the same transcript fed one byte at
a time, and ``hypothesis`` fuzzing that asserts nothing but :class:`TunnelProtocolError` ever escapes.
"""

from __future__ import annotations

import functools
import hashlib
import random
import struct
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbridge.addresses import HostPort
from postbridge.errors import TunnelProtocolError
from postbridge.tunnel.protocol import (
    MAX_FRAME_SIZE,
    REFUSALS,
    STREAM_WINDOW,
    ConnectRequested,
    ControlAnswered,
    ControlRequested,
    DataReceived,
    DrainRequested,
    Event,
    PingAnswered,
    Role,
    SessionEnded,
    StreamAccepted,
    StreamEnded,
    StreamRefusal,
    StreamReset,
    TunnelConnection,
    WindowOpened,
    socks_reply_for,
)

TARGET = HostPort("mail.corp", 143)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # never write .hypothesis/ into the work tree
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the linked pair -----------------------------------------------------------------------------------------


def feed(receiver: TunnelConnection, data: bytes, chunk: int | None) -> list[Event]:
    """Feed ``data`` at once, or ``chunk`` bytes per ``receive_data`` call."""
    if chunk is None:
        return receiver.receive_data(data)
    events: list[Event] = []
    for start in range(0, len(data), chunk):
        events += receiver.receive_data(data[start : start + chunk])
    return events


class Pair:
    """A hub and a connector linked in memory; every event either side ever saw is kept in order."""

    def __init__(self, *, chunk: int | None = None) -> None:
        self.hub = TunnelConnection(Role.HUB)
        self.connector = TunnelConnection(Role.CONNECTOR)
        self.chunk = chunk
        self.hub_events: list[Event] = []
        self.connector_events: list[Event] = []
        self.hub.initiate()
        self.connector.initiate()
        self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both are quiet; returns (hub events, connector events) of this round."""
        hub_new: list[Event] = []
        connector_new: list[Event] = []
        for _ in range(1000):
            to_connector = self.hub.data_to_send()
            if to_connector:
                connector_new += feed(self.connector, to_connector, self.chunk)
            to_hub = self.connector.data_to_send()
            if to_hub:
                hub_new += feed(self.hub, to_hub, self.chunk)
            if not to_connector and not to_hub:
                break
        else:
            raise AssertionError("the two peers never went quiet")
        self.hub_events += hub_new
        self.connector_events += connector_new
        return hub_new, connector_new

    def open_accepted(self, target: HostPort = TARGET, trace_id: str = "trace-1") -> int:
        """Open a tunneled connection and accept it; returns its stream id."""
        stream_id = self.hub.open_stream(target, trace_id)
        self.pump()
        assert self.connector.accept(stream_id) == (b"", 0)
        hub_events, _ = self.pump()
        assert StreamAccepted(stream_id) in hub_events
        return stream_id


def significant(events: list[Event]) -> list[Event]:
    """Drop WindowOpened (window bookkeeping that comes with every settings exchange)."""
    return [event for event in events if not isinstance(event, WindowOpened)]


def merged(events: list[Event]) -> list[Event]:
    """Merge consecutive DataReceived of one stream (how data is cut into frames is not in the contract)."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, DataReceived) and isinstance(last, DataReceived) and last.stream_id == event.stream_id:
            out[-1] = DataReceived(event.stream_id, last.data + event.data, last.flow_length + event.flow_length)
        else:
            out.append(event)
    return out


def data_of(events: list[Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


def acknowledge_all(side: TunnelConnection, events: list[Event]) -> None:
    for event in events:
        if isinstance(event, DataReceived):
            side.acknowledge(event.stream_id, event.flow_length)


def of_type(events: list[Event], kind: type) -> list[Event]:
    return [event for event in events if isinstance(event, kind)]


# -- transcripts: tunneled connections -----------------------------------------------------------------------


def test_settings_exchange_leaves_both_sides_quiet_and_ready() -> None:
    pair = Pair()
    assert significant(pair.hub_events) == []
    assert significant(pair.connector_events) == []
    assert pair.hub.can_open_stream()


def test_connect_is_requested_then_accepted() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "trace-42")
    hub_events, connector_events = pair.pump()
    assert significant(connector_events) == [ConnectRequested(stream_id, TARGET, "trace-42")]
    assert significant(hub_events) == []
    assert pair.connector.accept(stream_id) == (b"", 0)
    hub_events, connector_events = pair.pump()
    assert significant(hub_events) == [StreamAccepted(stream_id)]
    assert significant(connector_events) == []


def test_ipv6_target_travels_in_brackets() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(HostPort("::1", 993), "t")
    _, connector_events = pair.pump()
    assert significant(connector_events) == [ConnectRequested(stream_id, HostPort("::1", 993), "t")]


def test_trace_id_is_made_printable_and_short() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "tr\u00e4ce\r\n" + "x" * 100)
    _, connector_events = pair.pump()
    (requested,) = of_type(connector_events, ConnectRequested)
    assert isinstance(requested, ConnectRequested)
    assert requested.stream_id == stream_id
    assert requested.trace_id == ("tr?ce??" + "x" * 100)[:64]


def test_data_flows_both_ways() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    assert pair.connector.send_data(stream_id, b"* OK IMAP4rev1 ready\r\n") == 22
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [DataReceived(stream_id, b"* OK IMAP4rev1 ready\r\n", 22)]
    assert pair.hub.send_data(stream_id, memoryview(b"a1 CAPABILITY\r\n")) == 15
    _, connector_events = pair.pump()
    assert significant(connector_events) == [DataReceived(stream_id, b"a1 CAPABILITY\r\n", 15)]


def test_streams_are_independent() -> None:
    pair = Pair()
    first = pair.open_accepted(trace_id="one")
    second = pair.open_accepted(HostPort("smtp.corp", 25), "two")
    assert first != second
    pair.hub.send_data(second, b"EHLO cloud\r\n")
    pair.hub.send_data(first, b"a1 NOOP\r\n")
    _, connector_events = pair.pump()
    assert data_of(connector_events, first) == b"a1 NOOP\r\n"
    assert data_of(connector_events, second) == b"EHLO cloud\r\n"


def test_hub_half_close_leaves_the_connector_sending() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    pair.hub.end_stream(stream_id)
    _, connector_events = pair.pump()
    assert significant(connector_events) == [StreamEnded(stream_id)]
    assert pair.connector.send_data(stream_id, b"* BYE\r\n") == 7
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [DataReceived(stream_id, b"* BYE\r\n", 7)]
    pair.connector.end_stream(stream_id)
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [StreamEnded(stream_id)]


def test_connector_half_close_leaves_the_hub_sending() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    pair.connector.end_stream(stream_id)
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [StreamEnded(stream_id)]
    assert pair.hub.send_data(stream_id, b"QUIT\r\n") == 6
    _, connector_events = pair.pump()
    assert significant(connector_events) == [DataReceived(stream_id, b"QUIT\r\n", 6)]
    pair.hub.end_stream(stream_id)
    _, connector_events = pair.pump()
    assert significant(connector_events) == [StreamEnded(stream_id)]


def test_end_stream_twice_and_on_unknown_streams_is_ignored() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    pair.hub.end_stream(stream_id)
    pair.hub.end_stream(stream_id)
    pair.hub.end_stream(99)
    _, connector_events = pair.pump()
    assert significant(connector_events) == [StreamEnded(stream_id)]


@pytest.mark.parametrize("how", ["fin", "reset", "peer-reset"])
def test_send_window_is_zero_once_we_cannot_send(how: str) -> None:
    """``send_window`` is what ``send_data`` can send now (its docstring: 0 when closed)."""
    pair = Pair()
    stream_id = pair.open_accepted()
    if how == "fin":
        pair.hub.end_stream(stream_id)
    elif how == "reset":
        pair.hub.reset(stream_id)
    else:
        pair.connector.reset(stream_id)
    pair.pump()
    assert pair.hub.send_window(stream_id) == 0


@pytest.mark.parametrize("who", ["hub", "connector"])
def test_reset_aborts_the_stream_on_the_peer(who: str) -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    side = pair.hub if who == "hub" else pair.connector
    side.reset(stream_id)
    side.reset(stream_id)  # a second reset is ignored
    hub_events, connector_events = pair.pump()
    peer_events = connector_events if who == "hub" else hub_events
    assert significant(peer_events) == [StreamReset(stream_id, h2.errors.ErrorCodes.CANCEL)]


def test_reset_of_an_unknown_stream_is_ignored() -> None:
    pair = Pair()
    pair.hub.reset(41)
    pair.connector.reset(41)
    assert pair.pump() == ([], [])


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_every_refusal_reaches_the_hub_with_reason_and_message(reason: str) -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.pump()
    pair.connector.refuse(stream_id, reason, f"refused because {reason}")
    hub_events, _ = pair.pump()
    refusals = of_type(hub_events, StreamRefusal)
    assert refusals == [StreamRefusal(stream_id, reason, f"refused because {reason}")]
    assert not of_type(hub_events, StreamAccepted)


@pytest.mark.parametrize(
    ("reason", "reply"),
    [
        ("not-allowed", 0x02),
        ("host-unreachable", 0x04),
        ("timeout", 0x04),
        ("backend-tls", 0x01),
        ("backend-closed", 0x01),
        ("no-such-reason", 0x01),
        ("", 0x01),
    ],
)
def test_socks_reply_for_follows_the_design_table(reason: str, reply: int) -> None:
    assert socks_reply_for(reason) == reply


def test_refusal_with_an_unknown_reason_still_reaches_the_hub() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.pump()
    pair.connector.refuse(stream_id, "quota-exceeded", "too many")
    hub_events, _ = pair.pump()
    assert of_type(hub_events, StreamRefusal) == [StreamRefusal(stream_id, "quota-exceeded", "too many")]
    assert socks_reply_for("quota-exceeded") == 0x01


def test_refusal_message_is_made_printable() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.pump()
    pair.connector.refuse(stream_id, "not-allowed", "no mapping\r\nfor m\u00e4il")
    hub_events, _ = pair.pump()
    assert of_type(hub_events, StreamRefusal) == [StreamRefusal(stream_id, "not-allowed", "no mapping??for m?il")]


def send_raw_connect(hub: TunnelConnection, authority: bytes) -> int:
    """A CONNECT with any authority (the public API cannot build a bad one: HostPort prints host:port)."""
    stream_id: int = hub._h2.get_next_available_stream_id()
    hub._h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", authority)])
    return stream_id


@pytest.mark.parametrize(
    "authority",
    [
        b"no-port",
        b"bad host:1",
        b"mail.corp:0",
        b"mail.corp:65536",
        b"mail.corp:imap",
        b"[::1",
        b"::1:143",
        b":143",
    ],
)
def test_connect_with_an_invalid_authority_is_refused_as_bad_request(authority: bytes) -> None:
    pair = Pair()
    stream_id = send_raw_connect(pair.hub, authority)
    hub_events, connector_events = pair.pump()
    assert not of_type(connector_events, ConnectRequested)
    (refusal,) = of_type(hub_events, StreamRefusal)
    assert isinstance(refusal, StreamRefusal)
    assert (refusal.stream_id, refusal.reason) == (stream_id, "bad-request")
    assert authority.decode() in refusal.message  # the message names the offending value
    assert socks_reply_for(refusal.reason) == 0x01


def test_invalid_connect_reset_in_the_same_read_does_not_break_the_session() -> None:
    """The hub gives up at once (its SOCKS client left): CONNECT and RST_STREAM arrive in one read."""
    pair = Pair()
    stream_id = pair.hub.open_stream(HostPort("bad host", 1), "t")
    pair.hub.reset(stream_id)
    _, connector_events = pair.pump()
    assert not of_type(connector_events, ConnectRequested)
    assert pair.open_accepted() > stream_id  # the session goes on


def test_unknown_control_request_reset_in_the_same_read_does_not_break_the_session() -> None:
    pair = Pair()
    stream_id = pair.hub.request("GET", "/v1/nothing-here")
    pair.hub.reset(stream_id)
    _, connector_events = pair.pump()
    assert not of_type(connector_events, ControlRequested)
    assert pair.open_accepted() > stream_id


# -- data before accept --------------------------------------------------------------------------------------


def test_data_sent_before_accept_is_returned_by_accept() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.hub.send_data(stream_id, b"EHLO ")
    pair.pump()
    pair.hub.send_data(stream_id, b"cloud\r\n")
    _, connector_events = pair.pump()
    assert of_type(connector_events, DataReceived) == []  # held until the internal host is connected
    early, flow = pair.connector.accept(stream_id)
    assert (early, flow) == (b"EHLO cloud\r\n", 12)
    pair.connector.acknowledge(stream_id, flow)
    pair.hub.send_data(stream_id, b"MAIL FROM:<a@b>\r\n")
    hub_events, connector_events = pair.pump()
    assert StreamAccepted(stream_id) in hub_events
    assert significant(connector_events) == [DataReceived(stream_id, b"MAIL FROM:<a@b>\r\n", 17)]


def test_data_and_fin_before_accept() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.hub.send_data(stream_id, b"QUIT\r\n")
    pair.hub.end_stream(stream_id)
    _, connector_events = pair.pump()
    assert StreamEnded(stream_id) in connector_events
    assert pair.connector.accept(stream_id) == (b"QUIT\r\n", 6)


def test_data_before_accept_counts_against_the_window_until_acknowledged() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.pump()
    payload = random.Random(1).randbytes(STREAM_WINDOW + 1000)
    assert pair.hub.send_data(stream_id, payload) == STREAM_WINDOW
    pair.pump()
    early, flow = pair.connector.accept(stream_id)
    assert (early, flow) == (payload[:STREAM_WINDOW], STREAM_WINDOW)
    pair.pump()
    assert pair.hub.send_window(stream_id) == 0
    pair.connector.acknowledge(stream_id, flow)
    hub_events, _ = pair.pump()
    assert WindowOpened(stream_id) in hub_events
    assert pair.hub.send_data(stream_id, payload[STREAM_WINDOW:]) == 1000


def test_refusal_discards_data_sent_before_it() -> None:
    pair = Pair()
    stream_id = pair.hub.open_stream(TARGET, "t")
    pair.hub.send_data(stream_id, b"early bytes")
    pair.pump()
    pair.connector.refuse(stream_id, "host-unreachable", "connection refused by 10.0.0.5:143")
    hub_events, connector_events = pair.pump()
    assert of_type(hub_events, StreamRefusal) == [
        StreamRefusal(stream_id, "host-unreachable", "connection refused by 10.0.0.5:143")
    ]
    assert of_type(connector_events, DataReceived) == []


# -- control requests ----------------------------------------------------------------------------------------


def test_get_info_is_requested_and_answered() -> None:
    pair = Pair()
    stream_id = pair.hub.request("GET", "/v1/info")
    _, connector_events = pair.pump()
    assert of_type(connector_events, ControlRequested) == [ControlRequested(stream_id, "GET", "/v1/info", b"")]
    pair.connector.answer(stream_id, 200, b'{"version": "0.1.0"}')
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [ControlAnswered(stream_id, 200, b'{"version": "0.1.0"}')]


def test_get_control_request_is_one_event_only() -> None:
    """A control request is a ControlRequested, nothing else (a POST gives exactly that too)."""
    pair = Pair()
    stream_id = pair.hub.request("GET", "/v1/info")
    _, connector_events = pair.pump()
    assert significant(connector_events) == [ControlRequested(stream_id, "GET", "/v1/info", b"")]


def test_post_check_carries_its_body() -> None:
    pair = Pair()
    body = b'{"virtual_host": "mail.corp:143"}'
    stream_id = pair.hub.request("POST", "/v1/check", body)
    _, connector_events = pair.pump()
    assert significant(connector_events) == [ControlRequested(stream_id, "POST", "/v1/check", body)]
    pair.connector.answer(stream_id, 200, b'{"reachable": false, "error": "timeout"}')
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [ControlAnswered(stream_id, 200, b'{"reachable": false, "error": "timeout"}')]


def test_control_bodies_larger_than_one_frame_travel_whole() -> None:
    """Bodies up to MAX_CONTROL_BODY are allowed; /v1/info with many mappings is bigger than one frame."""
    pair = Pair()
    request_body = b'{"pad": "' + b"r" * (MAX_FRAME_SIZE + 100) + b'"}'
    stream_id = pair.hub.request("POST", "/v1/check", request_body)
    _, connector_events = pair.pump()
    assert of_type(connector_events, ControlRequested) == [
        ControlRequested(stream_id, "POST", "/v1/check", request_body)
    ]
    answer_body = b'{"mappings": "' + b"m" * (3 * MAX_FRAME_SIZE) + b'"}'
    pair.connector.answer(stream_id, 200, answer_body)
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [ControlAnswered(stream_id, 200, answer_body)]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nothing"), ("DELETE", "/v1/info"), ("GET", "/")])
def test_unknown_control_request_is_answered_404(method: str, path: str) -> None:
    pair = Pair()
    stream_id = pair.hub.request(method, path)
    hub_events, connector_events = pair.pump()
    assert not of_type(connector_events, ControlRequested)
    (answer,) = of_type(hub_events, ControlAnswered)
    assert isinstance(answer, ControlAnswered)
    assert (answer.stream_id, answer.status) == (stream_id, 404)
    assert b"unknown control request" in answer.body


def test_control_and_tunnel_streams_mix() -> None:
    pair = Pair()
    tunnel = pair.open_accepted()
    control = pair.hub.request("GET", "/v1/info")
    pair.hub.send_data(tunnel, b"a2 NOOP\r\n")
    _, connector_events = pair.pump()
    assert ControlRequested(control, "GET", "/v1/info", b"") in connector_events
    assert data_of(connector_events, tunnel) == b"a2 NOOP\r\n"
    pair.connector.answer(control, 200, b"{}")
    pair.connector.send_data(tunnel, b"a2 OK\r\n")
    hub_events, _ = pair.pump()
    assert ControlAnswered(control, 200, b"{}") in hub_events
    assert data_of(hub_events, tunnel) == b"a2 OK\r\n"


# -- drain, ping, close --------------------------------------------------------------------------------------


def test_drain_stops_new_streams_but_running_ones_go_on() -> None:
    pair = Pair()
    running = pair.open_accepted()
    assert pair.hub.can_open_stream()
    pair.connector.drain()
    hub_events, _ = pair.pump()
    assert significant(hub_events) == [DrainRequested()]
    assert not pair.hub.can_open_stream()
    with pytest.raises(TunnelProtocolError):
        pair.hub.open_stream(TARGET, "too-late")
    pair.hub.send_data(running, b"a3 LOGOUT\r\n")
    pair.connector.send_data(running, b"* BYE\r\n")
    hub_events, connector_events = pair.pump()
    assert data_of(connector_events, running) == b"a3 LOGOUT\r\n"
    assert data_of(hub_events, running) == b"* BYE\r\n"


@pytest.mark.parametrize(
    ("payload", "answered"),
    [(b"abc", b"abc\0\0\0\0\0"), (b"12345678", b"12345678"), (b"123456789", b"12345678")],
)
def test_ping_is_answered_with_its_payload(payload: bytes, answered: bytes) -> None:
    pair = Pair()
    pair.hub.ping(payload)
    hub_events, connector_events = pair.pump()
    assert significant(hub_events) == [PingAnswered(answered)]
    assert significant(connector_events) == []
    pair.connector.ping(payload)
    hub_events, connector_events = pair.pump()
    assert significant(connector_events) == [PingAnswered(answered)]
    assert significant(hub_events) == []


@pytest.mark.parametrize("who", ["hub", "connector"])
def test_close_ends_the_session_on_the_peer(who: str) -> None:
    pair = Pair()
    side = pair.hub if who == "hub" else pair.connector
    side.close("shutting down\nnow")
    hub_events, connector_events = pair.pump()
    peer_events = connector_events if who == "hub" else hub_events
    assert significant(peer_events) == [SessionEnded(h2.errors.ErrorCodes.NO_ERROR, "shutting down?now")]


# -- flow control --------------------------------------------------------------------------------------------


def test_a_full_size_frame_is_accepted() -> None:
    """Both sides announce MAX_FRAME_SIZE, so a DATA frame of that size is legal and must arrive."""
    pair = Pair()
    stream_id = pair.open_accepted()
    payload = bytes(range(256)) * (MAX_FRAME_SIZE // 256)
    assert pair.hub.send_data(stream_id, payload) == MAX_FRAME_SIZE
    _, connector_events = pair.pump()
    assert data_of(connector_events, stream_id) == payload
    assert pair.connector.send_data(stream_id, payload) == MAX_FRAME_SIZE
    hub_events, _ = pair.pump()
    assert data_of(hub_events, stream_id) == payload


def test_send_data_never_exceeds_the_stream_window() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    payload = random.Random(2).randbytes(STREAM_WINDOW + 5000)
    assert pair.hub.send_window(stream_id) == STREAM_WINDOW
    assert pair.hub.send_data(stream_id, payload) == STREAM_WINDOW
    assert pair.hub.send_window(stream_id) == 0
    assert pair.hub.send_data(stream_id, payload[STREAM_WINDOW:]) == 0
    _, connector_events = pair.pump()
    assert data_of(connector_events, stream_id) == payload[:STREAM_WINDOW]
    assert merged(significant(connector_events)) == [DataReceived(stream_id, payload[:STREAM_WINDOW], STREAM_WINDOW)]


def test_window_stays_closed_without_acknowledgement_and_reopens_after_it() -> None:
    pair = Pair()
    stream_id = pair.open_accepted()
    payload = random.Random(3).randbytes(STREAM_WINDOW + 5000)
    assert pair.hub.send_data(stream_id, payload) == STREAM_WINDOW
    _, connector_events = pair.pump()
    for _ in range(3):  # no acknowledgement: nothing reopens the window, however long we wait
        hub_events, _ = pair.pump()
        assert WindowOpened(stream_id) not in hub_events
        assert pair.hub.send_window(stream_id) == 0
        assert pair.hub.send_data(stream_id, payload[STREAM_WINDOW:]) == 0
    acknowledge_all(pair.connector, connector_events)
    hub_events, _ = pair.pump()
    assert WindowOpened(stream_id) in hub_events
    assert pair.hub.send_window(stream_id) >= STREAM_WINDOW // 2  # h2 returns window in batches
    assert pair.hub.send_data(stream_id, payload[STREAM_WINDOW:]) == 5000
    _, connector_events = pair.pump()
    assert data_of(connector_events, stream_id) == payload[STREAM_WINDOW:]


def test_one_stream_full_does_not_block_another() -> None:
    pair = Pair()
    full = pair.open_accepted()
    other = pair.open_accepted(trace_id="other")
    assert pair.hub.send_data(full, bytes(STREAM_WINDOW + 1)) == STREAM_WINDOW
    pair.pump()
    assert pair.hub.send_data(other, b"still flowing") == 13
    _, connector_events = pair.pump()
    assert data_of(connector_events, other) == b"still flowing"


def _stream_through(pair: Pair, sender: TunnelConnection, receiver: TunnelConnection, total: int) -> tuple[str, str]:
    """Send ``total`` pseudo-random bytes in 64 KiB chunks, acknowledged on receipt; returns both digests."""
    chunk = 64 * 1024
    block = random.Random(7).randbytes(1 << 20)
    ring = memoryview(block + block[:chunk])
    stream_id = pair.open_accepted()
    sent_digest, received_digest = hashlib.sha256(), hashlib.sha256()
    sent = received = number = 0
    pending = ring[:0]

    def deliver() -> None:
        nonlocal received
        for event in receiver.receive_data(sender.data_to_send()):
            if isinstance(event, DataReceived):
                assert event.stream_id == stream_id
                received_digest.update(event.data)
                received += len(event.data)
                receiver.acknowledge(event.stream_id, event.flow_length)
        sender.receive_data(receiver.data_to_send())

    while sent < total:
        if not pending:
            start = (number * 65_537) % len(block)  # chunks that do not repeat with the 64 KiB period
            pending = ring[start : start + min(chunk, total - sent)]
            number += 1
        taken = sender.send_data(stream_id, pending)
        sent_digest.update(pending[:taken])
        sent += taken
        pending = pending[taken:]
        if taken == 0 or number % 16 == 0:
            deliver()
    deliver()
    assert (sent, received) == (total, total)
    return sent_digest.hexdigest(), received_digest.hexdigest()


def test_100_mib_hub_to_connector_keeps_its_sha256() -> None:
    pair = Pair()
    sent, received = _stream_through(pair, pair.hub, pair.connector, 100 * 1024 * 1024)
    assert sent == received


def test_16_mib_connector_to_hub_keeps_its_sha256() -> None:
    pair = Pair()
    sent, received = _stream_through(pair, pair.connector, pair.hub, 16 * 1024 * 1024)
    assert sent == received


# -- role rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "command", "call"),
    [
        (Role.CONNECTOR, "open_stream", lambda c: c.open_stream(TARGET, "t")),
        (Role.CONNECTOR, "request", lambda c: c.request("GET", "/v1/info")),
        (Role.HUB, "accept", lambda c: c.accept(1)),
        (Role.HUB, "refuse", lambda c: c.refuse(1, "not-allowed", "no")),
        (Role.HUB, "answer", lambda c: c.answer(1, 200, b"{}")),
        (Role.HUB, "drain", lambda c: c.drain()),
    ],
)
def test_commands_of_the_other_role_are_refused(
    role: Role, command: str, call: Callable[[TunnelConnection], object]
) -> None:
    connection = TunnelConnection(role)
    connection.initiate()
    with pytest.raises(TunnelProtocolError) as caught:
        call(connection)
    assert command in str(caught.value)
    assert role.value in str(caught.value)


def test_accept_of_a_stream_that_was_never_requested_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(TunnelProtocolError):
        pair.connector.accept(7)


# -- the same transcript, one byte at a time -----------------------------------------------------------------


def scripted_session(pair: Pair) -> None:
    """Every kind of exchange once, with commands that do not depend on how the bytes were cut."""
    hub, connector = pair.hub, pair.connector
    tunnel = hub.open_stream(TARGET, "bytewise")
    hub.send_data(tunnel, b"a1 CAPABILITY\r\n")  # before accept
    pair.pump()
    _, flow = connector.accept(tunnel)
    connector.acknowledge(tunnel, flow)
    connector.send_data(tunnel, b"* OK IMAP4rev1 ready\r\n" * 60)
    hub.send_data(tunnel, bytes(range(256)) * 40)
    hub_events, connector_events = pair.pump()
    acknowledge_all(pair.hub, hub_events)
    acknowledge_all(pair.connector, connector_events)
    hub.end_stream(tunnel)
    pair.pump()
    connector.send_data(tunnel, b"* BYE\r\n")
    connector.end_stream(tunnel)
    info = hub.request("GET", "/v1/info")
    check = hub.request("POST", "/v1/check", b'{"virtual_host": "mail.corp:143"}')
    unknown = hub.request("GET", "/v1/unknown")
    pair.pump()
    connector.answer(info, 200, b'{"version": "0.1.0"}')
    connector.answer(check, 200, b'{"reachable": true}')
    refused = hub.open_stream(HostPort("other.corp", 25), "refused")
    bad = hub.open_stream(HostPort("bad host", 1), "bad")
    pair.pump()
    connector.refuse(refused, "not-allowed", "no mapping for other.corp:25")
    aborted = hub.open_stream(TARGET, "aborted")
    pair.pump()
    connector.accept(aborted)
    pair.pump()
    hub.reset(aborted)
    hub.ping(b"bytewise")
    connector.ping(b"other")
    pair.pump()
    connector.drain()
    pair.pump()
    connector.close("done")
    pair.pump()
    assert unknown and bad  # their answers come from the connector core itself


@pytest.mark.parametrize("chunk", [1, 5])
def test_byte_at_a_time_gives_the_same_events(chunk: int) -> None:
    whole = Pair()
    scripted_session(whole)
    cut = Pair(chunk=chunk)
    scripted_session(cut)
    kinds = {type(event) for event in whole.hub_events + whole.connector_events}
    assert {
        ConnectRequested,
        StreamAccepted,
        DataReceived,
        StreamEnded,
        ControlRequested,
        ControlAnswered,
    } <= kinds
    assert {StreamRefusal, StreamReset, PingAnswered, DrainRequested, SessionEnded} <= kinds
    assert merged(cut.hub_events) == merged(whole.hub_events)
    assert merged(cut.connector_events) == merged(whole.connector_events)


# -- fuzzing -------------------------------------------------------------------------------------------------


@functools.cache
def hub_preface() -> bytes:
    hub = TunnelConnection(Role.HUB)
    hub.initiate()
    return hub.data_to_send()


@functools.cache
def connector_preface() -> bytes:
    connector = TunnelConnection(Role.CONNECTOR)
    connector.initiate()
    return connector.data_to_send()


def fresh_connector(preface: bytes) -> TunnelConnection:
    connector = TunnelConnection(Role.CONNECTOR)
    connector.initiate()
    connector.receive_data(preface)
    return connector


def fresh_hub() -> tuple[TunnelConnection, int, int]:
    """A hub with a CONNECT and a control request in flight, so that fuzzed answers have a stream."""
    hub = TunnelConnection(Role.HUB)
    hub.initiate()
    tunnel = hub.open_stream(TARGET, "fuzz")
    control = hub.request("GET", "/v1/info")
    hub.data_to_send()
    return hub, tunnel, control


def survive(side: TunnelConnection, data: bytes) -> None:
    """Feed fuzz; only TunnelProtocolError may escape. The connector also acts on what it is asked."""
    try:
        events = side.receive_data(data)
        for event in events:
            if isinstance(event, ConnectRequested):
                side.accept(event.stream_id)
            elif isinstance(event, ControlRequested):
                side.answer(event.stream_id, 200, b"{}")
            elif isinstance(event, DataReceived):
                side.acknowledge(event.stream_id, event.flow_length)
        side.data_to_send()
    except TunnelProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_connector_after_a_valid_preface(data: bytes) -> None:
    survive(fresh_connector(hub_preface()), data)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_connector_without_preface(data: bytes) -> None:
    survive(fresh_connector(b""), data)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_hub(data: bytes) -> None:
    hub, _, _ = fresh_hub()
    survive(hub, data)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_hub_after_a_valid_preface(data: bytes) -> None:
    hub, _, _ = fresh_hub()
    hub.receive_data(connector_preface())
    survive(hub, data)


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame by hand: 24-bit length, type, flags, 32-bit stream id (reserved bit included)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


HEADER_NAMES = [
    b":status",
    b":method",
    b":path",
    b":authority",
    b":scheme",
    b"postbridge-error",
    b"content-length",
]
HEADER_VALUES = [
    b"200",
    b"404",
    b"abc",
    b"",
    b"CONNECT",
    b"GET",
    b"/v1/info",
    b"mail.corp:143",
    b"no-port",
    b"99999",
]
header_blocks = st.lists(
    st.tuples(
        st.sampled_from(HEADER_NAMES) | st.binary(min_size=1, max_size=10),
        st.sampled_from(HEADER_VALUES) | st.binary(max_size=20),
    ),
    max_size=6,
).map(lambda headers: hpack.Encoder().encode(headers))

frames = st.builds(
    frame,
    kind=st.integers(0, 10) | st.integers(0, 255),
    flags=st.sampled_from([0x0, 0x1, 0x4, 0x5, 0x8, 0x20]) | st.integers(0, 255),
    stream_id=st.sampled_from([0, 1, 2, 3, 5, 0x80000001]) | st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=64) | header_blocks,
)


@FUZZ
@given(st.lists(frames, max_size=8))
def test_fuzz_connector_with_hand_built_frames(fuzz_frames: list[bytes]) -> None:
    survive(fresh_connector(hub_preface()), b"".join(fuzz_frames))


@FUZZ
@given(st.lists(frames, max_size=8))
def test_fuzz_hub_with_hand_built_frames(fuzz_frames: list[bytes]) -> None:
    hub, _, _ = fresh_hub()
    survive(hub, connector_preface() + b"".join(fuzz_frames))


def headers_frame(stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> bytes:
    return frame(0x1, 0x4 | int(end_stream), stream_id, hpack.Encoder().encode(headers))


text = st.sampled_from(HEADER_VALUES) | st.binary(max_size=12)
extra_headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES[5:]) | st.binary(min_size=1, max_size=8), text))


@FUZZ
@given(
    status=text,
    extra=extra_headers,
    to_control=st.booleans(),
    end_stream=st.booleans(),
    body=st.binary(max_size=30),
)
def test_fuzz_hub_with_odd_answers(
    status: bytes, extra: list[tuple[bytes, bytes]], to_control: bool, end_stream: bool, body: bytes
) -> None:
    """Well-framed answers with odd header values: the hub must refuse them as a protocol error, not crash."""
    hub, tunnel, control = fresh_hub()
    stream_id = control if to_control else tunnel
    answer = headers_frame(stream_id, [(b":status", status), *extra], end_stream)
    if not end_stream:
        answer += frame(0x0, 0x1, stream_id, body)
    survive(hub, connector_preface() + answer)


@FUZZ
@given(
    method=st.sampled_from([b"CONNECT", b"GET", b"POST"]) | st.binary(max_size=8),
    authority=st.sampled_from(HEADER_VALUES) | st.binary(max_size=24),
    path=st.none() | st.sampled_from([b"/v1/info", b"/v1/check"]) | st.binary(max_size=12),
    extra=extra_headers,
    end_stream=st.booleans(),
    body=st.binary(max_size=30),
)
def test_fuzz_connector_with_odd_requests(
    method: bytes,
    authority: bytes,
    path: bytes | None,
    extra: list[tuple[bytes, bytes]],
    end_stream: bool,
    body: bytes,
) -> None:
    """Well-framed requests with odd authorities and paths: only TunnelProtocolError may escape."""
    headers = [(b":method", method), (b":authority", authority)]
    if path is not None:
        headers += [(b":scheme", b"https"), (b":path", path)]
    request = headers_frame(1, headers + extra, end_stream)
    if not end_stream:
        request += frame(0x0, 0x1, 1, body)
    survive(fresh_connector(hub_preface()), request)


@pytest.mark.parametrize("status", [b"abc", b"2OO", b"\xff\xfe"])
def test_a_non_numeric_status_is_a_protocol_error(status: bytes) -> None:
    """A connector answering ':status: abc' broke the protocol; the hub must say so, not crash."""
    hub = TunnelConnection(Role.HUB)
    hub.initiate()
    stream_id = hub.open_stream(TARGET, "t")
    rogue = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    rogue.initiate_connection()
    rogue.receive_data(hub.data_to_send())
    hub.receive_data(rogue.data_to_send())
    rogue.send_headers(stream_id, [(b":status", status)])
    with pytest.raises(TunnelProtocolError):
        hub.receive_data(rogue.data_to_send())


@pytest.mark.parametrize("role", [Role.CONNECTOR, Role.HUB])
def test_an_oversized_frame_is_a_protocol_error(role: Role) -> None:
    if role is Role.CONNECTOR:
        side = fresh_connector(hub_preface())
    else:
        side, _, _ = fresh_hub()
        side.receive_data(connector_preface())
    with pytest.raises(TunnelProtocolError):
        side.receive_data(frame(0, 0, 1, bytes(MAX_FRAME_SIZE + 1)))


@pytest.mark.parametrize("role", [Role.HUB, Role.CONNECTOR])
def test_an_oversized_frame_is_refused_at_its_header_without_waiting_for_the_body(role: Role) -> None:
    """h2 alone would buffer up to 16 MiB before checking the length; the header must be enough."""
    connection = TunnelConnection(role)
    connection.initiate()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if role is Role.CONNECTOR else b""
    with pytest.raises(TunnelProtocolError, match="frame of 16777215 bytes announced"):
        connection.receive_data(preface + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
