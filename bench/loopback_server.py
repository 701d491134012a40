"""The benchmark's "internal host": a sink / source / echo server on 127.0.0.1, run as its own process.

Owns the wire rules the benchmark clients speak (all integers big-endian):

* on accept the server sends :data:`GREETING` at once (as a mail server does), so "connect + first byte" is the
  latency of opening a connection;
* then the client sends one command of 9 bytes, ``op`` (1 byte) and ``size`` (8 bytes):
  ``R`` (read): the server sends ``size`` bytes (the client closes); ``S`` (sink): the server counts bytes until the
  client's EOF, answers the count as 8 bytes and closes; ``E`` (echo): the server echoes everything until EOF (used
  for idle streams, which are proved alive with a one-byte echo).

Run ``python -m bench.loopback_server`` (or this file): it prints its port on one line and serves until stdin
closes or SIGTERM arrives. Must not: listen anywhere but loopback, or keep any state beyond its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import struct
import sys

GREETING = b"220 bench.internal ready\r\n"
COMMAND = struct.Struct("!cQ")
CHUNK = 1 << 20
_BLOCK = bytes(range(256)) * (CHUNK // 256)


class BenchProtocol(asyncio.Protocol):
    """One client connection (see the module docstring for the commands)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.mode = b""
        self.remaining = 0
        self.counted = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * CHUNK)
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        if self.mode == b"S":
            self.counted += len(data)
            return
        if self.mode == b"E":
            assert self.transport is not None
            self.transport.write(data)
            return
        self.buffer += data
        if len(self.buffer) < COMMAND.size:
            return
        op, size = COMMAND.unpack(self.buffer[: COMMAND.size])
        rest, self.buffer = self.buffer[COMMAND.size :], b""
        self.mode = op
        if op == b"R":
            self.remaining = size
            self._send()
        elif op == b"S":
            self.counted = len(rest)
        elif op == b"E":
            self.data_received(rest)
        else:
            assert self.transport is not None
            self.transport.close()

    def eof_received(self) -> bool:
        if self.mode == b"S" and self.transport is not None:
            self.transport.write(struct.pack("!Q", self.counted))
            self.transport.close()
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send()

    def _send(self) -> None:
        transport = self.transport
        if transport is None:
            return
        view = memoryview(_BLOCK)
        while self.remaining and not self.paused and not transport.is_closing():
            piece = min(self.remaining, CHUNK)
            transport.write(view[:piece])
            self.remaining -= piece
        # Done: the client closes once it has everything. Closing or half-closing here would race the client's
        # close, which asyncio 3.11 reports as an unhandled error in its write-ready callback.


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BenchProtocol, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: stop.set() if not os.read(stdin, 1) else None)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
