"""Real postbridge processes for end-to-end tests: a hub and connectors, each in its own home folder.

Owns: running the CLI as a user would (``python -m postbridge --home H ...``), starting ``cloud serve`` and
``connector run`` as child processes on free loopback ports, waiting until a connector's tunnel is up (by the hub's
own API), and stopping everything. Must not: reach into the processes' internals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import LOOPBACK, free_ports

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def cli(
    home: Path, *args: str, check: bool = True, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``postbridge --home HOME ARGS`` and return the finished process (raises on failure with ``check``)."""
    result = subprocess.run(
        [sys.executable, "-m", "postbridge", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        input=stdin,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"postbridge {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class Connector:
    home: Path
    identity: dict[str, str]
    process: Process | None = None


@dataclass
class Stack:
    """A hub (in ``root/cloud-home``) and any number of connectors, all real processes."""

    root: Path
    subaccount: str = "acme"
    secret: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    hub: Process | None = None
    connectors: list[Connector] = field(default_factory=list)
    hub_args: tuple[str, ...] = ()

    @property
    def cloud_home(self) -> Path:
        return self.root / "cloud-home"

    @property
    def socks_port(self) -> int:
        return self.ports["socks"]

    @property
    def tunnel_port(self) -> int:
        return self.ports["tunnel"]

    @property
    def api_url(self) -> str:
        return f"https://{LOOPBACK}:{self.ports['api']}"

    def init(self) -> Stack:
        tunnel, socks, api = free_ports(3)
        self.ports = {"tunnel": tunnel, "socks": socks, "api": api}
        cli(self.cloud_home, "cloud", "init", "--hostname", "localhost", "--hostname", LOOPBACK)
        created = json.loads(cli(self.cloud_home, "cloud", "subaccount", "add", self.subaccount, "--json").stdout)
        self.secret = created["client_secret"]
        return self

    def start_hub(self, *extra: str) -> Process:
        args = extra or self.hub_args
        self.hub = self._spawn(
            "hub",
            self.cloud_home,
            "cloud",
            "serve",
            "--tunnel-listen",
            f"{LOOPBACK}:{self.tunnel_port}",
            "--socks-listen",
            f"{LOOPBACK}:{self.socks_port}",
            "--api-listen",
            f"{LOOPBACK}:{self.ports['api']}",
            *args,
        )
        self._wait_port(self.socks_port, self.hub)
        self._wait_port(self.ports["api"], self.hub)
        return self.hub

    def enroll(self, location: str = "dc1", name: str | None = None) -> Connector:
        home = self.root / (name or f"connector-{len(self.connectors) + 1}")
        token = cli(self.cloud_home, "cloud", "enroll", self.subaccount, "--location", location, "--json")
        text = json.loads(token.stdout)["token"]
        cli(home, "connector", "enroll", "--cloud", f"{LOOPBACK}:{self.tunnel_port}", "--token", text)
        identity = json.loads((home / "connector" / "identity.json").read_text())
        connector = Connector(home, identity)
        self.connectors.append(connector)
        return connector

    def start_connector(self, connector: Connector, *extra: str, wait: bool = True) -> Process:
        index = self.connectors.index(connector) + 1
        connector.process = self._spawn(f"connector-{index}", connector.home, "connector", "run", *extra)
        if wait:
            self.wait_connected(connector.identity["connector_id"])
        return connector.process

    def map(self, connector: Connector, virtual: str, internal: str, *extra: str) -> None:
        cli(connector.home, "connector", "mapping", "add", virtual, "--to", internal, *extra)

    # -- observing ----------------------------------------------------------------------------------------------

    def token(self) -> str:
        response = httpx.post(
            f"{self.api_url}/oauth/token",
            data={"grant_type": "client_credentials", "client_id": self.subaccount, "client_secret": self.secret},
            verify=self.ca_context(),
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def connected(self) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.api_url}/v1/connectors",
            headers={"authorization": f"Bearer {self.token()}"},
            verify=self.ca_context(),
        )
        response.raise_for_status()
        connectors: list[dict[str, Any]] = response.json()["connectors"]
        return connectors

    def wait_connected(self, connector_id: str, timeout: float = 15, *, gone: bool = False) -> float:
        """Wait until the hub lists (or, with ``gone``, no longer lists) the connector; returns the seconds taken."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                ids = {c["connector_id"] for c in self.connected()}
            except (httpx.HTTPError, OSError):
                time.sleep(0.05)
                continue  # no answer is no evidence either way
            if (connector_id in ids) != gone:
                return time.monotonic() - start
            time.sleep(0.05)
        logs = "\n".join(f"--- {c.process.name}\n{c.process.log()[-3000:]}" for c in self.connectors if c.process)
        hub_log = self.hub.log()[-3000:] if self.hub else ""
        state = "still" if gone else "not"
        raise AssertionError(f"connector {connector_id} {state} connected after {timeout}s\n--- hub\n{hub_log}\n{logs}")

    def ca_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cloud_home / "cloud" / "ca.pem"))

    def stop(self) -> None:
        for connector in self.connectors:
            if connector.process:
                connector.process.stop()
        if self.hub:
            self.hub.stop()

    # -- internals ----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, home: Path, *args: str) -> Process:
        log_path = self.root / f"{name}.log"
        handle = log_path.open("a")
        popen = subprocess.Popen(
            [sys.executable, "-m", "postbridge", "--home", str(home), "--log-level", "debug", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        handle.close()
        return Process(name, popen, log_path)

    def _wait_port(self, port: int, process: Process, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise AssertionError(f"{process.name} exited:\n{process.log()}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{process.name} does not listen on {port}:\n{process.log()}")


def socks_connect(
    port: int, host: str, target_port: int, username: str, password: str, *, timeout: float = 10
) -> tuple[int, socket.socket]:
    """A minimal blocking SOCKS5 client (RFC 1928/1929, domain address): returns (reply code, socket).

    Kept raw on purpose: the tests must see the exact reply byte, and the socket is handed back for data.
    """
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.sendall(b"\x05\x01\x02")
    assert _recv(sock, 2) == b"\x05\x02"
    user, secret = username.encode(), password.encode()
    sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret)
    status = _recv(sock, 2)
    if status[1] != 0:
        sock.close()
        return 0xFF, sock
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", target_port))
    reply = _recv(sock, 4)
    if reply[3] == 1:
        _recv(sock, 6)
    elif reply[3] == 4:
        _recv(sock, 18)
    else:
        _recv(sock, _recv(sock, 1)[0] + 2)
    return reply[1], sock


def _recv(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"SOCKS5 server closed after {len(data)} of {count} bytes")
        data += chunk
    return data
