"""The step runner of the connection test and the steps every protocol shares.

Owns: :class:`Step` and :class:`FolderCount` (what the report holds), :class:`Run` (runs one step, records its
timing and result, stops the run at the first failure with the error's cause and fix, and lets the named checks add
evidence), and the shared steps: the connection (direct or SOCKS5 through the hub), the implicit TLS handshake and
the certificate chain after any handshake, and the wording of mechanisms and logins.
Must not: print, log, or put a password or token into a step.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

from cryptography import x509

from postbridge.errors import PostbridgeError
from postbridge.mail import probe_checks as checks
from postbridge.mail import transport
from postbridge.mail.settings import AuthMethod, ChannelSettings, Protection, Proxy
from postbridge.mail.smtp import (
    EnvelopeReply,
)
from postbridge.trust.server_chain import ChainReport, peer_chain

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One step of the test: what was tried, whether it worked, how long it took and what was seen."""

    name: str
    ok: bool
    elapsed_ms: float
    detail: str
    cause: str = ""
    fix: str = ""
    evidence: tuple[str, ...] = ()  # what the named checks found (a second connection, the hub, the chain)
    warning: str = ""  # the step passed, but something is unsafe (clear text)


@dataclass(frozen=True)
class FolderCount:
    name: str
    total: int
    unread: int


class Stop(Exception):
    """A step failed (or the chain was fetched); the report is complete."""


TLS_STEPS = ("TLS handshake", "STARTTLS", "STLS")


@dataclass(frozen=True)
class ProbeOptions:
    """What the test does beyond the connection: log in, count folders, check an SMTP envelope."""

    check_auth: bool = False
    list_folders: bool = False
    sender: str = ""
    recipients: tuple[str, ...] = ()


@dataclass
class Run:
    settings: ChannelSettings
    options: ProbeOptions
    inspect: bool = False  # fetch the chain only: handshake without verification, stop right after it
    steps: list[Step] = field(default_factory=list)
    folders: list[FolderCount] = field(default_factory=list)
    message_count: int | None = None
    chain: ChainReport | None = None
    envelope: list[EnvelopeReply] = field(default_factory=list)
    error: PostbridgeError | None = None
    sent_chain: list[x509.Certificate] = field(default_factory=list)

    def step(self, name: str, action: Callable[[], T], describe: Callable[[T], str]) -> T:
        """Run one step; a PostbridgeError (or a stray OSError) ends the run with its cause and fix."""
        started = time.perf_counter()
        try:
            result = action()
        except PostbridgeError as exc:
            self.error = exc
            self._fail(name, started, exc.message, exc.hint)
        except (OSError, EOFError, ssl.SSLError) as exc:
            self._fail(name, started, f"{self.settings.address}: {exc or type(exc).__name__}", "")
        self.steps.append(Step(name, True, _since(started), describe(result)))
        return result

    def _fail(self, name: str, started: float, cause: str, fix: str) -> NoReturn:
        self.steps.append(Step(name, False, _since(started), "failed", cause=cause, fix=fix))
        raise Stop

    def amend(self, *, evidence: tuple[str, ...] = (), cause: str = "", fix: str = "", warning: str = "") -> None:
        """Add what a named check found to the last step (its cause and fix are replaced when given)."""
        last = self.steps[-1]
        self.steps[-1] = replace(
            last,
            evidence=last.evidence + evidence,
            cause=cause or last.cause,
            fix=fix or last.fix,
            warning=warning or last.warning,
        )

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context of this run's handshakes: the channel's own (None), or none-verifying when inspecting."""
        return checks.inspection_context() if self.inspect else None


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


# -- shared steps ---------------------------------------------------------------------------------------------------


def connect_step(run: Run) -> socket.socket:
    settings = run.settings

    def describe(sock: socket.socket) -> str:
        if settings.proxy is Proxy.ON_PREMISE:
            assert settings.binding is not None
            where = f"location '{settings.location_id}'" if settings.location_id else "the default location"
            return (
                f"SOCKS5 via the hub {settings.binding.socks}: reply 0x00 (connected to {settings.address} at {where})"
            )
        try:
            peer = str(sock.getpeername()[0])
            return f"TCP to {settings.address}" + ("" if peer == settings.address.host else f" ({peer})")
        except OSError:
            return f"TCP to {settings.address}"

    sock = run.step("connection", lambda: transport.connect(settings), describe)
    if settings.protection is Protection.OFF and not run.inspect:
        warning = checks.cleartext_warning(settings)
        if warning:
            run.amend(warning=warning)
    return sock


def tls_detail(sock: socket.socket) -> str:
    if not isinstance(sock, ssl.SSLSocket):
        return "no TLS"
    cipher = sock.cipher()
    text = f"{sock.version()}, {cipher[0] if cipher else 'unknown cipher'}"
    cert: dict[str, Any] | None = sock.getpeercert()  # typeshed's value union made usable
    if cert:
        names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
        subject = _name(cert.get("subject", ())) or "(no subject name)"
        issuer = _name(cert.get("issuer", ())) or "(no issuer name)"
        text += f"; certificate {subject}"
        if names:
            text += f" for {', '.join(str(name) for name in names[:5])}"
        text += f", issued by {issuer}, valid until {cert.get('notAfter', '?')}"
    return text


def _name(rdns: Any) -> str:
    """The readable part of a distinguished name: CN, else O and OU (trustme-style certificates lack a CN)."""
    parts = {key: value for rdn in rdns for key, value in rdn}
    if "commonName" in parts:
        return f"CN={parts['commonName']}"
    return ", ".join(f"{short}={parts[key]}" for key, short in (("organizationName", "O"),
                     ("organizationalUnitName", "OU")) if key in parts)  # fmt: skip


def implicit_tls(run: Run, sock: socket.socket) -> ssl.SSLSocket:
    tls = run.step("TLS handshake", lambda: transport.wrap(sock, run.settings, run.tls_context), tls_detail)
    after_handshake(run, tls)
    return tls


def after_handshake(run: Run, sock: socket.socket) -> None:
    """Show the verified chain; when only inspecting, keep what the server sent and stop."""
    if not isinstance(sock, ssl.SSLSocket):
        return
    if run.inspect:
        run.sent_chain = peer_chain(sock)
        sock.close()  # the chain is all an inspection wants; nothing else may use this unverified connection
        raise Stop

    def report() -> ChainReport:
        run.chain = checks.explain(run.settings, peer_chain(sock), verified=peer_chain(sock, verified=True))
        return run.chain

    run.step("certificate chain", report, lambda chain: chain.summary)


def mechanisms_detail(offered: list[str], wanted: AuthMethod) -> str:
    if not offered:
        return "none offered"
    text = " ".join(offered)
    if wanted is not AuthMethod.NONE and wanted.value.upper() not in offered:
        text += f" (the channel's '{wanted}' is not among them)"
    return text


def login_detail(settings: ChannelSettings) -> Callable[[object], str]:
    user = settings.credentials.user if settings.credentials else ""
    return lambda _: f"logged in as '{user}' ({settings.auth})"
