"""The lab mail server as one object: ``async with LabServer(folder) as lab`` (or ``with lab.run_in_thread()``).

Owns: refusing any address but loopback, the six ports (chosen free, or ``base_port`` .. ``base_port + 5`` in the
order of :class:`LabPorts`), the default users, starting the PKI, the mail store and the listeners in that order
and closing them in reverse, ``lab.json`` (what other tools read: ports, users, CA paths; written when the lab is
up, removed when it stops), and the thread wrapper for synchronous callers (tests, the demo).

Must not: print (the CLI does), listen anywhere but loopback, or outlive its ``async with`` block or thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from postbridge.errors import ConfigurationError
from postbridge.home import write_json
from postbridge.lab.certificates import LabPki, make_lab_pki
from postbridge.lab.mailstore import LabUser, Mailstore, check_users
from postbridge.lab.services import Listeners, SmtpDelivery, imap_handler, pop3_handler, smtp_factory

DEFAULT_SERVER_NAME = "mail.corp.example"
DEFAULT_DOMAIN = "corp.example"
DEFAULT_PASSWORDS = {"alice": "alice-lab", "bob": "bob-lab", "carol": "carol-lab"}
LAB_JSON = "lab.json"
THREAD_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class LabPorts:
    """The lab's six ports; with a base port N they are N (IMAP) .. N+5 (SMTPS) in this order."""

    imap: int  # STARTTLS
    imaps: int
    pop3: int  # STLS
    pop3s: int
    submission: int  # SMTP with STARTTLS
    smtps: int

    @classmethod
    def from_base(cls, base: int) -> LabPorts:
        """Raises ConfigurationError unless all six ports fit between 1 and 65535."""
        if not 1 <= base <= 65535 - 5:
            raise ConfigurationError(
                f"base port {base} leaves no room for the lab's six ports", hint="give a base port from 1 to 65530"
            )
        return cls(*range(base, base + 6))

    def as_dict(self) -> dict[str, int]:
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass(frozen=True)
class Endpoint:
    """One port as a person reads it: ``protection`` is the mail adapter's setting that fits it."""

    protocol: str
    security: str
    port: int
    protection: str


def default_users(domain: str = DEFAULT_DOMAIN) -> list[LabUser]:
    return [LabUser(name, password, f"{name}@{domain}") for name, password in DEFAULT_PASSWORDS.items()]


def loopback_host(host: str) -> str:
    """``host`` if it is a loopback address (``localhost`` becomes 127.0.0.1); raises ConfigurationError otherwise."""
    text = host.strip().strip("[]")
    if text.lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ConfigurationError(
            f"the lab mail server listens on loopback only, and '{host}' is not a loopback address",
            hint="use 127.0.0.1 (the default), another 127.x.y.z address or ::1",
        )
    return str(address)


class LabServer:
    """IMAP, POP3 and SMTP on loopback, each with a STARTTLS and an implicit-TLS port, certificates from a lab CA.

    ``folder`` receives ``root.pem``, ``intermediate.pem``, the server's chain and key, and ``lab.json`` while the
    lab runs. Construction raises ConfigurationError for a non-loopback ``host``, a bad ``base_port``, no user or a
    user given twice; starting raises ConfigurationError when a port is taken, HomeError when the folder cannot be
    written.
    """

    def __init__(
        self,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        users: Sequence[LabUser] | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.host = loopback_host(host)
        self.wanted_ports = LabPorts.from_base(base_port) if base_port is not None else LabPorts(0, 0, 0, 0, 0, 0)
        self.users: list[LabUser] = list(users) if users is not None else default_users(domain)
        check_users(self.users)
        self.server_name = server_name
        self.domain = domain
        self.startup_seconds = 0.0
        self._ports: LabPorts | None = None
        self._pki: LabPki | None = None
        self._store: Mailstore | None = None
        self._listeners: Listeners | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- what others read -------------------------------------------------------------------------------------------

    @property
    def ports(self) -> LabPorts:
        if self._ports is None:
            raise ConfigurationError("the lab mail server is not running", hint="use it inside 'async with'")
        return self._ports

    @property
    def pki(self) -> LabPki:
        if self._pki is None:
            raise ConfigurationError("the lab mail server is not running", hint="use it inside 'async with'")
        return self._pki

    @property
    def root_pem(self) -> Path:
        return self.pki.root_pem

    @property
    def intermediate_pem(self) -> Path:
        return self.pki.intermediate_pem

    @property
    def lab_json(self) -> Path:
        return self.folder / LAB_JSON

    def endpoints(self) -> list[Endpoint]:
        ports = self.ports
        return [
            Endpoint("IMAP", "STARTTLS", ports.imap, "starttls-mandatory"),
            Endpoint("IMAP", "implicit TLS (IMAPS)", ports.imaps, "tls"),
            Endpoint("POP3", "STLS", ports.pop3, "starttls-mandatory"),
            Endpoint("POP3", "implicit TLS (POP3S)", ports.pop3s, "tls"),
            Endpoint("SMTP", "STARTTLS (submission)", ports.submission, "starttls-mandatory"),
            Endpoint("SMTP", "implicit TLS (SMTPS)", ports.smtps, "tls"),
        ]

    def describe(self) -> dict[str, Any]:
        """What ``lab.json`` holds (lab passwords included: they are printed at start anyway)."""
        pki = self.pki
        return {
            "host": self.host,
            "server_name": self.server_name,
            "domain": self.domain,
            "ports": self.ports.as_dict(),
            "users": [{"name": u.name, "password": u.password, "address": u.address} for u in self.users],
            "root_pem": str(pki.root_pem),
            "intermediate_pem": str(pki.intermediate_pem),
            "root_fingerprint": pki.root_fingerprint,
            "intermediate_fingerprint": pki.intermediate_fingerprint,
            "pid": os.getpid(),
        }

    # -- running ----------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> LabServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Make the PKI, the mail store and the six listeners, then write ``lab.json``. Raises as the class says."""
        started = time.perf_counter()
        names = [self.server_name, "localhost", "127.0.0.1", "::1", self.host]
        self._pki = await asyncio.to_thread(make_lab_pki, self.folder, names)
        tls = self._pki.server_context()
        store = self._store = Mailstore(self.users, tls_context=tls)
        delivery = SmtpDelivery(store, self.server_name)
        listeners = self._listeners = Listeners(self.host)
        wanted = self.wanted_ports
        try:
            bound = LabPorts(
                imap=await listeners.serve_streams(imap_handler(store, store.starttls_config), wanted.imap, None),
                imaps=await listeners.serve_streams(imap_handler(store, store.implicit_tls_config), wanted.imaps, tls),
                pop3=await listeners.serve_streams(pop3_handler(store, tls, implicit_tls=False), wanted.pop3, None),
                pop3s=await listeners.serve_streams(pop3_handler(store, tls, implicit_tls=True), wanted.pop3s, tls),
                submission=await listeners.serve_smtp(
                    smtp_factory(delivery, tls, implicit_tls=False), wanted.submission, None
                ),
                smtps=await listeners.serve_smtp(smtp_factory(delivery, tls, implicit_tls=True), wanted.smtps, tls),
            )
        except BaseException:
            await self.aclose()
            raise
        self._ports = bound
        write_json(self.lab_json, self.describe())
        self.startup_seconds = time.perf_counter() - started

    async def aclose(self) -> None:
        """Close every listener and connection and remove ``lab.json``; the certificates stay in the folder."""
        listeners, self._listeners = self._listeners, None
        if listeners is not None:
            await listeners.aclose()
        if self._ports is not None:
            self.lab_json.unlink(missing_ok=True)
        self._ports = None

    async def deliver(self, user: str, message: bytes) -> int:
        """Put ``message`` into ``user``'s INBOX as SMTP would; returns its IMAP UID. Raises ConfigurationError."""
        if self._store is None or self._ports is None:
            raise ConfigurationError("the lab mail server is not running", hint="use it inside 'async with'")
        return await self._store.deliver(user, message)

    # -- for synchronous callers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[LabServer]:
        """Run the lab on its own event loop in a thread for the ``with`` block; raises what starting raises."""
        ready = threading.Event()
        failures: list[BaseException] = []
        stop: list[asyncio.Event] = []

        async def main() -> None:
            stop.append(asyncio.Event())
            self._thread_loop = asyncio.get_running_loop()
            try:
                async with self:
                    ready.set()
                    await stop[0].wait()
            except BaseException as exc:
                failures.append(exc)
            finally:
                ready.set()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="postbridge-lab", daemon=True)
        thread.start()
        if not ready.wait(THREAD_START_TIMEOUT) or failures:
            thread.join(THREAD_START_TIMEOUT)
            if failures:
                raise failures[0]
            raise ConfigurationError(f"the lab mail server did not start within {THREAD_START_TIMEOUT:g} s")
        try:
            yield self
        finally:
            loop, self._thread_loop = self._thread_loop, None
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    loop.call_soon_threadsafe(stop[0].set)
            thread.join(THREAD_START_TIMEOUT)

    def deliver_sync(self, user: str, message: bytes) -> int:
        """:meth:`deliver` from another thread while :meth:`run_in_thread` runs. Raises ConfigurationError."""
        loop = self._thread_loop
        if loop is None:
            raise ConfigurationError("deliver_sync() needs the lab running in run_in_thread()")
        return asyncio.run_coroutine_threadsafe(self.deliver(user, message), loop).result(THREAD_START_TIMEOUT)
