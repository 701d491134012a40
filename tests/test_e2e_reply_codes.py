"""Every SOCKS5 reply code of the design table, each produced by a real situation, seen by real clients."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess

import pytest

from tests.harness import Connector, Stack, socks_connect
from tests.servers import LOOPBACK, free_port, server_missing
from tests.servers.java import run_socks_probe

pytestmark = pytest.mark.e2e


def curl(stack: Stack, url: str, user: str, *extra: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        server_missing("curl not found")
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--socks5-hostname",
            f"{LOOPBACK}:{stack.socks_port}",
            "--proxy-user",
            user,
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_mapped_host_is_reached_and_greeting_arrives_first(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    stack.map(connected, "mail.corp.example:25", f"{LOOPBACK}:{line_server}")
    reply, sock = socks_connect(stack.socks_port, "mail.corp.example", 25, "acme/dc1", stack.secret)
    with sock:
        assert reply == 0
        assert sock.recv(100) == b"220 test.server ready\r\n"


def test_curl_fetches_a_page_from_a_mapped_http_server(
    stack: Stack, connected: Connector, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import functools
    import http.server
    import threading

    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("<h1>on-premise intranet page</h1>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack.map(connected, "intranet.corp.example:80", f"{LOOPBACK}:{server.server_address[1]}")
        result = curl(stack, "http://intranet.corp.example/index.html", f"acme/dc1:{stack.secret}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "<h1>on-premise intranet page</h1>"
    finally:
        server.shutdown()
        server.server_close()


def test_unmapped_target_is_not_allowed_by_ruleset(stack: Stack, connected: Connector, line_server: int) -> None:
    stack.map(connected, "mail.corp.example:25", f"{LOOPBACK}:{line_server}")
    result = curl(stack, "http://mail.corp.example:26/", f"acme/dc1:{stack.secret}")
    assert result.returncode == 97
    assert "(2)" in result.stderr
    code, output = run_socks_probe(stack.socks_port, "acme/dc1", stack.secret, "other.corp.example", 25)
    assert code != 0
    assert "Connection not allowed by ruleset" in output
    audit = [json.loads(line) for line in (connected.home / "connector" / "audit.log").read_text().splitlines()]
    denied = [r for r in audit if r["event"] == "access-denied"]
    assert {r["virtual"] for r in denied} == {"mail.corp.example:26", "other.corp.example:25"}
    assert all(r["trace_id"] and r["subaccount"] == "acme" and r["location"] == "dc1" for r in denied)


def test_mapped_host_that_is_down_is_host_unreachable(stack: Stack, connected: Connector) -> None:
    stack.map(connected, "down.corp.example:143", f"{LOOPBACK}:{free_port()}")
    result = curl(stack, "http://down.corp.example:143/", f"acme/dc1:{stack.secret}")
    assert result.returncode == 97
    assert "(4)" in result.stderr
    code, output = run_socks_probe(stack.socks_port, "acme/dc1", stack.secret, "down.corp.example", 143)
    assert code != 0
    assert "Host unreachable" in output


def test_unknown_location_is_network_unreachable(stack: Stack, connected: Connector, line_server: int) -> None:
    stack.map(connected, "mail.corp.example:25", f"{LOOPBACK}:{line_server}")
    result = curl(stack, "http://mail.corp.example:25/", f"acme/dc9:{stack.secret}")
    assert result.returncode == 97
    assert "(3)" in result.stderr
    _, output = run_socks_probe(stack.socks_port, "acme/dc9", stack.secret, "mail.corp.example", 25)
    assert "Network unreachable" in output
    assert "connected locations of subaccount 'acme': 'dc1'" in stack.hub.log()  # type: ignore[union-attr]


def test_wrong_secret_and_unknown_subaccount_are_connection_refused(stack: Stack, connected: Connector) -> None:
    for user in ("acme/dc1:wrong-secret", f"nobody/dc1:{stack.secret}"):
        result = curl(stack, "http://mail.corp.example:25/", user)
        assert result.returncode == 97
        assert "(5)" in result.stderr
    assert stack.secret not in stack.hub.log()  # type: ignore[union-attr]
    assert "wrong-secret" not in stack.hub.log()  # type: ignore[union-attr]


def test_jwt_method_0x80_with_token_from_the_api(stack: Stack, connected: Connector, line_server: int) -> None:
    stack.map(connected, "mail.corp.example:25", f"{LOOPBACK}:{line_server}")
    token = stack.token().encode()

    def jwt_connect(token: bytes, location: bytes) -> tuple[int, socket.socket]:
        sock = socket.create_connection((LOOPBACK, stack.socks_port), timeout=10)
        sock.sendall(b"\x05\x01\x80")
        assert sock.recv(2) == b"\x05\x80"
        import base64

        encoded = base64.b64encode(location)
        sock.sendall(b"\x01" + struct.pack("!I", len(token)) + token + bytes([len(encoded)]) + encoded)
        assert sock.recv(2) == b"\x01\x00"
        host = b"mail.corp.example"
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack("!H", 25))
        reply = sock.recv(10)
        return reply[1], sock

    reply, sock = jwt_connect(token, b"dc1")
    with sock:
        assert reply == 0
        assert sock.recv(100).startswith(b"220 ")
    reply, sock = jwt_connect(token[:-4] + b"AAAA", b"dc1")  # signature broken
    sock.close()
    assert reply == 5


def test_bind_is_command_not_supported(stack: Stack, connected: Connector) -> None:
    sock = socket.create_connection((LOOPBACK, stack.socks_port), timeout=10)
    with sock:
        sock.sendall(b"\x05\x01\x02")
        assert sock.recv(2) == b"\x05\x02"
        user, password = b"acme/dc1", stack.secret.encode()
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        assert sock.recv(2) == b"\x01\x00"
        sock.sendall(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x19")
        assert sock.recv(10)[1] == 7


def test_unknown_address_type_is_address_type_not_supported(stack: Stack, connected: Connector) -> None:
    sock = socket.create_connection((LOOPBACK, stack.socks_port), timeout=10)
    with sock:
        sock.sendall(b"\x05\x01\x02")
        assert sock.recv(2) == b"\x05\x02"
        user, password = b"acme/dc1", stack.secret.encode()
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        assert sock.recv(2) == b"\x01\x00"
        sock.sendall(b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x19")  # ATYP 5 does not exist
        assert sock.recv(10)[1] == 8


def test_anonymous_clients_get_no_acceptable_method(stack: Stack) -> None:
    sock = socket.create_connection((LOOPBACK, stack.socks_port), timeout=10)
    with sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\xff"
        assert sock.recv(1) == b""
