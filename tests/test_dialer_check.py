"""Backend dialer and availability check against real loopback servers (plain and TLS, throwaway PKI).

Only DNS answers and the connect timeout are simulated (patched ``getaddrinfo`` / ``sock_connect``): resolving
a ``.invalid`` name here would send a query to the DNS server, and a full listen backlog is unreliable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from postbridge.addresses import HostPort
from postbridge.connector.check import (
    GREETING_LIMIT,
    CheckResult,
    _GreetingReader,
    check_mapping,
    classify_greeting,
    clean_greeting,
)
from postbridge.connector.dialer import BackendError, open_backend
from postbridge.connector.mappings import Mapping, Protocol
from postbridge.errors import NetworkError, TrustError

LOCAL = "127.0.0.1"


@dataclass
class Served:
    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0


@contextlib.asynccontextmanager
async def serve(
    greeting: bytes | None, *, tls: ssl.SSLContext | None = None, close_at_once: bool = False
) -> AsyncIterator[Served]:
    """A one-line mail server: sends ``greeting`` (None: says nothing), records what the client sends."""
    served = Served()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        try:
            if greeting is not None:
                writer.write(greeting)
                await writer.drain()
            while not close_at_once:
                data = await reader.read(1024)
                if not data:
                    break
                served.received += data
                if served.received.endswith(b"\r\n"):
                    writer.write(b"* BYE logging out\r\n" if b"LOGOUT" in data else b"+OK bye\r\n")
                    await writer.drain()
                    break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            served.finished.set()

    server = await asyncio.start_server(handle, LOCAL, 0, ssl=tls)
    served.port = server.sockets[0].getsockname()[1]
    async with server:
        yield served


def closed_port(host: str = LOCAL) -> int:
    """A port on which nothing listens (bound, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def mapping(
    port: int, protocol: Protocol = Protocol.TCP, *, host: str = LOCAL, server_name: str | None = None
) -> Mapping:
    return Mapping(HostPort("mail.corp", 143), HostPort(host, port), protocol, server_name)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mail.test", LOCAL).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def foreign_server_tls() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mail.test", LOCAL).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_tls(ca: trustme.CA) -> Callable[[], ssl.SSLContext]:
    def factory() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        ca.configure_trust(context)
        return context

    return factory


def no_tls() -> ssl.SSLContext:
    raise AssertionError("a plain TCP mapping must not ask for a TLS context")


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.got_line = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.got_line.done():
            self.got_line.set_result(bytes(self.data))


async def dial(target: Mapping, tls: Callable[[], ssl.SSLContext] = no_tls, timeout: float = 5.0) -> bytes:
    transport, protocol = await open_backend(target, Collect, tls_context=tls, timeout=timeout)
    try:
        assert isinstance(protocol, Collect)
        return await asyncio.wait_for(protocol.got_line, 5)
    finally:
        transport.abort()


async def dial_error(target: Mapping, tls: Callable[[], ssl.SSLContext] = no_tls, timeout: float = 5.0) -> BackendError:
    with pytest.raises(BackendError) as info:
        await dial(target, tls, timeout)
    return info.value


def fake_getaddrinfo(monkeypatch: pytest.MonkeyPatch, answer: Callable[[str, int], list[Any]]) -> list[str]:
    asked: list[str] = []

    async def getaddrinfo(host: str, port: int, **_kwargs: Any) -> list[Any]:
        asked.append(host)
        return answer(host, port)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    return asked


def addrinfo(ip: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sockaddr = (ip, port, 0, 0) if family == socket.AF_INET6 else (ip, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


# --- dialer ------------------------------------------------------------------------------------------


async def test_plain_tcp_delivers_the_greeting() -> None:
    async with serve(b"* OK IMAP ready\r\n") as server:
        assert await dial(mapping(server.port)) == b"* OK IMAP ready\r\n"


async def test_tls_verified_against_server_name(
    server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]
) -> None:
    async with serve(b"+OK POP3 ready\r\n", tls=server_tls) as server:
        target = mapping(server.port, Protocol.TCP_TLS, server_name="mail.test")
        assert await dial(target, client_tls) == b"+OK POP3 ready\r\n"


async def test_tls_to_ip_checks_the_ip_san(
    server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]
) -> None:
    async with serve(b"+OK POP3 ready\r\n", tls=server_tls) as server:
        assert await dial(mapping(server.port, Protocol.TCP_TLS), client_tls) == b"+OK POP3 ready\r\n"


async def test_untrusted_ca_is_backend_tls(
    foreign_server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]
) -> None:
    async with serve(b"+OK\r\n", tls=foreign_server_tls) as server:
        error = await dial_error(mapping(server.port, Protocol.TCP_TLS, server_name="mail.test"), client_tls)
    assert error.reason == "backend-tls"
    assert error.socks_reply == 0x01
    assert error.message == (
        f"TLS handshake with {LOCAL}:{server.port} (as 'mail.test') failed: certificate verify failed: "
        "unable to get local issuer certificate (the backend trust store does not hold the CA that issued it)"
    )
    assert "trust store" in error.hint


async def test_wrong_server_name_is_host_name_mismatch(
    server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]
) -> None:
    async with serve(b"+OK\r\n", tls=server_tls) as server:
        error = await dial_error(mapping(server.port, Protocol.TCP_TLS, server_name="other.test"), client_tls)
    assert error.reason == "backend-tls"
    assert error.message.startswith(f"TLS handshake with {LOCAL}:{server.port} (as 'other.test') failed: ")
    assert "host name mismatch: the certificate does not carry the name 'other.test'" in error.message
    assert "TLS server name" in error.hint


async def test_tls_to_a_plain_port_says_so(client_tls: Callable[[], ssl.SSLContext]) -> None:
    async with serve(b"* OK IMAP4rev1 plain text here, no TLS\r\n") as server:
        error = await dial_error(mapping(server.port, Protocol.TCP_TLS), client_tls)
    assert error.reason == "backend-tls"
    assert error.message.startswith(f"TLS handshake with {LOCAL}:{server.port} failed: ")
    assert "'tcp'" in error.hint


async def test_tls_handshake_never_answered_is_timeout(client_tls: Callable[[], ssl.SSLContext]) -> None:
    async with serve(None) as server:
        error = await dial_error(mapping(server.port, Protocol.TCP_TLS), client_tls, timeout=0.3)
    assert error.reason == "timeout"
    where = f"{LOCAL}:{server.port}"
    assert error.message == f"no answer from {where} within 0.3 s (during the TLS handshake with {where})"
    assert "STARTTLS" in error.hint


async def test_trust_store_problem_is_backend_tls() -> None:
    def empty_store() -> ssl.SSLContext:
        raise TrustError("the backend trust store '/x/trust' is empty", hint="add the CA of the mail server")

    error = await dial_error(mapping(closed_port(), Protocol.TCP_TLS), empty_store)
    assert error.reason == "backend-tls"
    assert "is empty" in error.message
    assert error.hint == "add the CA of the mail server"


async def test_refused_names_the_ip_and_port() -> None:
    port = closed_port()
    error = await dial_error(mapping(port))
    assert error.reason == "host-unreachable"
    assert error.socks_reply == 0x04
    assert error.message == f"connection refused by {LOCAL}:{port}"
    assert isinstance(error, NetworkError)
    refused = error.to_stream_refused()
    assert (refused.reason, refused.socks_reply, refused.message) == ("host-unreachable", 4, error.message)


async def test_refused_by_every_resolved_address(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    fake_getaddrinfo(monkeypatch, lambda _host, p: [addrinfo("::1", p), addrinfo(LOCAL, p)])
    error = await dial_error(mapping(port, host="imap.corp"))
    assert error.reason == "host-unreachable"
    assert error.message == f"connection refused by [::1]:{port}; connection refused by {LOCAL}:{port} ('imap.corp')"


async def test_next_address_is_tried_after_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(b"220 smtp ready\r\n") as server:
        asked = fake_getaddrinfo(monkeypatch, lambda _host, p: [addrinfo("::1", p), addrinfo(LOCAL, p)])
        assert await dial(mapping(server.port, host="smtp.corp")) == b"220 smtp ready\r\n"
    assert asked == ["smtp.corp"]


async def test_unresolvable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, _port: int) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fake_getaddrinfo(monkeypatch, fail)
    error = await dial_error(mapping(143, host="mail.invalid"))
    assert error.reason == "host-unreachable"
    assert error.message == "cannot resolve 'mail.invalid': Name or service not known"
    assert "DNS" in error.hint


async def test_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(_sock: socket.socket, _address: Any) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(asyncio.get_running_loop(), "sock_connect", never)
    port = closed_port()
    error = await dial_error(mapping(port), timeout=0.2)
    assert error.reason == "timeout"
    assert error.message == f"no answer from {LOCAL}:{port} within 0.2 s (while connecting to {LOCAL}:{port})"
    assert "firewall" in error.hint


def test_backend_error_rejects_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="not-allowed"):
        BackendError("x", reason="not-allowed")


# --- availability check ------------------------------------------------------------------------------


async def run_check(target: Mapping, tls: Callable[[], ssl.SSLContext] = no_tls, **kwargs: Any) -> CheckResult:
    return await check_mapping(target, tls_context=tls, **kwargs)


async def test_check_imap_greeting_and_polite_logout() -> None:
    async with serve(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n") as server:
        result = await run_check(mapping(server.port))
        await asyncio.wait_for(server.finished.wait(), 5)
    assert result.reachable
    assert result.protocol_seen == "IMAP"
    assert result.greeting == "* OK [CAPABILITY IMAP4rev1] Dovecot ready."
    assert result.tls_version is None
    assert (result.error, result.reason) == (None, None)
    assert result.summary() == f"reachable (IMAP greeting from {LOCAL}:{server.port}, {result.elapsed_ms:.0f} ms)"
    assert bytes(server.received) == b"a LOGOUT\r\n"  # the only bytes sent: no credentials, no commands


async def test_check_pop3_over_tls(server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]) -> None:
    async with serve(b"+OK POP3 ready <1.2@mail.test>\r\n", tls=server_tls) as server:
        result = await run_check(mapping(server.port, Protocol.TCP_TLS, server_name="mail.test"), client_tls)
        await asyncio.wait_for(server.finished.wait(), 5)
    assert result.reachable
    assert result.protocol_seen == "POP3"
    assert result.tls_version == "TLSv1.3"
    assert result.summary().startswith(f"reachable (TLS 1.3, POP3 greeting from {LOCAL}:{server.port}, ")
    assert bytes(server.received) == b"QUIT\r\n"


async def test_check_smtp_multiline_greeting() -> None:
    async with serve(b"220-mail.corp ESMTP\r\n220 welcome\r\n") as server:
        result = await run_check(mapping(server.port))
        await asyncio.wait_for(server.finished.wait(), 5)
    assert (result.reachable, result.protocol_seen, result.greeting) == (True, "SMTP", "220-mail.corp ESMTP")
    assert bytes(server.received) == b"QUIT\r\n"


async def test_check_imap_bye_is_not_reachable() -> None:
    async with serve(b"* BYE too many connections from your address\r\n", close_at_once=True) as server:
        result = await run_check(mapping(server.port))
    assert not result.reachable
    assert result.protocol_seen == "IMAP"
    assert result.summary() == (
        f"not reachable: the IMAP server at {LOCAL}:{server.port} refuses the connection: "
        "'* BYE too many connections from your address'"
    )
    assert bytes(server.received) == b""


async def test_check_server_that_waits_for_the_client() -> None:
    async with serve(None) as server:
        result = await run_check(mapping(server.port), greeting_timeout=0.2)
        await asyncio.wait_for(server.finished.wait(), 5)
    assert result.reachable
    assert (result.protocol_seen, result.greeting) == (None, "")
    assert result.summary() == (
        f"reachable (no greeting within 0.2 s from {LOCAL}:{server.port}: the server waits for the client to speak)"
    )
    assert bytes(server.received) == b""


async def test_check_silent_implicit_tls_port_hints_tcp_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(None) as server:
        fake_getaddrinfo(monkeypatch, lambda _host, _p: [addrinfo(LOCAL, server.port)])
        result = await run_check(mapping(993, host="imap.corp"), greeting_timeout=0.2)
    assert result.reachable
    assert "993" in result.hint
    assert "'tcp-tls'" in result.hint


async def test_check_refused() -> None:
    port = closed_port()
    result = await run_check(mapping(port))
    assert not result.reachable
    assert result.reason == "host-unreachable"
    assert result.summary() == f"not reachable: connection refused by {LOCAL}:{port}"
    assert result.to_json()["summary"] == result.summary()


async def test_check_untrusted_tls(
    foreign_server_tls: ssl.SSLContext, client_tls: Callable[[], ssl.SSLContext]
) -> None:
    async with serve(b"* OK\r\n", tls=foreign_server_tls) as server:
        result = await run_check(mapping(server.port, Protocol.TCP_TLS), client_tls)
    assert (result.reachable, result.reason) == (False, "backend-tls")
    assert "certificate verify failed" in result.summary()


async def test_check_closed_without_greeting() -> None:
    async with serve(None, close_at_once=True) as server:
        result = await run_check(mapping(server.port))
    assert not result.reachable
    assert result.reason is None
    assert "closed it without a greeting" in result.summary()


async def test_check_unknown_greeting_sends_nothing() -> None:
    async with serve(b"SSH-2.0-OpenSSH_9.6\r\n") as server:
        result = await run_check(mapping(server.port))
        await asyncio.wait_for(server.finished.wait(), 5)
    assert result.reachable
    assert result.protocol_seen is None
    assert f"unknown greeting 'SSH-2.0-OpenSSH_9.6' from {LOCAL}:{server.port}" in result.summary()
    assert bytes(server.received) == b""


async def test_check_greeting_is_bounded_and_cleaned() -> None:
    endless = b"* OK \x1b[31mred\x07 \xff" + b"x" * 20000  # no newline at all
    async with serve(endless) as server:
        result = await run_check(mapping(server.port), greeting_timeout=10)
    assert result.protocol_seen == "IMAP"
    assert result.elapsed_ms < 5000  # answered as soon as 4 KiB arrived, not after the greeting timeout
    assert len(result.greeting) == 200
    assert result.greeting.startswith("* OK [31mred \ufffdxxx")
    assert all(char.isprintable() for char in result.greeting)


@pytest.mark.parametrize(
    ("greeting", "expected"),
    [
        ("* OK IMAP4rev1 ready", ("IMAP", False)),
        ("* ok lower case", ("IMAP", False)),
        ("* PREAUTH welcome", ("IMAP", False)),
        ("* BYE go away", ("IMAP", True)),
        ("+OK POP3", ("POP3", False)),
        ("-ERR no", ("POP3", True)),
        ("220 smtp.corp ESMTP", ("SMTP", False)),
        ("220", ("SMTP", False)),
        ("554 no service", ("SMTP", True)),
        ("421 busy", ("SMTP", True)),
        ("2200 nope", (None, False)),
        ("HTTP/1.1 400 Bad Request", (None, False)),
        ("", (None, False)),
    ],
)
def test_classify_greeting(greeting: str, expected: tuple[str | None, bool]) -> None:
    assert classify_greeting(greeting) == expected


def test_clean_greeting_drops_control_and_format_characters() -> None:
    assert clean_greeting(b"+OK\tready\x00\x1b\r") == "+OK ready"
    assert clean_greeting("* OK a\u202eb".encode()) == "* OK ab"


async def test_greeting_reader_keeps_at_most_4_kib() -> None:
    reader = _GreetingReader()
    reader.data_received(b"x" * 3000)
    assert not reader.line.done()
    reader.data_received(b"y" * 3000)
    line = reader.line.result()
    assert line is not None
    assert len(line) == GREETING_LIMIT == 4096
    reader.data_received(b"z" * 100_000)  # ignored after the first line
    assert len(reader._buffer) == GREETING_LIMIT
