"""Tests of the sans-I/O SOCKS5 server: transcripts, byte-at-a-time feeding, fuzzing and real clients."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from postbridge.errors import SocksProtocolError
from postbridge.socks.server import (
    AddressType,
    ConnectRequested,
    Event,
    JwtAuthRequested,
    PasswordAuthRequested,
    PayloadReceived,
    Reply,
    Socks5Server,
    State,
)

# -- wire builders --

GREET_PASSWORD = b"\x05\x02\x00\x02"  # offers no-auth and username/password
GREET_ALL = b"\x05\x03\x00\x02\x80"  # offers no-auth, username/password and JWT
AUTH_ACME = b"\x01\x04acme\x06secret"
NULL_BOUND = b"\x01\x00\x00\x00\x00\x00\x00"  # ATYP IPv4 0.0.0.0 port 0


def jwt_auth(token: bytes, location: bytes) -> bytes:
    return b"\x01" + len(token).to_bytes(4, "big") + token + bytes([len(location)]) + location


def connect(atyp: int, address: bytes, port: int, *, command: int = 1) -> bytes:
    if atyp == 3:
        address = bytes([len(address)]) + address
    return bytes([5, command, 0, atyp]) + address + port.to_bytes(2, "big")


def connect_domain(host: bytes, port: int = 143) -> bytes:
    return connect(3, host, port)


def reply_bytes(code: int, bound: bytes = NULL_BOUND) -> bytes:
    return bytes([5, code, 0]) + bound


# -- driver --


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    sent: bytes = b""
    state: State = State.GREETING
    error: str | None = None
    close_reason: str = ""


def drive(
    chunks: Sequence[bytes],
    *,
    accept: bool = True,
    code: Reply = Reply.SUCCEEDED,
    bound: tuple[str, int] = ("0.0.0.0", 0),
) -> Outcome:
    """Feed chunks like a listener would: decide on each decision event, then collect what was buffered."""
    server = Socks5Server()
    outcome = Outcome()
    sent = bytearray()
    try:
        for chunk in chunks:
            pending = server.receive_data(chunk)
            while pending:
                event = pending.pop(0)
                outcome.events.append(event)
                if isinstance(event, PasswordAuthRequested | JwtAuthRequested):
                    assert not pending, "a decision event must be the last one"
                    server.accept_auth() if accept else server.reject_auth()
                    pending = server.receive_data(b"")
                elif isinstance(event, ConnectRequested):
                    assert not pending, "a decision event must be the last one"
                    server.reply(code, bound)
                    pending = server.receive_data(b"")
            sent += server.data_to_send()
            assert server.closed is (server.state is State.CLOSED)
    except SocksProtocolError as error:
        outcome.error = str(error)
        assert server.state is State.CLOSED and server.closed
    sent += server.data_to_send()
    outcome.sent, outcome.state, outcome.close_reason = bytes(sent), server.state, server.close_reason
    return outcome


def merged(events: list[Event]) -> list[Event]:
    """Join neighbouring PayloadReceived events: their split depends on how the bytes arrived."""
    result: list[Event] = []
    for event in events:
        if isinstance(event, PayloadReceived) and result and isinstance(result[-1], PayloadReceived):
            result[-1] = PayloadReceived(result[-1].data + event.data)
        else:
            result.append(event)
    return result


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- transcripts --


@dataclass(frozen=True)
class Transcript:
    name: str
    chunks: tuple[bytes, ...]
    events: tuple[Event, ...]
    sent: bytes
    state: State
    accept: bool = True
    code: Reply = Reply.SUCCEEDED
    bound: tuple[str, int] = ("0.0.0.0", 0)
    reason: str = ""  # expected part of close_reason


MAIL = ConnectRequested("mail.corp.example", 143, AddressType.DOMAIN)
PW_EVENT = PasswordAuthRequested("acme", "secret")
PW_OK = b"\x05\x02\x01\x00"

TRANSCRIPTS = [
    Transcript(
        "userpass-ok",
        (GREET_PASSWORD, AUTH_ACME, connect_domain(b"mail.corp.example"), b"a1 LOGIN"),
        (PW_EVENT, MAIL, PayloadReceived(b"a1 LOGIN")),
        PW_OK + reply_bytes(0),
        State.RELAYING,
    ),
    Transcript(
        "userpass-rejected",
        (GREET_PASSWORD, AUTH_ACME, connect_domain(b"mail.corp.example")),
        (PW_EVENT,),
        b"\x05\x02\x01\x01",
        State.CLOSED,
        accept=False,
        reason="authentication rejected",
    ),
    Transcript(
        "jwt-base64-location",
        (GREET_ALL, jwt_auth(b"eyJ.a.b", base64.b64encode(b"dc1")), connect_domain(b"MAIL.corp.example.")),
        (JwtAuthRequested("eyJ.a.b", "dc1"), MAIL),
        b"\x05\x80\x01\x00" + reply_bytes(0),
        State.RELAYING,
    ),
    Transcript(
        "jwt-raw-location",
        (GREET_ALL, jwt_auth(b"eyJ.a.b", b"dc-1"), connect_domain(b"mail.corp.example")),
        (JwtAuthRequested("eyJ.a.b", "dc-1"), MAIL),
        b"\x05\x80\x01\x00" + reply_bytes(0),
        State.RELAYING,
    ),
    Transcript(
        "jwt-no-location",
        (b"\x05\x01\x80", jwt_auth(b"eyJ.a.b", b""), connect_domain(b"mail.corp.example")),
        (JwtAuthRequested("eyJ.a.b", ""), MAIL),
        b"\x05\x80\x01\x00" + reply_bytes(0),
        State.RELAYING,
    ),
    Transcript(
        "jwt-rejected",
        (GREET_ALL, jwt_auth(b"expired", b"ZGMx")),
        (JwtAuthRequested("expired", "dc1"),),
        b"\x05\x80\x01\x01",
        State.CLOSED,
        accept=False,
        reason="authentication rejected",
    ),
    Transcript(
        "no-acceptable-method",
        (b"\x05\x01\x00", AUTH_ACME),
        (),
        b"\x05\xff",
        State.CLOSED,
        reason="client offered no supported authentication method (offered: 00)",
    ),
    Transcript(
        "no-methods-at-all",
        (b"\x05\x00",),
        (),
        b"\x05\xff",
        State.CLOSED,
        reason="(offered: none)",
    ),
    Transcript(
        "bind-not-supported",
        (GREET_PASSWORD, AUTH_ACME, connect(1, b"\x0a\x00\x00\x01", 25, command=2)),
        (PW_EVENT,),
        PW_OK + reply_bytes(0x07),
        State.CLOSED,
        reason="BIND (0x02) is not supported",
    ),
    Transcript(
        "udp-associate-not-supported",
        (GREET_PASSWORD, AUTH_ACME, connect(1, b"\x0a\x00\x00\x01", 25, command=3)),
        (PW_EVENT,),
        PW_OK + reply_bytes(0x07),
        State.CLOSED,
        reason="UDP ASSOCIATE (0x03)",
    ),
    Transcript(
        "bad-address-type",
        (GREET_PASSWORD, AUTH_ACME, connect(5, b"\x0a\x00\x00\x01", 25)),
        (PW_EVENT,),
        PW_OK + reply_bytes(0x08),
        State.CLOSED,
        reason="address type 0x05 is not supported",
    ),
    Transcript(
        "ipv4-connect",
        (GREET_PASSWORD, AUTH_ACME, connect(1, bytes([10, 1, 2, 3]), 993)),
        (PW_EVENT, ConnectRequested("10.1.2.3", 993, AddressType.IPV4)),
        PW_OK + b"\x05\x00\x00\x01\xc0\x00\x02\x07\x04\xd2",
        State.RELAYING,
        bound=("192.0.2.7", 1234),
    ),
    Transcript(
        "ipv6-connect",
        (GREET_PASSWORD, AUTH_ACME, connect(4, bytes.fromhex("20010db8" + "00" * 11 + "01"), 587)),
        (PW_EVENT, ConnectRequested("2001:db8::1", 587, AddressType.IPV6)),
        PW_OK + b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x19",
        State.RELAYING,
        bound=("::1", 25),
    ),
    Transcript(
        "connect-not-allowed",
        (GREET_PASSWORD, AUTH_ACME, connect_domain(b"mail.corp.example"), b"EHLO x\r\n"),
        (PW_EVENT, MAIL),
        PW_OK + reply_bytes(0x02),
        State.CLOSED,
        code=Reply.NOT_ALLOWED,
        reason="CONNECT mail.corp.example:143 answered NOT_ALLOWED (0x02)",
    ),
    Transcript(
        "pipelined-in-one-chunk",
        (GREET_PASSWORD + AUTH_ACME + connect_domain(b"mail.corp.example") + b"a1 CAPABILITY\r\n",),
        (PW_EVENT, MAIL, PayloadReceived(b"a1 CAPABILITY\r\n")),
        PW_OK + reply_bytes(0),
        State.RELAYING,
    ),
    Transcript(
        "payload-with-request-and-after",
        (GREET_PASSWORD, AUTH_ACME + connect_domain(b"mail.corp.example") + b"one ", b"two"),
        (PW_EVENT, MAIL, PayloadReceived(b"one "), PayloadReceived(b"two")),
        PW_OK + reply_bytes(0),
        State.RELAYING,
    ),
]


def _check(outcome: Outcome, case: Transcript) -> None:
    assert outcome.error is None
    assert merged(outcome.events) == merged(list(case.events))
    assert outcome.sent == case.sent
    assert outcome.state is case.state
    assert case.reason in outcome.close_reason


@pytest.mark.parametrize("case", TRANSCRIPTS, ids=lambda case: case.name)
def test_transcript(case: Transcript) -> None:
    outcome = drive(case.chunks, accept=case.accept, code=case.code, bound=case.bound)
    _check(outcome, case)
    assert outcome.events == list(case.events)  # chunk by chunk, not even payload is merged or split


@pytest.mark.parametrize("case", TRANSCRIPTS, ids=lambda case: case.name)
def test_transcript_one_byte_at_a_time(case: Transcript) -> None:
    chunks = one_byte_at_a_time(b"".join(case.chunks))
    _check(drive(chunks, accept=case.accept, code=case.code, bound=case.bound), case)


@pytest.mark.parametrize("code", list(Reply), ids=lambda code: code.name)
def test_every_reply_code_encodes(code: Reply) -> None:
    outcome = drive([GREET_PASSWORD + AUTH_ACME + connect_domain(b"mail.corp.example")], code=code)
    assert outcome.sent == PW_OK + bytes([5, int(code), 0, 1, 0, 0, 0, 0, 0, 0])
    assert outcome.state is (State.RELAYING if code is Reply.SUCCEEDED else State.CLOSED)


def test_payload_sent_before_the_decision_is_delivered_after_succeeded() -> None:
    server = Socks5Server()
    assert server.receive_data(GREET_PASSWORD + AUTH_ACME) == [PW_EVENT]
    assert server.receive_data(b"\x05\x01") == []  # the request waits behind the open decision
    server.accept_auth()
    assert server.receive_data(b"") == []
    assert server.receive_data(connect_domain(b"mail.corp.example")[2:] + b"early") == [MAIL]
    assert server.receive_data(b" bytes") == []
    assert server.state is State.CONNECT_PENDING
    server.reply(Reply.SUCCEEDED)
    assert server.receive_data(b"") == [PayloadReceived(b"early bytes")]
    assert server.receive_data(b"") == []
    assert server.receive_data(b"later") == [PayloadReceived(b"later")]
    assert server.data_to_send() == PW_OK + reply_bytes(0)
    assert server.data_to_send() == b""


def test_buffered_payload_joins_the_next_receive_when_caller_skips_the_empty_call() -> None:
    server = Socks5Server()
    server.receive_data(GREET_PASSWORD + AUTH_ACME)
    server.accept_auth()
    server.receive_data(connect_domain(b"mail.corp.example") + b"A")
    server.reply(Reply.SUCCEEDED)
    assert server.receive_data(b"B") == [PayloadReceived(b"AB")]


# -- protocol errors --

AFTER_AUTH = GREET_PASSWORD + AUTH_ACME
GENERAL_FAILURE_REPLY = PW_OK + reply_bytes(0x01)

ERRORS = [
    ("http", b"GET / HTTP/1.1\r\n", "not a SOCKS5 client: first byte 0x47 ('G') — is an HTTP client", b""),
    ("http-post", b"POST /", "first byte 0x50 ('P') — is an HTTP client pointed at the SOCKS port?", b""),
    ("http-connect", b"CONNECT a:1", "0x43 ('C') — is an HTTP client pointed at the SOCKS port?", b""),
    ("tls", b"\x16\x03\x01\x02\x00", "first byte 0x16 — is a TLS client pointed at the SOCKS port?", b""),
    ("socks4", b"\x04\x01\x00\x19", "first byte 0x04 — the client speaks SOCKS4", b""),
    ("bad-auth-version", GREET_PASSWORD + b"\x05\x04acme", "version 0x05, expected 0x01", b"\x05\x02"),
    ("username-not-utf8", GREET_PASSWORD + b"\x01\x02\xff\xfe\x01x", "username b'\\xff\\xfe'", b"\x05\x02"),
    ("jwt-not-ascii", b"\x05\x01\x80" + jwt_auth(b"\xe9", b""), "JWT is not ASCII", b"\x05\x80"),
    ("jwt-too-long", b"\x05\x01\x80\x01\x00\x00\x40\x01", "JWT of 16385 bytes is longer", b"\x05\x80"),
    ("jwt-bad-version", b"\x05\x01\x80\x02", "JWT (method 0x80) sub-negotiation has version", b"\x05\x80"),
    ("location-binary", b"\x05\x01\x80" + jwt_auth(b"t", b"\x00\xff"), "ID b'\\x00\\xff'", b"\x05\x80"),
    ("request-version", AFTER_AUTH + b"\x04\x01", "request has version 0x04", GENERAL_FAILURE_REPLY),
    ("reserved-byte", AFTER_AUTH + b"\x05\x01\x01", "reserved byte 0x01", GENERAL_FAILURE_REPLY),
    ("empty-domain", AFTER_AUTH + connect_domain(b""), "empty domain", GENERAL_FAILURE_REPLY),
    ("domain-not-ascii", AFTER_AUTH + connect_domain("mäil".encode()), "is not ASCII", GENERAL_FAILURE_REPLY),
    ("domain-invalid", AFTER_AUTH + connect_domain(b"mail corp!"), "'mail corp!'", GENERAL_FAILURE_REPLY),
]


@pytest.mark.parametrize(("name", "data", "message", "sent"), ERRORS, ids=[case[0] for case in ERRORS])
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_protocol_error(name: str, data: bytes, message: str, sent: bytes, split: str) -> None:
    outcome = drive([data] if split == "whole" else one_byte_at_a_time(data))
    assert outcome.error is not None and message in outcome.error
    assert outcome.state is State.CLOSED and outcome.close_reason == outcome.error
    assert outcome.sent == sent


def test_password_never_appears_in_an_error_or_a_repr() -> None:
    server = Socks5Server()
    server.receive_data(GREET_PASSWORD)
    with pytest.raises(SocksProtocolError) as caught:
        server.receive_data(b"\x01\x04acme\x06\xffzqxj9")
    assert "password is not valid UTF-8" in str(caught.value) and "zqxj9" not in str(caught.value)
    assert "secret" not in repr(PW_EVENT) and "acme" in repr(PW_EVENT)
    assert "tok" not in repr(JwtAuthRequested("tok", "dc1"))


def test_error_reply_code_is_known_and_queued() -> None:
    server = Socks5Server()
    server.receive_data(AFTER_AUTH)
    server.accept_auth()
    server.data_to_send()
    with pytest.raises(SocksProtocolError) as caught:
        server.receive_data(b"\x05\x01\x07")
    assert caught.value.reply == Reply.GENERAL_FAILURE
    assert server.data_to_send() == reply_bytes(0x01)
    assert server.receive_data(b"anything") == [] and server.data_to_send() == b""


def test_data_after_closed_is_ignored() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00")
    assert server.closed
    assert server.receive_data(AUTH_ACME + connect_domain(b"mail.corp.example")) == []
    assert server.data_to_send() == b"\x05\xff"


def test_illegal_calls_name_the_state_and_the_call() -> None:
    server = Socks5Server()
    with pytest.raises(SocksProtocolError, match=r"accept_auth\(\) is not allowed in state GREETING"):
        server.accept_auth()
    server.receive_data(AFTER_AUTH)
    with pytest.raises(SocksProtocolError, match=r"reply\(SUCCEEDED\) is not allowed in state AUTH_PENDING"):
        server.reply(Reply.SUCCEEDED)
    server.accept_auth()
    with pytest.raises(SocksProtocolError, match=r"reject_auth\(\) is not allowed in state REQUEST"):
        server.reject_auth()
    server.receive_data(connect_domain(b"mail.corp.example"))
    server.reply(Reply.HOST_UNREACHABLE)
    with pytest.raises(SocksProtocolError, match=r"reply\(failure\) is not allowed in state CLOSED"):
        server.reply(Reply.GENERAL_FAILURE)
    assert server.data_to_send() == PW_OK + reply_bytes(0x04)


def test_bad_bound_address_is_a_caller_error_and_changes_nothing() -> None:
    server = Socks5Server()
    server.receive_data(AFTER_AUTH)
    server.accept_auth()
    server.receive_data(connect_domain(b"mail.corp.example"))
    with pytest.raises(ValueError):
        server.reply(Reply.SUCCEEDED, ("mail.corp.example", 0))
    assert server.state is State.CONNECT_PENDING


def test_pending_bytes_are_bounded() -> None:
    server = Socks5Server(max_pending=100)
    server.receive_data(AFTER_AUTH)
    server.receive_data(bytes(100))
    with pytest.raises(SocksProtocolError, match="101 bytes"):
        server.receive_data(b"x")
    assert server.closed


def test_max_token_length_is_configurable() -> None:
    server = Socks5Server(max_token_length=4)
    server.receive_data(b"\x05\x01\x80")
    assert server.receive_data(jwt_auth(b"abcd", b"")) == [JwtAuthRequested("abcd", "")]
    server = Socks5Server(max_token_length=4)
    server.receive_data(b"\x05\x01\x80")
    with pytest.raises(SocksProtocolError, match="JWT of 5 bytes is longer than the limit of 4 bytes"):
        server.receive_data(b"\x01\x00\x00\x00\x05")


# -- fuzzing --


def fuzz(chunks: list[bytes], decisions: st.DataObject) -> None:
    """Feed chunks, taking random decisions; only SocksProtocolError may escape, and state must stay sane."""
    server = Socks5Server(max_token_length=64, max_pending=512)
    for chunk in chunks:
        try:
            pending = server.receive_data(chunk)
            while pending:
                event = pending.pop(0)
                if isinstance(event, PayloadReceived):
                    assert server.state is State.RELAYING and event.data
                    continue
                assert not pending
                if isinstance(event, ConnectRequested):
                    assert server.state is State.CONNECT_PENDING
                    server.reply(decisions.draw(st.sampled_from(Reply)))
                else:
                    assert server.state is State.AUTH_PENDING
                    server.accept_auth() if decisions.draw(st.booleans()) else server.reject_auth()
                pending = server.receive_data(b"")
        except SocksProtocolError:
            assert server.state is State.CLOSED and server.close_reason
        assert server.closed is (server.state is State.CLOSED)
        if server.closed:
            assert server.close_reason
        server.data_to_send()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(), st.data())
def test_fuzz_any_bytes(data: bytes, decisions: st.DataObject) -> None:
    fuzz([data], decisions)
    fuzz(one_byte_at_a_time(data[:64]), decisions)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([GREET_PASSWORD, GREET_ALL, GREET_PASSWORD + AUTH_ACME, AFTER_AUTH + b"\x05\x01\x00"]),
    st.lists(st.binary(max_size=40), max_size=8),
    st.data(),
)
def test_fuzz_after_a_valid_greeting(prefix: bytes, chunks: list[bytes], decisions: st.DataObject) -> None:
    fuzz([prefix, *chunks], decisions)


@given(
    st.sampled_from([GREET_PASSWORD, GREET_ALL, AFTER_AUTH, AFTER_AUTH + b"\x05\x01\x00"]),
    st.binary(max_size=60),
    st.lists(st.integers(min_value=0, max_value=100), max_size=6),
)
def test_any_split_gives_the_same_outcome(prefix: bytes, tail: bytes, cuts: list[int]) -> None:
    data = prefix + tail
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]
    whole, split = drive([data]), drive(chunks)
    assert (merged(whole.events), whole.sent, whole.state, whole.error) == (
        merged(split.events),
        split.sent,
        split.state,
        split.error,
    )


# -- real clients on loopback --

OnPayload = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def socks_server(code: Reply, on_payload: OnPayload, seen: list[Event]) -> AsyncIterator[int]:
    """A tiny listener on 127.0.0.1 driving Socks5Server; yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = Socks5Server()
        try:
            while not server.closed:
                data = await reader.read(65536)
                if not data:
                    break
                pending = server.receive_data(data)
                while pending:
                    event = pending.pop(0)
                    seen.append(event)
                    if isinstance(event, PasswordAuthRequested):
                        ok = (event.username, event.password) == ("acme", "secret")
                        server.accept_auth() if ok else server.reject_auth()
                        pending = server.receive_data(b"")
                    elif isinstance(event, ConnectRequested):
                        server.reply(code, ("127.0.0.1", 4321))
                        pending = server.receive_data(b"")
                    writer.write(server.data_to_send())
                    if isinstance(event, PayloadReceived):
                        await on_payload(event.data, writer)
                writer.write(server.data_to_send())
                await writer.drain()
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()


async def echo(data: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(data)


async def test_python_socks_connects_through_and_echoes() -> None:
    seen: list[Event] = []
    async with socks_server(Reply.SUCCEEDED, echo, seen) as port:
        proxy = Proxy.from_url(f"socks5://acme:secret@127.0.0.1:{port}", rdns=True)
        sock = await proxy.connect("mail.corp.example", 143, timeout=5)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"a1 NOOP\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(9), 5) == b"a1 NOOP\r\n"
        finally:
            writer.close()
            await writer.wait_closed()
    assert seen[:2] == [PW_EVENT, MAIL]


async def test_python_socks_sends_ipv6_literal() -> None:
    seen: list[Event] = []
    async with socks_server(Reply.SUCCEEDED, echo, seen) as port:
        proxy = Proxy.from_url(f"socks5://acme:secret@127.0.0.1:{port}")
        sock = await proxy.connect("2001:db8::25", 25, timeout=5)
        sock.close()
    assert seen[1] == ConnectRequested("2001:db8::25", 25, AddressType.IPV6)


@pytest.mark.parametrize(
    ("user", "code", "error_code"),
    [("acme:wrong", Reply.SUCCEEDED, None), ("acme:secret", Reply.NETWORK_UNREACHABLE, 3)],
)
async def test_python_socks_sees_refusals(user: str, code: Reply, error_code: int | None) -> None:
    async with socks_server(code, echo, []) as port:
        proxy = Proxy.from_url(f"socks5://{user}@127.0.0.1:{port}", rdns=True)
        with pytest.raises(ProxyError) as caught:
            await proxy.connect("mail.corp.example", 143, timeout=5)
    if error_code is not None:
        assert caught.value.error_code == error_code


async def run_curl(port: int) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{port}",
        "--proxy-user", "acme:secret", "http://mail.corp.example:80/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not on PATH")


@needs_curl
async def test_curl_sees_not_allowed() -> None:
    seen: list[Event] = []
    async with socks_server(Reply.NOT_ALLOWED, echo, seen) as port:
        code, _, stderr = await run_curl(port)
    assert code == 97, stderr  # CURLE_PROXY
    assert "(2)" in stderr and "mail.corp.example" in stderr
    assert seen == [PW_EVENT, ConnectRequested("mail.corp.example", 80, AddressType.DOMAIN)]


@needs_curl
async def test_curl_fetches_through_the_proxy() -> None:
    received = bytearray()

    async def http(data: bytes, writer: asyncio.StreamWriter) -> None:
        received.extend(data)
        if b"\r\n\r\n" in received:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nhi\n")

    async with socks_server(Reply.SUCCEEDED, http, []) as port:
        code, stdout, stderr = await run_curl(port)
    assert (code, stdout) == (0, "hi\n"), stderr
    assert received.startswith(b"GET / HTTP/1.1\r\nHost: mail.corp.example\r\n")
