"""Debian's tinyproxy as an HTTP CONNECT egress proxy on a free 127.0.0.1 port, for connector egress tests.

Owns: a private configuration (listen on 127.0.0.1, allow only 127.0.0.1, CONNECT to any port), running
`tinyproxy -d -c CONF` in the foreground, waiting for its port, and its log file, so that tests can assert
that a CONNECT really went through the proxy (`Tinyproxy.connect_targets()`).
Must not: use the system configuration or service, or accept clients from anywhere but loopback.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from . import LOOPBACK, find_executable, free_port, wait_for_port

TINYPROXY_CANDIDATES = ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy")
START_TIMEOUT = 10.0
_CONNECT_REQUEST = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/")
STOP_TIMEOUT = 10.0


class Tinyproxy:
    """One private tinyproxy. Use as a context manager or call start() and stop().

    `url` is the proxy address for clients (http://127.0.0.1:PORT). start() raises TimeoutError when the port
    does not open within 10 s (the message quotes the log), and skips the test (fails it with CI=true) when
    tinyproxy is not installed.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = LOOPBACK
        self.port = free_port(self.host)
        self.config_path = folder / "tinyproxy.conf"
        self.log_path = folder / "tinyproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Tinyproxy:
        """Write the configuration, start tinyproxy in the foreground and wait until its port accepts."""
        binary = find_executable("tinyproxy", TINYPROXY_CANDIDATES)
        self._write_config()
        with (self.folder / "tinyproxy.stderr").open("wb") as stderr:  # the child keeps its own copy
            self._process = subprocess.Popen(
                [str(binary), "-d", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_for_port(self.port, self.host, START_TIMEOUT, alive=self._alive)
        except TimeoutError as exc:
            self.stop()
            raise TimeoutError(f"tinyproxy ({self.config_path}) did not start: {exc}\n{self._output()}") from exc
        return self

    def stop(self) -> None:
        """Terminate tinyproxy (SIGTERM, then SIGKILL after 10 s) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def log_text(self) -> str:
        """tinyproxy's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def connect_targets(self) -> list[str]:
        """The `host:port` of every CONNECT request tinyproxy logged so far, oldest first."""
        return _CONNECT_REQUEST.findall(self.log_text)

    def _output(self) -> str:
        stderr_path = self.folder / "tinyproxy.stderr"
        stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
        return "\n".join((stderr + self.log_text).splitlines()[-20:])

    def _write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # No User line: tinyproxy keeps the current user (it warns), so it can write its log in a private
        # folder. No ConnectPort line: tinyproxy then allows CONNECT to every port.
        self.config_path.write_text(
            f"""# private test instance written by tests/servers/tinyproxy.py
Port {self.port}
Listen {self.host}
Timeout 600
LogFile "{self.log_path}"
LogLevel Info
MaxClients 50
Allow 127.0.0.1
DisableViaHeader Yes
"""
        )
