"""Resilience of real hub and connector processes: kills, restarts, frozen networks, failover, drain, egress proxy.

Every test drives real ``postbridge cloud serve`` / ``postbridge connector run`` processes (``tests/harness.py``)
and observes them only from outside: SOCKS5 replies, the hub's HTTP API, audit logs and process logs. Timing
figures (reconnect p50/p95, detection times) are printed; run with ``-s`` to see them.

A frozen process (SIGSTOP) stands for a dead network: it keeps its TCP connections but answers nothing.
"""

from __future__ import annotations

import json
import signal
import socket
import socketserver
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Connector, Process, Stack, cli, socks_connect
from tests.servers import LOOPBACK
from tests.servers.tinyproxy import Tinyproxy

pytestmark = pytest.mark.e2e

USER = "acme/dc1"
HOST = "mail.corp.example"
PORT = 25
VIRTUAL = f"{HOST}:{PORT}"
GREETING = b"220 test.server ready\r\n"
DEFAULT_DEAD_AFTER = 30.0  # the design's liveness limit, and the hub's default --dead-after
SLACK = 2.0  # polling the hub's API and process scheduling
DRAIN_GRACE = 10.0  # how long a stopping connector lets running streams finish


# -- helpers ----------------------------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def open_greeted(stack: Stack, host: str = HOST, port: int = PORT, *, timeout: float = 10) -> socket.socket:
    """A SOCKS5 CONNECT that must succeed and deliver the line server's greeting first."""
    reply, sock = socks_connect(stack.socks_port, host, port, USER, stack.secret, timeout=timeout)
    if reply != 0:
        sock.close()
        raise AssertionError(f"SOCKS5 CONNECT {host}:{port} answered 0x{reply:02x}, expected 0x00")
    greeting = recv_exactly(sock, len(GREETING))
    assert greeting == GREETING
    return sock


def reply_code(stack: Stack, host: str = HOST, port: int = PORT) -> int:
    """The SOCKS5 reply code of one CONNECT (the socket is closed at once)."""
    reply, sock = socks_connect(stack.socks_port, host, port, USER, stack.secret)
    sock.close()
    return reply


def open_echo(stack: Stack) -> socket.socket:
    sock = open_greeted(stack)
    sock.sendall(b"ECHO\r\n")
    return sock


def echo_works(sock: socket.socket, payload: bytes, timeout: float = 3) -> bool:
    """One round trip through an ECHO session; False when the stream is gone (reset, EOF or silent)."""
    try:
        sock.settimeout(timeout)
        sock.sendall(payload)
        return recv_exactly(sock, len(payload)) == payload
    except OSError:
        return False


def allowed_records(connector: Connector) -> int:
    """How many ``access-allowed`` records the connector's audit log holds."""
    path = connector.home / "connector" / "audit.log"
    if not path.exists():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(1 for record in records if record["event"] == "access-allowed")


def connector_id(connector: Connector) -> str:
    return connector.identity["connector_id"]


def process_of(connector: Connector) -> Process:
    assert connector.process is not None, "connector was never started"
    return connector.process


def listed(stack: Stack, timeout: float = 20) -> list[dict[str, Any]]:
    """``GET /v1/connectors`` with an explicit timeout (the harness' default of 5 s hides slow answers)."""
    headers = {"authorization": f"Bearer {stack.token()}"}
    response = httpx.get(f"{stack.api_url}/v1/connectors", headers=headers, verify=stack.ca_context(), timeout=timeout)
    response.raise_for_status()
    connectors: list[dict[str, Any]] = response.json()["connectors"]
    return connectors


def entry_of(stack: Stack, connector: Connector) -> dict[str, Any] | None:
    found = [e for e in listed(stack) if e["connector_id"] == connector_id(connector)]
    assert len(found) <= 1, f"connector listed twice: {found}"
    return found[0] if found else None


def connected_count(stack: Stack) -> int:
    """Sessions in the hub's registry, from ``/healthz`` (it never waits for a connector to answer)."""
    response = httpx.get(f"{stack.api_url}/healthz", verify=stack.ca_context(), timeout=5)
    response.raise_for_status()
    return int(response.json()["connectors"])


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took, fails naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached within {timeout:g} s")


def wait_for_port(port: int, timeout: float) -> float:
    """Poll a loopback port until it accepts; returns the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return time.monotonic()
        except OSError:
            time.sleep(0.01)
    raise AssertionError(f"port {port} did not accept within {timeout:g} s")


def first_successful_connect(stack: Stack, timeout: float) -> tuple[float, list[int]]:
    """Retry CONNECT until one succeeds; returns its monotonic time and the reply codes seen before."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        try:
            reply, sock = socks_connect(stack.socks_port, HOST, PORT, USER, stack.secret, timeout=5)
        except (OSError, AssertionError):  # SOCKS port not open yet, or closed under us
            time.sleep(0.01)
            continue
        with sock:
            if reply == 0 and recv_exactly(sock, len(GREETING)) == GREETING:
                return time.monotonic(), seen
        seen.append(reply)
        time.sleep(0.02)
    raise AssertionError(f"no successful CONNECT within {timeout:g} s; replies seen: {sorted(set(seen))}")


def map_line_server(stack: Stack, connector: Connector, line_server: int) -> None:
    stack.map(connector, VIRTUAL, f"{LOOPBACK}:{line_server}")


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolation percentile (``statistics.quantiles`` inclusive method)."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(fraction * 100) - 1]


@pytest.fixture
def quick_stack(tmp_path: Path) -> Iterator[Stack]:
    """A hub that pings every second and drops a tunnel after 3 s of silence."""
    stack = Stack(tmp_path, hub_args=("--ping-interval", "1", "--dead-after", "3")).init()
    stack.start_hub()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def pair(stack: Stack, line_server: int) -> tuple[Connector, Connector]:
    """Two connectors enrolled at the same location 'dc1', both mapping mail.corp.example:25 to the line server."""
    first, second = stack.enroll("dc1"), stack.enroll("dc1")
    for connector in (first, second):
        map_line_server(stack, connector, line_server)
        stack.start_connector(connector)
    return first, second


# -- 1. kill and restart ------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_hub_killed_and_restarted_connector_is_usable_again_within_5s_p95(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    map_line_server(stack, connected, line_server)
    open_greeted(stack).close()
    delays: list[float] = []
    replies: set[int] = set()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for _ in range(10):
            assert stack.hub is not None
            stack.hub.kill()
            starting = pool.submit(stack.start_hub)  # same home, same ports
            listening_at = wait_for_port(stack.tunnel_port, timeout=20)
            usable_at, seen = first_successful_connect(stack, timeout=30)
            starting.result(timeout=30)
            delays.append(usable_at - listening_at)
            replies.update(seen)
    p50, p95 = percentile(delays, 0.50), percentile(delays, 0.95)
    print(
        f"\nhub restart -> first successful CONNECT over {len(delays)} cycles: p50 {p50:.2f} s, p95 {p95:.2f} s, "
        f"max {max(delays):.2f} s; all: {', '.join(f'{d:.2f}' for d in delays)}"
    )
    assert process_of(connected).alive()
    assert replies <= {0x03}, f"while the connector was away the hub answered {sorted(replies)}, expected only 0x03"
    assert p95 <= 5.0, f"connector usable again after p95 {p95:.2f} s (> 5 s): {delays}"


def test_connector_killed_and_restarted_is_usable_again(stack: Stack, connected: Connector, line_server: int) -> None:
    map_line_server(stack, connected, line_server)
    open_greeted(stack).close()
    process_of(connected).kill()
    noticed = stack.wait_connected(connector_id(connected), timeout=10, gone=True)
    print(f"\nSIGKILLed connector dropped by the hub after {noticed:.2f} s")
    assert noticed < 2.0, "the hub should notice the closed TCP connection of a killed connector at once"
    assert reply_code(stack) == 0x03
    started = time.monotonic()
    stack.start_connector(connected)
    open_greeted(stack).close()
    print(f"restarted connector usable after {time.monotonic() - started:.2f} s")


# -- 2. silent network --------------------------------------------------------------------------------------------


def test_frozen_connector_is_dropped_then_reconnects_by_itself(quick_stack: Stack, line_server: int) -> None:
    stack = quick_stack
    connector = stack.enroll("dc1")
    map_line_server(stack, connector, line_server)
    stack.start_connector(connector)
    open_greeted(stack).close()
    process = process_of(connector)

    process.signal(signal.SIGSTOP)
    detected = wait_until(lambda: connected_count(stack) == 0, 15, "hub drops the frozen connector")
    print(f"\nfrozen connector dropped after {detected:.2f} s (hub --ping-interval 1 --dead-after 3)")
    assert 1.5 <= detected <= 5.5, f"dropped after {detected:.2f} s, expected 3-5 s (dead-after 3 s, pings 1 s)"
    assert reply_code(stack) == 0x03

    process.signal(signal.SIGCONT)
    back = stack.wait_connected(connector_id(connector), timeout=15)
    print(f"connector reconnected by itself {back:.2f} s after SIGCONT")
    open_greeted(stack).close()
    assert process.alive()


@pytest.mark.timeout(120)
def test_frozen_connector_is_detected_within_30s_with_default_settings(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    map_line_server(stack, connected, line_server)
    open_greeted(stack).close()  # traffic just before the network dies
    process_of(connected).signal(signal.SIGSTOP)
    detected = wait_until(
        lambda: connected_count(stack) == 0, DEFAULT_DEAD_AFTER + 15, "hub drops the frozen connector (defaults)"
    )
    print(f"\nfrozen connector dropped after {detected:.2f} s with the default liveness settings")
    assert reply_code(stack) == 0x03
    assert detected <= DEFAULT_DEAD_AFTER + SLACK, (
        f"a silent connector was dropped only after {detected:.1f} s; the design says no answer within "
        f"{DEFAULT_DEAD_AFTER:g} s = dead session"
    )


def test_cockpit_api_answers_while_a_connector_is_frozen(stack: Stack, connected: Connector) -> None:
    process_of(connected).signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        entries = listed(stack, timeout=5)
    except httpx.TimeoutException:
        entries = None
    took = time.monotonic() - started
    print(f"\nGET /v1/connectors with a frozen connector answered after {took:.2f} s")
    assert entries is not None and took <= 2.0, (
        f"GET /v1/connectors took {took:.1f} s (or timed out) while a connector was frozen: "
        "it must answer from cached info"
    )
    assert [e["connector_id"] for e in entries] == [connector_id(connected)]


# -- 3. stale session eviction ------------------------------------------------------------------------------------


def test_new_session_of_the_same_connector_evicts_the_stale_one_at_once(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    map_line_server(stack, connected, line_server)
    open_greeted(stack).close()
    before = entry_of(stack, connected)
    assert before is not None
    stale = process_of(connected)
    stale.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        fresh = stack.start_connector(connected, wait=False)  # same home, same identity
        took = wait_until(
            lambda: (now := entry_of(stack, connected)) is not None and now["peer"] != before["peer"],
            5,
            "the new session replaces the stale one",
        )
        open_greeted(stack).close()  # at once, without waiting for the liveness timeout
        print(f"\nstale session replaced {took:.2f} s after starting the second process")
        assert time.monotonic() - started < 5.0, "eviction must not wait for the liveness timeout"
        hub_log = stack.hub.log() if stack.hub else ""
        lines = [line for line in hub_log.splitlines() if connector_id(connected) in line and before["peer"] in line]
        assert any("replac" in line or "reconnect" in line for line in lines), (
            f"hub log does not mention that session {before['peer']} was replaced:\n{hub_log[-3000:]}"
        )
    finally:
        stale.kill()
    time.sleep(0.5)
    after = entry_of(stack, connected)
    assert after is not None and after["peer"] != before["peer"]
    assert fresh.alive()
    open_greeted(stack).close()


# -- 4. several connectors at one location ------------------------------------------------------------------------


def wait_idle(stack: Stack) -> None:
    wait_until(lambda: all(e["active_streams"] == 0 for e in listed(stack)), 5, "all streams closed")


def test_sequential_connections_are_spread_over_connectors_of_one_location(
    stack: Stack, pair: tuple[Connector, Connector]
) -> None:
    before = [allowed_records(c) for c in pair]
    for _ in range(20):
        open_greeted(stack).close()
        wait_idle(stack)  # one connection at a time, as a mailbox poller does
    spread = [allowed_records(c) - b for c, b in zip(pair, before, strict=True)]
    print(f"\n20 sequential connections per connector: {spread}")
    assert sum(spread) == 20
    assert min(spread) >= 3, f"connections were not spread over both connectors: {spread}"


def test_killed_connector_of_a_location_leaves_the_other_one_serving(
    stack: Stack, pair: tuple[Connector, Connector]
) -> None:
    first, second = pair
    before = [allowed_records(c) for c in pair]
    held = [open_echo(stack) for _ in range(10)]  # all open at once
    try:
        spread = [allowed_records(c) - b for c, b in zip(pair, before, strict=True)]
        print(f"\n10 concurrent streams per connector: {spread}")
        assert sum(spread) == 10 and min(spread) >= 3, f"concurrent streams not spread: {spread}"

        process_of(first).kill()
        noticed = stack.wait_connected(connector_id(first), timeout=10, gone=True)
        print(f"SIGKILLed connector dropped after {noticed:.2f} s")
        assert noticed < 2.0
        alive = [i for i, sock in enumerate(held) if echo_works(sock, f"still there {i}\n".encode())]
        assert len(alive) == spread[1], f"{len(alive)} streams survive, expected the second connector's {spread[1]}"

        on_second = allowed_records(second)
        for _ in range(20):
            open_greeted(stack).close()  # none may fail once the hub noticed
        assert allowed_records(second) - on_second == 20
    finally:
        for sock in held:
            sock.close()


# -- 5. egress proxy ----------------------------------------------------------------------------------------------


def test_connector_enrolls_and_tunnels_through_an_egress_proxy(stack: Stack, line_server: int, tmp_path: Path) -> None:
    hub_target = f"{LOOPBACK}:{stack.tunnel_port}"
    with Tinyproxy(tmp_path / "tinyproxy") as proxy:
        created = cli(stack.cloud_home, "cloud", "enroll", stack.subaccount, "--location", "dc1", "--json")
        home = tmp_path / "proxied-connector"
        token = json.loads(created.stdout)["token"]
        cli(home, "connector", "enroll", "--cloud", hub_target, "--token", token, "--egress-proxy", proxy.url)
        wait_until(lambda: len(proxy.connect_targets()) >= 2, 5, "tinyproxy logs the enrollment CONNECTs")
        for_enrollment = len(proxy.connect_targets())

        identity = json.loads((home / "connector" / "identity.json").read_text())
        connector = Connector(home, identity)
        stack.connectors.append(connector)  # so that the stack stops it
        map_line_server(stack, connector, line_server)
        stack.start_connector(connector, "--egress-proxy", proxy.url)
        open_greeted(stack).close()
        wait_until(lambda: len(proxy.connect_targets()) > for_enrollment, 5, "tinyproxy logs the tunnel CONNECT")
        assert set(proxy.connect_targets()) == {hub_target}, proxy.connect_targets()
    # the tunnel really ran through the proxy: without it the hub loses the connector
    stack.wait_connected(identity["connector_id"], timeout=10, gone=True)
    assert reply_code(stack) == 0x03


# -- 6. graceful shutdown -----------------------------------------------------------------------------------------


def draining(stack: Stack, connector: Connector) -> bool:
    entry = entry_of(stack, connector)
    return entry is not None and bool(entry["draining"])


def test_sigterm_drains_open_streams_and_routes_new_ones_elsewhere(
    stack: Stack, pair: tuple[Connector, Connector]
) -> None:
    before = [allowed_records(c) for c in pair]
    kept = open_echo(stack)
    took = [allowed_records(c) - b for c, b in zip(pair, before, strict=True)]
    assert sorted(took) == [0, 1]
    leaving, staying = pair if took[0] == 1 else pair[::-1]
    assert echo_works(kept, b"before\n")

    process_of(leaving).signal(signal.SIGTERM)
    terminated = time.monotonic()
    wait_until(lambda: draining(stack, leaving), 5, "the hub sees the connector draining")

    # a new connection during the drain goes to the other connector
    leaving_records, staying_records = allowed_records(leaving), allowed_records(staying)
    moved = open_echo(stack)
    assert allowed_records(staying) == staying_records + 1
    assert allowed_records(leaving) == leaving_records

    # the stream that was open keeps working until the drain grace ends or the stream closes
    round_trips = 0
    while process_of(leaving).alive() and time.monotonic() - terminated < 20:
        if not echo_works(kept, f"drain {round_trips}\n".encode()):
            break
        round_trips += 1
        time.sleep(0.25)
    lived = time.monotonic() - terminated
    wait_until(lambda: not process_of(leaving).alive(), max(2.0, 20 - lived), "draining connector exits")
    exited = time.monotonic() - terminated
    print(f"\nafter SIGTERM: {round_trips} echo round trips over {lived:.1f} s; connector exited after {exited:.1f} s")
    assert round_trips >= 3, f"the open stream stopped working right after SIGTERM ({round_trips} round trips)"
    assert exited <= DRAIN_GRACE + 5, f"draining connector exited only after {exited:.1f} s"
    assert process_of(leaving).popen.returncode == 0, process_of(leaving).log()[-2000:]
    kept.close()

    # alone and draining: new connections are refused as 'no connector', the open one goes on until it closes
    assert echo_works(moved, b"moved\n")
    process_of(staying).signal(signal.SIGTERM)
    wait_until(lambda: draining(stack, staying), 5, "the hub sees the last connector draining")
    assert reply_code(stack) == 0x03
    assert echo_works(moved, b"still draining\n")
    closed = time.monotonic()
    moved.close()
    wait_until(lambda: not process_of(staying).alive(), 5, "connector exits once its last stream closed")
    print(f"last connector exited {time.monotonic() - closed:.2f} s after its last stream closed")
    assert process_of(staying).popen.returncode == 0


# -- 7. live mapping changes --------------------------------------------------------------------------------------


def test_mapping_changes_apply_at_once_without_reconnect(stack: Stack, connected: Connector, line_server: int) -> None:
    before = entry_of(stack, connected)
    assert before is not None
    assert reply_code(stack, "new.corp.example", 143) == 0x02
    stack.map(connected, "new.corp.example:143", f"{LOOPBACK}:{line_server}")
    open_greeted(stack, "new.corp.example", 143).close()
    cli(connected.home, "connector", "mapping", "remove", "new.corp.example:143")
    assert reply_code(stack, "new.corp.example", 143) == 0x02
    stack.map(connected, "new.corp.example:143", f"{LOOPBACK}:{line_server}")
    open_greeted(stack, "new.corp.example", 143).close()

    after = entry_of(stack, connected)
    assert after is not None and after["peer"] == before["peer"], "the tunnel was re-established"
    tunnel_up = [line for line in process_of(connected).log().splitlines() if "tunnel up" in line]
    assert len(tunnel_up) == 1, tunnel_up


# -- 8. early close does not leak ---------------------------------------------------------------------------------


class CountingBackend(socketserver.ThreadingTCPServer):
    """A loopback backend that greets, reads until the client goes, and counts connections that are still open."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _CountingHandler)
        self.lock = threading.Lock()
        self.open = 0
        self.total = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _CountingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, CountingBackend)
        with server.lock:
            server.open += 1
            server.total += 1
        sock: socket.socket = self.request
        try:
            sock.sendall(GREETING)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            with server.lock:
                server.open -= 1


@pytest.fixture
def counting_backend() -> Iterator[CountingBackend]:
    server = CountingBackend()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def close_now(sock: socket.socket, *, reset: bool) -> None:
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect_and_hang_up(stack: Stack, *, reset: bool) -> None:
    """Authenticate, send CONNECT for the mapped host, and close before the reply arrives."""
    sock = socket.create_connection((LOOPBACK, stack.socks_port), timeout=10)
    sock.sendall(b"\x05\x01\x02")
    assert recv_exactly(sock, 2) == b"\x05\x02"
    user, secret = USER.encode(), stack.secret.encode()
    sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret)
    assert recv_exactly(sock, 2) == b"\x01\x00"
    name = HOST.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", PORT))
    close_now(sock, reset=reset)


def test_clients_closing_early_leak_no_streams(
    stack: Stack, connected: Connector, counting_backend: CountingBackend
) -> None:
    stack.map(connected, VIRTUAL, f"{LOOPBACK}:{counting_backend.port}")
    for i in range(50):
        connect_and_hang_up(stack, reset=i % 2 == 1)
    for i in range(50):
        reply, sock = socks_connect(stack.socks_port, HOST, PORT, USER, stack.secret)
        assert reply == 0
        close_now(sock, reset=i % 2 == 1)

    def hub_streams() -> int:
        entry = entry_of(stack, connected)
        assert entry is not None, "the connector dropped out"
        return int(entry["active_streams"])

    took = wait_until(lambda: hub_streams() == 0, 5, "the hub's active_streams back to 0")
    wait_until(lambda: counting_backend.open == 0, 5, "the connector closes every backend connection")
    print(
        f"\nafter 100 early closes: hub idle after {took:.2f} s, "
        f"{counting_backend.total} backend connections made, all closed"
    )
    assert 50 <= counting_backend.total <= 100
    open_greeted(stack).close()  # the tunnel is still healthy
    assert process_of(connected).alive()
    for name, log in (("hub", stack.hub.log() if stack.hub else ""), ("connector", process_of(connected).log())):
        assert "Traceback" not in log, f"{name} log has a traceback:\n{log[-3000:]}"


def test_hub_sigterm_drains_open_streams_before_closing(stack: Stack, connected: Connector, line_server: int) -> None:
    """SIGTERM on the hub: running streams keep working during the drain; the hub then exits cleanly."""
    stack.map(connected, "svc.corp.example:25", f"127.0.0.1:{line_server}")
    reply, sock = socks_connect(stack.socks_port, "svc.corp.example", 25, "acme/dc1", stack.secret)
    assert reply == 0
    assert sock.recv(100).startswith(b"220 ")
    sock.sendall(b"ECHO\r\n")
    assert stack.hub is not None
    stack.hub.signal(signal.SIGTERM)
    time.sleep(0.5)
    for round_trip in range(5):  # the stream outlives the start of the shutdown
        message = f"round {round_trip}".encode()
        sock.sendall(message)
        assert sock.recv(100) == message
        time.sleep(0.2)
    sock.close()  # the last stream ends: the hub may finish now
    assert stack.hub.popen.wait(15) == 0
    assert "draining 1 tunnel(s) with 1 open stream(s)" in stack.hub.log()
