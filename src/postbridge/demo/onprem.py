"""The demo's tiny "on-premise" mail-like server: an IMAP-style greeting on a plain port and on an implicit-TLS twin.

Owns: the demo CA and the server certificate for ``mail.corp.example`` / ``127.0.0.1`` (made with
:mod:`postbridge.trust.pki`, written to the demo home), the two asyncio listeners on free loopback ports, the few
commands the server answers (:func:`respond`), and closing every connection it accepted when the demo ends.

Must not: pretend to be a real IMAP server (it knows CAPABILITY, NOOP and LOGOUT, nothing else), accept
credentials, or listen anywhere but 127.0.0.1. The lab mail server of issue 7 replaces it for the mail story.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from postbridge.addresses import HostPort
from postbridge.home import atomic_write, private_dir
from postbridge.trust import pki

LOOPBACK = "127.0.0.1"
SERVER_NAME = "mail.corp.example"
GREETING = "* OK [CAPABILITY IMAP4rev1] demo on-premise mail server ready"
LINE_LIMIT = 8192  # bytes of one command line; longer lines end the connection
CLOSE_TIMEOUT = 2.0

_TAG = re.compile(r"^[A-Za-z0-9.]{1,32}$")


@dataclass(frozen=True)
class DemoPki:
    """The demo CA and the on-premise server's certificate, as files in the demo home."""

    ca_pem: bytes
    ca_path: Path
    chain_path: Path  # server certificate followed by the CA
    key_path: Path
    ca_fingerprint: str


def make_demo_pki(directory: Path) -> DemoPki:
    """Create a demo CA and a server certificate for ``mail.corp.example`` and ``127.0.0.1`` in ``directory``.

    Raises HomeError when the folder cannot be written.
    """
    private_dir(directory)
    ca_key, ca_cert = pki.create_ca("postbridge demo CA", days=30)
    key, cert = pki.issue_server_certificate(ca_key, ca_cert, [SERVER_NAME, LOOPBACK], days=30)
    ca_pem = pki.cert_pem(ca_cert)
    result = DemoPki(
        ca_pem=ca_pem,
        ca_path=directory / "demo-ca.pem",
        chain_path=directory / "server-chain.pem",
        key_path=directory / "server.key",
        ca_fingerprint=pki.fingerprint(ca_cert),
    )
    atomic_write(result.ca_path, ca_pem, mode=0o644)
    atomic_write(result.chain_path, pki.cert_pem(cert) + ca_pem, mode=0o644)
    atomic_write(result.key_path, pki.key_pem(key))
    return result


def respond(line: bytes) -> tuple[bytes, bool]:
    """The server's answer to one command line and whether it closes the connection afterwards.

    A pure function: ``a LOGOUT`` gives ``* BYE`` + ``a OK`` and closes; CAPABILITY and NOOP are answered; anything
    else is ``BAD``. Tags that are not plain letters and digits are answered as ``*``.
    """
    words = line.decode("ascii", "replace").split()
    if not words:
        return b"", False
    tag = words[0] if _TAG.match(words[0]) else "*"
    command = words[1].upper() if len(words) > 1 else ""
    if command == "LOGOUT":
        return f"* BYE demo server logging out\r\n{tag} OK LOGOUT completed\r\n".encode(), True
    if command == "CAPABILITY":
        return f"* CAPABILITY IMAP4rev1\r\n{tag} OK CAPABILITY completed\r\n".encode(), False
    if command == "NOOP":
        return f"{tag} OK NOOP completed\r\n".encode(), False
    return f"{tag} BAD this demo server only knows CAPABILITY, NOOP and LOGOUT\r\n".encode(), False


def server_context(demo_pki: DemoPki) -> ssl.SSLContext:
    """The TLS server context of the implicit-TLS twin (certificate chain from the demo CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(demo_pki.chain_path), str(demo_pki.key_path))
    return context


def client_context(demo_pki: DemoPki) -> ssl.SSLContext:
    """A client context that trusts only the demo CA (to greet the TLS twin directly, without the tunnel)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=demo_pki.ca_pem.decode())
    return context


class OnPremServer:
    """The plain listener and its implicit-TLS twin on 127.0.0.1 free ports.

    :meth:`start` opens both; the stack's exit closes the listeners and every connection still open.
    """

    def __init__(self, tls_context: ssl.SSLContext) -> None:
        self._tls_context = tls_context
        self._clients: set[asyncio.Task[None]] = set()
        self.plain: HostPort | None = None
        self.tls: HostPort | None = None

    async def start(self, stack: AsyncExitStack) -> None:
        """Listen on two free loopback ports. Raises OSError when no port can be bound."""
        plain = await asyncio.start_server(self._serve, LOOPBACK, 0, limit=LINE_LIMIT)
        stack.push_async_callback(_close_server, plain)
        tls = await asyncio.start_server(self._serve, LOOPBACK, 0, limit=LINE_LIMIT, ssl=self._tls_context)
        stack.push_async_callback(_close_server, tls)
        stack.push_async_callback(self._close_clients)  # runs first: connections close before the listeners
        self.plain = HostPort(LOOPBACK, int(plain.sockets[0].getsockname()[1]))
        self.tls = HostPort(LOOPBACK, int(tls.sockets[0].getsockname()[1]))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            writer.write(f"{GREETING}\r\n".encode())
            await writer.drain()
            while line := await reader.readline():
                answer, done = respond(line)
                writer.write(answer)
                await writer.drain()
                if done:
                    break
        except (OSError, ValueError):
            pass  # the client went away, or sent a line longer than LINE_LIMIT: nothing to tell anyone
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    async def _close_clients(self) -> None:
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        if clients:
            await asyncio.wait(clients, timeout=CLOSE_TIMEOUT)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await server.wait_closed()
