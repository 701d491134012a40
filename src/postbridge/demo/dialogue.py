"""The demo's client side: greeting a server and saying goodbye, directly or through the tunnel.

Owns :func:`converse` (read the greeting, send ``a LOGOUT``, read until the server closes), :func:`greet_directly`
(the same without any proxy, plain or TLS against the demo CA) and :func:`stop_task` (stop a service task
politely, then firmly). Must not print or decide whether what it saw is right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from postbridge.addresses import HostPort
from postbridge.demo.onprem import DemoPki, client_context

log = logging.getLogger("postbridge.demo")

CLOSE_TIMEOUT = 3.0
LINE_LIMIT = 8192


async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> tuple[str, str]:
    """Read the greeting line, send ``a LOGOUT``, read until the server closes; return (greeting, last line).

    Always closes ``writer``. Raises TimeoutError when the server does not finish within ``timeout`` seconds,
    OSError when the connection breaks.
    """
    try:
        async with asyncio.timeout(timeout):
            greeting = _text(await reader.readline())
            writer.write(b"a LOGOUT\r\n")
            await writer.drain()
            last = ""
            while line := await reader.readline():
                last = _text(line)
            return greeting, last
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()


async def greet_directly(
    address: HostPort, demo_pki: DemoPki | None, server_name: str, timeout: float
) -> tuple[str, str]:
    """Connect to ``address`` without any proxy (TLS verified against the demo CA when ``demo_pki`` is given)
    and :func:`converse`. Raises OSError (ssl errors included) or TimeoutError."""
    options: dict[str, Any] = {}
    if demo_pki is not None:
        options = {"ssl": client_context(demo_pki), "server_hostname": server_name}
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(address.host, address.port, limit=LINE_LIMIT, **options)
    return await converse(reader, writer, timeout)


async def stop_task(stop: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Set ``stop`` and give ``task`` a moment to finish by itself; cancel it when it does not."""
    stop.set()
    await asyncio.wait([task], timeout=CLOSE_TIMEOUT)
    if not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CLOSE_TIMEOUT)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("%s ended with an error", task.get_name(), exc_info=task.exception())


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r\n")
