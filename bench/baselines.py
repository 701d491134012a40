"""The comparison routes the tunnel is measured against, started on loopback by the benchmark itself.

Owns: a ``socat TCP-LISTEN:p,fork,reuseaddr TCP:127.0.0.1:server`` relay, and OpenSSH remote forwarding: a
private ``sshd`` (generated host key, an ``authorized_keys`` for a generated client key, listening on 127.0.0.1
only, all files in a temporary folder) and ``ssh -N -R 127.0.0.1:PORT:127.0.0.1:SERVER`` to it. Both are context
managers that stop what they started (by process id) and explain why they cannot run when a program is missing.
Must not: touch the machine's own sshd configuration, keys or known_hosts, or listen anywhere but 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"
SSHD = "/usr/sbin/sshd"


class Unavailable(Exception):
    """A baseline cannot run here; the message says why and how to get it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    """Wait until ``port`` accepts connections; raises Unavailable when ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"{what} exited with status {process.returncode} before listening on {port}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat), for summing the memory of forking servers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class Socat:
    """``socat`` forking relay from a free loopback port to the server."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Socat:
        program = shutil.which("socat")
        if program is None:
            raise Unavailable("socat is not installed (apt-get install socat, or run scripts/setup-dev)")
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                program,
                f"TCP-LISTEN:{self.port},bind={LOOPBACK},fork,reuseaddr,backlog=4096",
                f"TCP:{LOOPBACK}:{self.server_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.process, "socat")
        return self

    def pids(self) -> list[int]:
        return descendants(self.process.pid) if self.process else []

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        stop(self.process)


class SshRemoteForward:
    """A private sshd on loopback and ``ssh -N -R`` through it; connect to :attr:`port` to reach the server."""

    def __init__(self, server_port: int, folder: Path) -> None:
        self.server_port = server_port
        self.folder = folder
        self.sshd_port = 0
        self.port = 0
        self.cipher = "unknown"
        self.sshd: subprocess.Popen[bytes] | None = None
        self.ssh: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshRemoteForward:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        ssh, keygen = shutil.which("ssh"), shutil.which("ssh-keygen")
        if not (os.access(SSHD, os.X_OK) and ssh and keygen):
            raise Unavailable("OpenSSH is not installed (apt-get install openssh-server openssh-client)")
        if os.geteuid() != 0:
            raise Unavailable("a private sshd for 'ssh -R' needs root here (it switches users for the session)")
        self.folder.mkdir(parents=True, exist_ok=True)
        host_key, client_key = self.folder / "host_ed25519", self.folder / "client_ed25519"
        for key in (host_key, client_key):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's sshd wants its privilege separation folder
        self.sshd_port = free_port()
        config = self.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.sshd_port}",
                    f"ListenAddress {LOOPBACK}",
                    f"HostKey {host_key}",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "AllowTcpForwarding remote",
                    "GatewayPorts no",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self.sshd = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.folder / "sshd.log").open("ab"),
        )
        wait_listening(self.sshd_port, self.sshd, "sshd")
        base = [
            ssh,
            "-i",
            str(client_key),
            "-p",
            str(self.sshd_port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-F",
            "/dev/null",
        ]
        self.cipher = self._negotiated_cipher(base)
        self.port = free_port()
        self.ssh = subprocess.Popen(
            [
                *base,
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                f"{LOOPBACK}:{self.port}:{LOOPBACK}:{self.server_port}",
                f"root@{LOOPBACK}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.folder / "ssh.log").open("ab"),
        )
        wait_listening(self.port, self.ssh, "ssh -R")

    def _negotiated_cipher(self, base: list[str]) -> str:
        """Run one short session with ``-v`` and read the cipher OpenSSH chose (its default preference)."""
        probe = subprocess.run(
            [*base, "-v", "-o", "LogLevel=DEBUG1", f"root@{LOOPBACK}", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        found = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", probe.stderr)
        if probe.returncode != 0 or found is None:
            raise Unavailable(f"ssh to the private sshd failed ({probe.returncode}): {probe.stderr[-500:]}")
        mac = found.group(2)
        return found.group(1) + ("" if mac == "<implicit>" else f" + {mac}")

    def pids(self) -> list[int]:
        """The ssh client and the sshd session processes (the listener and its children)."""
        pids = [self.ssh.pid] if self.ssh else []
        return pids + (descendants(self.sshd.pid) if self.sshd else [])

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        stop(self.ssh)
        stop(self.sshd)
