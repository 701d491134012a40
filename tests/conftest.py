"""Shared fixtures: real hub + connector processes (``stack``) and small loopback servers to map to."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack
from tests.servers import LOOPBACK
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki, make_test_pki
from tests.servers.postgres import Postgres


class _Service(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096  # socketserver's default backlog of 5 drops SYNs under 1,000 concurrent connects


class _Handler(socketserver.BaseRequestHandler):
    """Speaks a tiny line protocol after a greeting, chosen by the first line the client sends:

    ``ECHO``: echo until EOF, then close.  ``SINK``: read until EOF, answer the sha256 hex, close.
    ``SOURCE n``: send n bytes of a deterministic pattern, then half-close and read until EOF (answers its count).
    """

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.sendall(b"220 test.server ready\r\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return
            line += chunk
        command = line.strip().split()
        if command[0] == b"ECHO":
            while data := sock.recv(65536):
                sock.sendall(data)
        elif command[0] == b"SINK":
            digest = hashlib.sha256()
            while data := sock.recv(1 << 20):
                digest.update(data)
            sock.sendall(digest.hexdigest().encode())
        elif command[0] == b"SOURCE":
            remaining = int(command[1])
            block = pattern_block()
            while remaining:
                piece = block[: min(len(block), remaining)]
                sock.sendall(piece)
                remaining -= len(piece)
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while data := sock.recv(65536):
                received += len(data)
            # the client half-closed after sending; nothing more can be said to it
        sock.close()


def pattern_block() -> bytes:
    return hashlib.sha256(b"postbridge").digest() * 32768  # 1 MiB


@pytest.fixture(scope="session")
def line_server() -> Iterator[int]:
    """A threaded TCP server on 127.0.0.1 speaking the test line protocol; yields its port."""
    server = _Service((LOOPBACK, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """An initialised hub (running) with subaccount 'acme'; add connectors with stack.enroll()."""
    stack = Stack(tmp_path).init()
    stack.start_hub()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def connected(stack: Stack) -> Connector:
    """One running connector at location 'dc1'."""
    connector = stack.enroll("dc1")
    stack.start_connector(connector)
    return connector


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """Root CA -> intermediate -> leaf for mail.corp.example, localhost, 127.0.0.1, 127.0.0.2."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dovecot(test_pki: TestPki) -> Iterator[Dovecot]:
    """A real Dovecot on loopback: IMAP+STARTTLS, IMAPS, POP3+STLS, POP3S; users alice/bob, password 'secret'."""
    with Dovecot(pki=test_pki) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL on 127.0.0.1 (trust auth on loopback, fsync on); new_database() gives a test its own."""
    with Postgres() as server:
        yield server


@pytest.fixture
def keystore(tmp_path: Path, test_pki: TestPki) -> Path:
    """A mail adapter keystore (trust store folder) holding the test root only."""
    store = TrustStore(tmp_path / "keystore")
    store.add(test_pki.root_pem.read_bytes(), alias="test-root")
    return store.directory
