"""Real servers for tests (Dovecot, tinyproxy, a Java SOCKS client) started on free loopback ports.

Owns: the rule for a missing server program - skip on a developer machine, fail in CI (CI=true), because a
suite that cannot find its server in CI must fail, never skip - plus small helpers the server modules share
(free ports, waiting for a greeting).
Must not: install anything (scripts/setup-dev does), or listen anywhere but loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

import pytest

LOOPBACK = "127.0.0.1"


def in_ci() -> bool:
    """True when running under CI (the environment variable CI is "true")."""
    return os.environ.get("CI", "").strip().lower() == "true"


def server_missing(what: str, fix: str = "run scripts/setup-dev") -> NoReturn:
    """Skip the test on a developer machine, fail it in CI: `what` is missing, `fix` says how to get it."""
    message = f"{what} - {fix}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def find_executable(name: str, candidates: Iterable[str] = ()) -> Path:
    """The path of program `name`: the first existing candidate path, else `name` on PATH.

    Skips the test (fails it in CI) when the program is nowhere to be found.
    """
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which(name)
    if found is None:
        server_missing(f"program '{name}' not found (looked in {', '.join(candidates) or 'PATH'} and PATH)")
    return Path(found)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free TCP ports on `host` (all held open together while picking, so they differ)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def wait_for_port(
    port: int,
    host: str = LOOPBACK,
    timeout: float = 10.0,
    expect: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    alive: Callable[[], bool] | None = None,
) -> bytes:
    """Poll until `host:port` accepts a connection (and, with `expect`, sends a line starting with it).

    With `tls`, the line is read after a TLS handshake (implicit TLS ports such as IMAPS). With `alive`, stops
    waiting as soon as it returns False (the server process died) and raises TimeoutError at once.

    Returns the first line received (b"" when `expect` is None). Raises TimeoutError naming the port and the
    last problem seen when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_problem = "never tried"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise TimeoutError(f"{host}:{port} will not come up: the server process exited ({last_problem})")
        try:
            line = _first_line(host, port, expect is not None, tls)
            if expect is None or line.startswith(expect):
                return line
            last_problem = f"greeting {line[:80]!r} does not start with {expect!r}"
        except OSError as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not come up within {timeout:.0f} s ({last_problem})")


def _first_line(host: str, port: int, read: bool, tls: ssl.SSLContext | None) -> bytes:
    connection = socket.create_connection((host, port), timeout=1.0)
    try:
        if not read:
            return b""
        if tls is not None:
            connection = tls.wrap_socket(connection, server_hostname=host)
        with connection.makefile("rb") as reader:
            return reader.readline()
    finally:
        connection.close()
