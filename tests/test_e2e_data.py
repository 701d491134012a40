"""Bytes through the real tunnel: half-close both ways, 100 MB with checksums, 1,000 concurrent streams."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import socket
import struct
import threading

import pytest

from tests.conftest import pattern_block
from tests.harness import Connector, Stack, cli, socks_connect
from tests.servers.pki import TestPki

pytestmark = pytest.mark.e2e

GREETING = b"220 test.server ready\r\n"
MB = 1024 * 1024


def open_mapped(stack: Stack, connected: Connector, line_server: int, command: bytes) -> socket.socket:
    stack.map(connected, "svc.corp.example:2525", f"127.0.0.1:{line_server}") if not _mapped(connected) else None
    reply, sock = socks_connect(stack.socks_port, "svc.corp.example", 2525, "acme/dc1", stack.secret, timeout=60)
    assert reply == 0
    assert _read_exact(sock, len(GREETING)) == GREETING
    sock.sendall(command + b"\r\n")
    return sock


def _mapped(connector: Connector) -> bool:
    path = connector.home / "connector" / "mappings.json"
    return path.exists() and "svc.corp.example" in path.read_text()


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_client_half_close_still_gets_the_answer(stack: Stack, connected: Connector, line_server: int) -> None:
    sock = open_mapped(stack, connected, line_server, b"SINK")
    payload = b"x" * 300_000
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)  # FIN from the cloud side travels as END_STREAM
    assert _read_all(sock).decode() == hashlib.sha256(payload).hexdigest()
    sock.close()


def test_server_half_close_lets_the_client_keep_sending(stack: Stack, connected: Connector, line_server: int) -> None:
    sock = open_mapped(stack, connected, line_server, b"SOURCE 100000")
    received = _read_all(sock)  # ends with the server's FIN, while our direction stays open
    assert received == pattern_block()[:100_000]
    sock.sendall(b"still talking after your FIN\r\n")  # must not fail: only one direction is closed
    sock.shutdown(socket.SHUT_WR)
    sock.close()


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_100_mb_arrive_intact(stack: Stack, connected: Connector, line_server: int, direction: str) -> None:
    size = 100 * MB
    block = pattern_block()
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    if direction == "upload":
        sock = open_mapped(stack, connected, line_server, b"SINK")
        for _ in range(size // len(block)):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        assert _read_all(sock).decode() == expected.hexdigest()
    else:
        sock = open_mapped(stack, connected, line_server, f"SOURCE {size}".encode())
        digest = hashlib.sha256()
        total = 0
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            total += len(chunk)
        assert total == size
        assert digest.hexdigest() == expected.hexdigest()
    sock.close()


async def _socks_echo(port: int, secret: str, index: int, hold: asyncio.Event) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    user, password = b"acme/dc1", secret.encode()
    host = b"svc.corp.example"
    # a pipelining client: greeting, auth and request in one write
    writer.write(
        b"\x05\x01\x02"
        + b"\x01"
        + bytes([len(user)])
        + user
        + bytes([len(password)])
        + password
        + b"\x05\x01\x00\x03"
        + bytes([len(host)])
        + host
        + struct.pack("!H", 2525)
    )
    answer = await reader.readexactly(2 + 2 + 10)
    assert answer[:4] == b"\x05\x02\x01\x00", answer
    assert answer[5] == 0, f"stream {index}: reply {answer[5]}"
    assert await reader.readexactly(len(GREETING)) == GREETING
    writer.write(b"ECHO\r\n")
    await hold.wait()  # every stream is open at the same time before any of them talks
    message = f"stream {index} says hello".encode()
    writer.write(message)
    echoed = await reader.readexactly(len(message))
    writer.close()
    return echoed


def test_1000_concurrent_streams(stack: Stack, connected: Connector, line_server: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    open_mapped(stack, connected, line_server, b"ECHO").close()
    count = 1000

    async def main() -> list[bytes]:
        hold = asyncio.Event()
        tasks = [asyncio.create_task(_socks_echo(stack.socks_port, stack.secret, i, hold)) for i in range(count)]
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            info = await asyncio.to_thread(stack.connected)
            if info and info[0]["active_streams"] >= count:
                break
            await asyncio.sleep(0.2)
        held = info[0]["active_streams"]
        hold.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert held >= count, f"only {held} streams were open at once"
        return results

    try:
        results = asyncio.run(main())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert results == [f"stream {i} says hello".encode() for i in range(count)]


def test_a_client_that_leaves_a_tcp_tls_mapping_closes_the_backend_tls(
    stack: Stack, connected: Connector, test_pki: TestPki
) -> None:
    """TLS cannot half-close, so the cloud client's FIN cannot be passed on as one: the connector must still end the
    backend connection (the server gets close_notify) instead of keeping it, and its stream, open forever."""
    ended = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:  # a TLS server that greets, reads whatever comes and never closes by itself
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(30)
        with test_pki.server_context().wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"* OK ready\r\n")
            try:
                while tls.recv(4096):
                    pass
            except OSError:
                pass
            ended.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    cli(connected.home, "connector", "truststore", "add", str(test_pki.root_pem))
    stack.map(
        connected, "imaps.corp.example:993", f"127.0.0.1:{listener.getsockname()[1]}",
        "--protocol", "tcp-tls", "--tls-server-name", "mail.corp.example",
    )  # fmt: skip
    reply, sock = socks_connect(stack.socks_port, "imaps.corp.example", 993, "acme/dc1", stack.secret)
    assert reply == 0
    assert _read_exact(sock, 12) == b"* OK ready\r\n"
    sock.sendall(b"\x16\x03\x01 a TLS handshake where a plain command belongs\r\n")
    sock.close()
    try:
        assert ended.wait(15), "the connector kept the backend TLS connection open after the client left"
    finally:
        listener.close()
        thread.join(5)
