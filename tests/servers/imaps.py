"""A minimal implicit-TLS (IMAPS-like) server presenting a chosen certificate chain, for the chain and TLS tests.

Owns: listening on loopback, the TLS handshake with the given server context (any chain, any TLS version), a
greeting, and "OK" to every command until the client closes. Real OpenSSL on the server side, so clients meet real
handshakes: unknown CAs, missing intermediates, expired or misnamed certificates, TLS 1.0 only.
Must not: listen anywhere but loopback, or pretend to be a mail store (Dovecot is the real one).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.servers import LOOPBACK

GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] test server ready\r\n"


@contextmanager
def imaps_server(context: ssl.SSLContext) -> Iterator[int]:
    """A TLS server on loopback that greets like IMAPS after the handshake; serves connections until closed."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.05)
    port = int(listener.getsockname()[1])
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(GREETING)
                for line in tls.makefile("rb"):  # every command gets "OK" (LOGOUT a BYE first), until the close
                    tag, _, command = line.partition(b" ")
                    if command.upper().startswith(b"LOGOUT"):
                        tls.sendall(b"* BYE bye\r\n")
                    tls.sendall(tag + b" OK done\r\n")
                    if stop.is_set():
                        break
        except OSError:
            pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        listener.close()
