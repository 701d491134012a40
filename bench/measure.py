"""The measurements, each for one :class:`Route` (a way from the benchmark client to the loopback server).

Owns: throughput (one or several streams, download and upload), latency to open a connection (connect until the
server's first byte), how many idle streams a route holds at once, and the memory those idle streams cost in the
route's own processes. Every loop is bounded by a count and a deadline; every figure says how much was actually
done, so a cut-short run is visible. Must not: start or stop the processes of a route (``bench/tunnel.py`` and
``bench/baselines.py`` do), or talk to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.loopback_server import CHUNK, COMMAND, GREETING

MIB = 1024 * 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Route:
    """How to reach the loopback server: ``connect()`` returns a socket whose next bytes are the server's."""

    name: str
    connect: Callable[[], socket.socket]
    pids: Callable[[], list[int]] | None = None  # processes whose memory the route costs (None: no process)
    memory_field: str = "VmRSS"  # "VmRSS" from /proc/PID/status, or "Pss" from /proc/PID/smaps_rollup
    max_idle: int = 0  # how many idle streams to try (0 = skip that test)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Throughput:
    streams: int
    direction: str  # "down" (server -> client) or "up"
    bytes: int
    seconds: float
    cpu_seconds: float | None = None  # spent by the route's own processes meanwhile

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def cpu_per_gb(self) -> float:
        """CPU seconds of the route's processes per 10^9 bytes moved (nan when not measured)."""
        if self.cpu_seconds is None or not self.bytes:
            return float("nan")
        return self.cpu_seconds / (self.bytes / 1e9)


@dataclass(frozen=True)
class Latency:
    samples: list[float]  # seconds, sorted
    failures: int
    cpu_seconds: float | None = None  # spent by the route's own processes meanwhile

    @property
    def cpu_ms_per_open(self) -> float:
        if self.cpu_seconds is None or not self.samples:
            return float("nan")
        return self.cpu_seconds * 1000 / (len(self.samples) + self.failures)

    def percentile(self, p: float) -> float:
        if not self.samples:
            return float("nan")
        index = min(len(self.samples) - 1, max(0, round(p / 100 * len(self.samples)) - 1))
        return self.samples[index]


@dataclass(frozen=True)
class Concurrency:
    tried: int
    opened: int
    alive: int  # answered a one-byte echo after all were open
    seconds: float
    first_rate: float  # streams opened per second, over the first tenth of them
    last_rate: float  # ... and over the last tenth (lower: opening costs more with many streams open)
    memory_before_kib: int | None  # None: the route has no process of its own (direct TCP)
    memory_held_kib: int | None
    memory_after_close_kib: int | None
    stopped_by: str  # "" when all were opened

    @property
    def kib_per_stream(self) -> float:
        if self.memory_before_kib is None or self.memory_held_kib is None or not self.alive:
            return float("nan")
        return (self.memory_held_kib - self.memory_before_kib) / self.alive


# -- single connections -------------------------------------------------------------------------------------------


def read_greeting(sock: socket.socket) -> None:
    """Read the server's greeting; raises ConnectionError when the connection closes first."""
    received = b""
    while len(received) < len(GREETING):
        chunk = sock.recv(len(GREETING) - len(received))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(received)} greeting bytes")
        received += chunk
    if received != GREETING:
        raise ConnectionError(f"unexpected greeting {received[:40]!r}")


def _download(route: Route, size: int, deadline: float, start: threading.Barrier | None) -> tuple[int, float, float]:
    sock = route.connect()
    with sock:
        read_greeting(sock)
        buffer = bytearray(CHUNK)
        if start is not None:
            start.wait()
        began = time.perf_counter()
        sock.sendall(COMMAND.pack(b"R", size))
        received = 0
        while received < size and time.monotonic() < deadline:
            count = sock.recv_into(buffer)
            if not count:
                break
            received += count
        return received, began, time.perf_counter()


def _upload(route: Route, size: int, deadline: float, start: threading.Barrier | None) -> tuple[int, float, float]:
    sock = route.connect()
    with sock:
        read_greeting(sock)
        block = memoryview(bytes(CHUNK))
        if start is not None:
            start.wait()
        began = time.perf_counter()
        sock.sendall(COMMAND.pack(b"S", size))
        sent = 0
        while sent < size and time.monotonic() < deadline:
            piece = min(CHUNK, size - sent)
            sock.sendall(block[:piece])
            sent += piece
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            chunk = sock.recv(8 - len(answer))
            if not chunk:
                raise ConnectionError(f"{route.name}: sink closed without its count ({sent} bytes sent)")
            answer += chunk
        return struct.unpack("!Q", answer)[0], began, time.perf_counter()


def throughput(route: Route, *, streams: int, direction: str, size: int, time_limit: float) -> Throughput:
    """Move ``size`` bytes per stream (or as much as fits in ``time_limit``) over ``streams`` parallel streams."""
    transfer = _download if direction == "down" else _upload
    deadline = time.monotonic() + time_limit
    meter = CpuMeter(route)
    if streams == 1:
        meter.start()
        count, began, ended = transfer(route, size, deadline, None)
        return Throughput(1, direction, count, ended - began, meter.stop())
    barrier = threading.Barrier(streams, timeout=30)
    results: list[tuple[int, float, float]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(transfer(route, size, deadline, barrier))
        except BaseException as exc:  # reported below, with the route's name
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, name=f"{route.name} stream {i}") for i in range(streams)]
    meter.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(time_limit + 60)
    if errors or len(results) != streams:
        raise RuntimeError(f"{route.name}: {streams}-stream {direction} failed: {errors[:1] or 'stuck stream'}")
    cpu = meter.stop()
    total = sum(r[0] for r in results)
    return Throughput(streams, direction, total, max(r[2] for r in results) - min(r[1] for r in results), cpu)


def latency(route: Route, *, count: int, time_limit: float) -> Latency:
    """Open ``count`` connections one after another; each sample is connect (and proxy handshake) + greeting."""
    samples: list[float] = []
    failures = 0
    deadline = time.monotonic() + time_limit
    meter = CpuMeter(route)
    meter.start()
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        began = time.perf_counter()
        try:
            sock = route.connect()
            with sock:
                read_greeting(sock)
                samples.append(time.perf_counter() - began)
        except OSError:
            failures += 1
    return Latency(sorted(samples), failures, meter.stop())


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, including reaped children) of ``pids`` so far, from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone: a reaped child's time is in its parent's cutime/cstime
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds the route's processes spend between ``start()`` and ``stop()`` (None: no processes)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.began = 0.0

    def start(self) -> None:
        if self.route.pids is not None:
            self.began = cpu_seconds(self.route.pids())

    def stop(self) -> float | None:
        if self.route.pids is None:
            return None
        return cpu_seconds(self.route.pids()) - self.began


# -- many idle streams --------------------------------------------------------------------------------------------


def memory_kib(pids: list[int], field_name: str = "VmRSS") -> int:
    """Sum of ``VmRSS`` (/proc/PID/status) or ``Pss`` (/proc/PID/smaps_rollup) of ``pids``, in KiB."""
    total = 0
    for pid in pids:
        path = Path(f"/proc/{pid}/status" if field_name == "VmRSS" else f"/proc/{pid}/smaps_rollup")
        try:
            text = path.read_text()
        except OSError:
            continue  # the process is gone (a forked socat child that ended)
        for line in text.splitlines():
            if line.startswith(field_name + ":"):
                total += int(line.split()[1])
                break
    return total


def concurrency(route: Route, *, target: int, time_limit: float, settle: float = 1.0) -> Concurrency:
    """Open up to ``target`` idle echo streams, prove each alive, measure memory, then close them all."""

    def memory() -> int | None:
        return None if route.pids is None else memory_kib(route.pids(), route.memory_field)

    before = memory()
    held: list[socket.socket] = []
    opened_at: list[float] = []
    stopped_by = ""
    began = time.monotonic()
    deadline = began + time_limit
    try:
        while len(held) < target:
            if time.monotonic() > deadline:
                stopped_by = f"time limit {time_limit:.0f} s"
                break
            try:
                sock = route.connect()
            except OSError as exc:
                stopped_by = f"open failed: {type(exc).__name__}: {exc}"
                break
            held.append(sock)
            try:
                read_greeting(sock)
                sock.sendall(COMMAND.pack(b"E", 0))
            except OSError as exc:
                stopped_by = f"stream {len(held)} broke: {type(exc).__name__}: {exc}"
                break
            opened_at.append(time.monotonic())
        opened = len(held)
        seconds = time.monotonic() - began
        alive = _prove_alive(held, deadline=time.monotonic() + max(30.0, time_limit / 4))
        time.sleep(settle)  # let the processes finish any buffered work before reading memory
        memory_held = memory()
    finally:
        for sock in held:
            sock.close()
    time.sleep(settle * 2)
    after = memory()
    tenth = max(1, len(opened_at) // 10)
    first = _rate(began, opened_at[:tenth])
    last = _rate(opened_at[-tenth - 1] if len(opened_at) > tenth else began, opened_at[-tenth:])
    return Concurrency(target, opened, alive, seconds, first, last, before, memory_held, after, stopped_by)


def _rate(since: float, stamps: list[float]) -> float:
    return len(stamps) / (stamps[-1] - since) if stamps and stamps[-1] > since else float("nan")


def _prove_alive(socks: list[socket.socket], *, deadline: float) -> int:
    """Send one byte on every stream, then read each echo; returns how many answered before the deadline."""
    for sock in socks:
        try:
            sock.sendall(b"x")
        except OSError:
            continue
    alive = 0
    for sock in socks:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            sock.settimeout(min(remaining, 10.0))
            if sock.recv(1) == b"x":
                alive += 1
        except OSError:
            continue
    return alive
