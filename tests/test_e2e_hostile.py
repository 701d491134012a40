"""Bad input on every port: each gets a clear line in the log and is dropped; nothing else is disturbed."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time

import pytest

from tests.harness import Connector, Stack, socks_connect

pytestmark = pytest.mark.e2e


def wait_for_log(stack: Stack, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = stack.hub.log() if stack.hub else ""
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the hub log:\n{log[-3000:]}")


def still_works(stack: Stack, connector: Connector) -> None:
    reply, sock = socks_connect(stack.socks_port, "svc.corp.example", 25, "acme/dc1", stack.secret)
    with sock:
        assert reply == 0
        assert sock.recv(100).startswith(b"220 ")


@pytest.fixture
def mapped(stack: Stack, connected: Connector, line_server: int) -> Connector:
    stack.map(connected, "svc.corp.example:25", f"127.0.0.1:{line_server}")
    return connected


def test_http_client_on_the_socks_port(stack: Stack, mapped: Connector) -> None:
    with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""  # dropped without an answer that could be mistaken for HTTP
    wait_for_log(stack, "is an HTTP client pointed at the SOCKS port?")
    still_works(stack, mapped)


def test_random_garbage_on_the_socks_port(stack: Stack, mapped: Connector) -> None:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=5) as sock:
            sock.sendall(b"\x05" + os.urandom(300))
            sock.settimeout(5)
            try:
                while sock.recv(1024):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    still_works(stack, mapped)
    assert stack.hub and stack.hub.alive()


def test_slow_socks_client_hits_the_handshake_timeout(
    tmp_path_factory: pytest.TempPathFactory, line_server: int
) -> None:
    stack = Stack(tmp_path_factory.mktemp("slow")).init()
    stack.start_hub("--handshake-timeout", "1")
    try:
        connector = stack.enroll("dc1")
        stack.start_connector(connector)
        stack.map(connector, "svc.corp.example:25", f"127.0.0.1:{line_server}")
        with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=5) as sock:
            sock.sendall(b"\x05\x01")  # ... and never the methods
            started = time.monotonic()
            assert sock.recv(10) == b""
            assert time.monotonic() - started < 4
        wait_for_log(stack, "did not finish its handshake within 1 s")
        with socket.create_connection(("127.0.0.1", stack.tunnel_port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, then silence
            assert sock.recv(10) == b""
        wait_for_log(stack, "did not finish its TLS handshake within 1 s")
        still_works(stack, connector)
    finally:
        stack.stop()


def test_plain_http_on_the_tunnel_port(stack: Stack, mapped: Connector) -> None:
    with socket.create_connection(("127.0.0.1", stack.tunnel_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n")
        sock.settimeout(5)
        try:
            while sock.recv(1024):
                pass
        except ConnectionResetError:
            pass
    wait_for_log(stack, "spoke plain HTTP to the tunnel port")
    still_works(stack, mapped)


def test_tls_client_without_certificate_gets_no_tunnel(stack: Stack, mapped: Connector) -> None:
    context = stack.ca_context()
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", stack.tunnel_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert sock.recv(100) == b""
    wait_for_log(stack, "presented no client certificate")
    still_works(stack, mapped)


def test_connector_certificate_with_garbage_http2(stack: Stack, mapped: Connector) -> None:
    """A peer with a valid connector certificate that then breaks HTTP/2 is dropped; the real one stays."""
    credentials = mapped.home / "connector" / "client.pem"
    context = ssl.create_default_context(cafile=str(mapped.home / "connector" / "hub-ca.pem"))
    context.load_cert_chain(str(credentials))
    context.set_alpn_protocols(["h2"])
    connector_id = mapped.identity["connector_id"]
    with (
        socket.create_connection(("127.0.0.1", stack.tunnel_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        # an oversized frame header: length 16 MiB - 1, type DATA, stream 1
        sock.sendall(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\0" * 1000)
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLError, TimeoutError):
            pass
    wait_for_log(stack, "tunnel peer broke HTTP/2")
    # the impostor had the same identity, so it evicted the real session; the real connector comes back by itself
    stack.wait_connected(connector_id, timeout=15)
    deadline = time.monotonic() + 15
    while True:
        try:
            still_works(stack, mapped)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
