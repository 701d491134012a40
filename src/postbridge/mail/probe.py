"""The connection test of a mail channel (``postbridge test …``), step by step, as a library.

:func:`run_probe` walks the way a real session goes — connection (direct TCP or SOCKS5 through the hub), TLS or
STARTTLS, greeting, capabilities before and after TLS (EHLO features for SMTP), offered authentication mechanisms,
optionally the login, IMAP folders with counts and the POP3 message count — and records each step with its timing
and what it saw. The first failing step carries the cause and the fix, taken from the :class:`PostbridgeError` the
mail clients raise (their messages and hints are the diagnoses), and the run stops there.

It reuses the clients' own connection steps (:mod:`imap`, :mod:`pop3`, :mod:`smtp`, :mod:`transport`), so the test
behaves exactly like a channel does. It must not print or log anything (the CLI renders the report) and never puts
a password or token into a step.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn, TypeVar

from cryptography import x509

from postbridge.errors import ConfigurationError, NetworkError, PostbridgeError, PostbridgeTimeout, TrustError
from postbridge.mail import probe_checks as checks
from postbridge.mail import transport
from postbridge.mail.common import MailProtocolError, TlsDowngrade
from postbridge.mail.hub_diagnosis import diagnose_refusal
from postbridge.mail.imap import ImapSession, _Imap4
from postbridge.mail.pop3 import POP3S_PORT, Pop3Session, _Pop3
from postbridge.mail.settings import AuthMethod, ChannelSettings, Protection, Proxy
from postbridge.mail.smtp import (
    SMTPS_PORT,
    EnvelopeReply,
    SmtpReplyError,
    SmtpSession,
    _default_local_name,
    _Smtp,
    envelope_hint,
)
from postbridge.trust.server_chain import ChainReport, peer_chain

ProbeKind = Literal["imap", "pop3", "smtp", "tcp", "tls"]
KINDS: tuple[str, ...] = ("imap", "pop3", "smtp", "tcp", "tls")
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


@dataclass(frozen=True)
class ProbeReport:
    """The whole test: the channel it ran against and its steps, in order (the last one failed if any did)."""

    kind: str
    target: str
    steps: tuple[Step, ...]
    folders: tuple[FolderCount, ...] = ()
    message_count: int | None = None
    chain: ChainReport | None = None
    envelope: tuple[EnvelopeReply, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "ok": self.ok,
            "steps": [
                {
                    "name": step.name,
                    "ok": step.ok,
                    "elapsed_ms": round(step.elapsed_ms, 1),
                    "detail": step.detail,
                    "cause": step.cause,
                    "fix": step.fix,
                    "evidence": list(step.evidence),
                    "warning": step.warning,
                }
                for step in self.steps
            ],
            "folders": [{"name": f.name, "total": f.total, "unread": f.unread} for f in self.folders],
            "message_count": self.message_count,
            "chain": self.chain.to_json() if self.chain else None,
            "envelope": [
                {"address": r.address, "role": r.role, "code": r.code, "text": r.text, "accepted": r.accepted}
                for r in self.envelope
            ],
        }


class _Stop(Exception):
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
class _Run:
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
        raise _Stop

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


def run_probe(
    kind: ProbeKind | str,
    settings: ChannelSettings,
    *,
    check_auth: bool = False,
    list_folders: bool = False,
    sender: str = "",
    recipients: tuple[str, ...] = (),
) -> ProbeReport:
    """Test the channel step by step; never raises for what the test finds (that is in the report).

    ``check_auth`` logs in with the channel's credentials; ``list_folders`` (IMAP) logs in and counts the messages
    of every folder; ``sender`` and ``recipients`` (SMTP) check the envelope without sending a mail. When a step
    fails, named checks explain it: the hub is asked about a SOCKS5 refusal, a second connection tells a TLS port
    from a plain one, and an untrusted certificate chain is fetched again (without verification) to show it.
    Raises ConfigurationError only for an unknown ``kind`` or a malformed sender/recipient.
    """
    if kind not in KINDS:
        raise ConfigurationError(f"test kind '{kind}' is not one of: {', '.join(KINDS)}")
    if (sender or recipients) and kind != "smtp":
        raise ConfigurationError("--from and --to belong to 'postbridge test smtp'")
    if bool(sender) != bool(recipients):
        raise ConfigurationError("the envelope check needs both a sender (--from) and a recipient (--to)")
    options = ProbeOptions(check_auth, list_folders, sender, tuple(recipients))
    run = _Run(settings, options)
    with contextlib.suppress(_Stop):
        _PROBES[kind](run)
    if run.steps and not run.steps[-1].ok:
        _explain_failure(str(kind), run)
    return ProbeReport(
        kind=str(kind),
        target=settings.describe,
        steps=tuple(run.steps),
        folders=tuple(run.folders),
        message_count=run.message_count,
        chain=run.chain,
        envelope=tuple(run.envelope),
    )


def _explain_failure(kind: str, run: _Run) -> None:
    """The named checks behind the failed last step: they add evidence and a better fix, and never raise."""
    settings, failed, error = run.settings, run.steps[-1], run.error
    if isinstance(error, transport.MailConnectError) and error.socks_reply is not None:
        diagnosis = diagnose_refusal(settings, error.socks_reply)
        run.amend(evidence=diagnosis.evidence, fix=diagnosis.fix)
    elif failed.name in TLS_STEPS and isinstance(error, TrustError):
        _show_untrusted_chain(kind, run)
    elif failed.name in TLS_STEPS and isinstance(error, TlsDowngrade) and settings.proxy is Proxy.ON_PREMISE:
        run.amend(**checks.starttls_over_tcp_tls(settings))
    elif failed.name in TLS_STEPS and isinstance(error, transport.NotTlsError):
        run.amend(**checks.tls_to_plain_port(settings))
    elif failed.name in ("greeting", "first line") and isinstance(error, NetworkError) and not _began_tls(run):
        run.amend(**checks.plain_to_tls_port(settings))


def _began_tls(run: _Run) -> bool:
    return any(step.name in TLS_STEPS for step in run.steps)


def _show_untrusted_chain(kind: str, run: _Run) -> None:
    """Fetch the chain the verified handshake refused, on a second connection without verification."""
    again = _Run(run.settings, ProbeOptions(), inspect=True)
    with contextlib.suppress(_Stop):
        _PROBES[kind](again)
    if not again.sent_chain:
        run.amend(evidence=("could not fetch the certificate chain on a second connection",))
        return
    try:
        report = checks.explain(run.settings, again.sent_chain)
    except PostbridgeError as exc:
        run.amend(evidence=(f"could not explain the certificate chain: {exc.message}",))
        return
    run.chain = report
    evidence = (
        f"the chain, fetched again without verification to show it: {len(again.sent_chain)} certificate(s) sent",
    )
    if report.problem:
        run.amend(evidence=(*evidence, report.cause), fix=report.fix)
    else:
        run.amend(evidence=(*evidence, "postbridge's own check finds this chain sound: OpenSSL's reason above decides"))


# -- shared steps ---------------------------------------------------------------------------------------------------


def _connect(run: _Run) -> socket.socket:
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


def _tls_detail(sock: socket.socket) -> str:
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


def _implicit_tls(run: _Run, sock: socket.socket) -> ssl.SSLSocket:
    tls = run.step("TLS handshake", lambda: transport.wrap(sock, run.settings, run.tls_context), _tls_detail)
    _after_handshake(run, tls)
    return tls


def _after_handshake(run: _Run, sock: socket.socket) -> None:
    """Show the verified chain; when only inspecting, keep what the server sent and stop."""
    if not isinstance(sock, ssl.SSLSocket):
        return
    if run.inspect:
        run.sent_chain = peer_chain(sock)
        sock.close()  # the chain is all an inspection wants; nothing else may use this unverified connection
        raise _Stop

    def report() -> ChainReport:
        run.chain = checks.explain(run.settings, peer_chain(sock), verified=peer_chain(sock, verified=True))
        return run.chain

    run.step("certificate chain", report, lambda chain: chain.summary)


def _mechanisms_detail(offered: list[str], wanted: AuthMethod) -> str:
    if not offered:
        return "none offered"
    text = " ".join(offered)
    if wanted is not AuthMethod.NONE and wanted.value.upper() not in offered:
        text += f" (the channel's '{wanted}' is not among them)"
    return text


def _login_detail(settings: ChannelSettings) -> Callable[[object], str]:
    user = settings.credentials.user if settings.credentials else ""
    return lambda _: f"logged in as '{user}' ({settings.auth})"


# -- IMAP -----------------------------------------------------------------------------------------------------------


def _probe_imap(run: _Run) -> None:
    settings, check_auth, list_folders = run.settings, run.options.check_auth, run.options.list_folders
    session = ImapSession(settings)
    session.tls_context = run.tls_context
    sock = _connect(run)
    try:
        if settings.protection is Protection.TLS:
            sock = _implicit_tls(run, sock)
            session._mark_tls(sock)

        def greet() -> _Imap4:
            try:
                return _Imap4(sock, settings.server_name, settings.address.port)
            except (imaplib.IMAP4.error, OSError, EOFError) as exc:
                sock.close()
                raise session._dropped("while waiting for the greeting", exc) from exc

        imap = run.step("greeting", greet, lambda imap: _text(imap.welcome))
        session._imap = imap
        starttls = settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL)
        run.step(
            "capabilities before TLS" if starttls else "capabilities",
            lambda: tuple(imap.capabilities),
            " ".join,
        )
        if starttls:
            run.step("STARTTLS", lambda: session._starttls(imap), lambda _: _tls_detail(imap.sock))
            _after_handshake(run, imap.sock)
            if session.tls:
                run.step("capabilities after TLS", lambda: tuple(imap.capabilities), " ".join)
        offered = [cap[5:] for cap in imap.capabilities if cap.startswith("AUTH=")]
        if "LOGINDISABLED" not in imap.capabilities:
            offered.append("LOGIN")
        run.step("authentication mechanisms", lambda: offered, lambda o: _mechanisms_detail(o, settings.auth))
        if (check_auth or list_folders) and settings.auth is not AuthMethod.NONE and imap.state == "NONAUTH":
            run.step("login", lambda: session._login(imap), _login_detail(settings))
        if list_folders:
            run.step("folders", lambda: _count_folders(run, session), _folders_detail)
    finally:
        session.close()
        with contextlib.suppress(OSError):
            sock.close()


def _count_folders(run: _Run, session: ImapSession) -> list[FolderCount]:
    # INBOX first (it is what a mail channel polls), then the others by name
    for name in sorted(session.list_folders(), key=lambda folder: (folder.upper() != "INBOX", folder)):
        status = session.status(name)
        run.folders.append(FolderCount(name, status.get("MESSAGES", 0), status.get("UNSEEN", 0)))
    return run.folders


def _folders_detail(folders: list[FolderCount]) -> str:
    shown = ", ".join(f"{f.name} {f.total} total / {f.unread} unread" for f in folders[:10])
    more = f" and {len(folders) - 10} more" if len(folders) > 10 else ""
    return f"{len(folders)} folder(s): {shown}{more}"


# -- POP3 -----------------------------------------------------------------------------------------------------------


def _probe_pop3(run: _Run) -> None:
    settings, check_auth = run.settings, run.options.check_auth or run.options.list_folders
    session = Pop3Session(settings)
    session.tls_context = run.tls_context
    sock = _connect(run)
    try:
        if settings.protection is Protection.TLS:
            sock = _implicit_tls(run, sock)
            session._mark_tls(sock)

        def greet() -> _Pop3:
            try:
                return _Pop3(sock, settings.server_name, settings.address.port)
            except poplib.error_proto as exc:
                text = str(exc.args[0] if exc.args else exc)
                if "EOF" in text:
                    raise session._lost("while waiting for the greeting", EOFError("closed")) from exc
                raise MailProtocolError(f"{settings.address} refused the session: {text}", reply=text) from exc
            except (OSError, EOFError) as exc:
                raise session._lost("while waiting for the greeting", exc) from exc

        pop = run.step("greeting", greet, lambda pop: _text(pop.welcome))
        session._pop = pop
        starttls = settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL)

        def capabilities() -> dict[str, list[str]]:
            try:
                session.capabilities = session._read_capabilities(pop)
            except poplib.error_proto as exc:
                raise session._lost("during CAPA", EOFError("closed")) from exc
            session.capabilities_before_tls = dict(session.capabilities)
            return session.capabilities

        run.step("capabilities before TLS" if starttls else "capabilities", capabilities, _capa_detail)
        if starttls:
            run.step("STLS", lambda: session._starttls(pop), lambda _: _tls_detail(pop.sock))
            _after_handshake(run, pop.sock)
            if session.tls:
                run.step("capabilities after TLS", lambda: session.capabilities, _capa_detail)
        offered = [m.upper() for m in session.capabilities.get("SASL", [])]
        if "USER" in session.capabilities:
            offered.append("USER/PASS")
        run.step("authentication mechanisms", lambda: offered, lambda o: _mechanisms_detail(o, settings.auth))
        if check_auth and settings.auth is not AuthMethod.NONE:
            run.step("login", lambda: session._login(pop), _login_detail(settings))
            stat = run.step("message count", session.stat, lambda s: f"{s[0]} message(s), {s[1]} octets")
            run.message_count = stat[0]
    finally:
        with contextlib.suppress(PostbridgeError, OSError):
            session.quit()
        with contextlib.suppress(OSError):
            sock.close()


def _capa_detail(capabilities: dict[str, list[str]]) -> str:
    if not capabilities:
        return "none (an RFC 1939-only server: no CAPA)"
    return " ".join(capabilities)


# -- SMTP -----------------------------------------------------------------------------------------------------------


def _probe_smtp(run: _Run) -> None:
    settings, options = run.settings, run.options
    session = SmtpSession(settings)
    session.tls_context = run.tls_context
    sock = _connect(run)
    try:
        if settings.protection is Protection.TLS:
            sock = _implicit_tls(run, sock)
            session._mark_tls(sock)
        smtp = _Smtp(sock, local_hostname=_default_local_name(sock), timeout=settings.timeout)
        session._smtp = smtp

        def greet() -> str:
            try:
                code, text = smtp.connect(settings.server_name, settings.address.port)
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                raise session._lost("while waiting for the greeting", exc) from exc
            if code == -1:
                raise MailProtocolError(
                    f"{settings.address} does not speak SMTP (greeting {_text(text)[:80]!r})",
                    hint="check the address: this port belongs to another service",
                )
            if code != 220:
                raise SmtpReplyError(
                    f"{settings.address} refused the session: {code} {_text(text)}", code=code, reply=_text(text)
                )
            return f"{code} {_text(text)}"

        run.step("greeting", greet, str)
        starttls = settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL)
        features = run.step("EHLO before TLS" if starttls else "EHLO", lambda: _hello(session, smtp), _features)
        if starttls:
            run.step("STARTTLS", lambda: session._starttls(smtp), lambda _: _tls_detail(smtp.sock or sock))
            _after_handshake(run, smtp.sock or sock)
            if session.tls:
                features = run.step("EHLO after TLS", lambda: dict(smtp.esmtp_features), _features)
        offered = features.get("auth", "").upper().split()
        run.step("authentication mechanisms", lambda: offered, lambda o: _mechanisms_detail(o, settings.auth))
        if (options.check_auth or options.sender) and settings.auth is not AuthMethod.NONE:
            run.step("login", lambda: session._login(smtp), _login_detail(settings))
        if options.sender:
            run.step("sender and recipients", lambda: _envelope(run, session), _envelope_detail)
    finally:
        with contextlib.suppress(PostbridgeError, OSError):
            session.quit()
        with contextlib.suppress(OSError):
            sock.close()


def _hello(session: SmtpSession, smtp: _Smtp) -> dict[str, str]:
    try:
        session._hello(smtp)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        raise session._lost("during EHLO", exc) from exc
    session.features_before_tls = dict(smtp.esmtp_features)
    return dict(smtp.esmtp_features)


def _features(features: dict[str, str]) -> str:
    return " ".join(f"{key.upper()} {value.strip()}".strip() for key, value in features.items()) or "none (HELO only)"


def _envelope(run: _Run, session: SmtpSession) -> list[EnvelopeReply]:
    """MAIL FROM and RCPT TO without DATA; a refused address fails the step with the server's words."""
    replies = session.check_envelope(run.options.sender, run.options.recipients)
    run.envelope = replies
    refused = [reply for reply in replies if not reply.accepted]
    if refused:
        words = "; ".join(f"{r.role} <{r.address}>: {r.code} {r.text}" for r in refused)
        raise MailProtocolError(f"{run.settings.address} refused {words}", hint=envelope_hint(refused[0]))
    return replies


def _envelope_detail(replies: list[EnvelopeReply]) -> str:
    return "; ".join(f"{reply.role} <{reply.address}> accepted ({reply.code})" for reply in replies)


# -- raw TCP and TLS ------------------------------------------------------------------------------------------------


def _probe_tcp(run: _Run) -> None:
    sock = _connect(run)
    try:
        run.step("first line", lambda: _first_line(run.settings, sock), lambda line: line or "(empty line)")
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _probe_tls(run: _Run) -> None:
    sock = _connect(run)
    try:
        sock = _implicit_tls(run, sock)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _first_line(settings: ChannelSettings, sock: socket.socket) -> str:
    """What the server says first (mail servers greet at once). Raises PostbridgeTimeout or NetworkError."""
    implicit = (993, POP3S_PORT, SMTPS_PORT)
    hint = (
        "the server waits for the client: if it expects TLS at once, run 'postbridge test tls'"
        if settings.address.port in implicit or settings.protection is Protection.TLS
        else "the server waits for the client or expects TLS first: try 'postbridge test tls'"
    )
    data = b""
    try:
        while b"\n" not in data and len(data) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                if data:
                    break
                raise NetworkError(
                    f"{settings.address} closed the connection without a word",
                    hint="the mapping or server refuses plain connections here: "
                    "for an implicit-TLS port use protection 'tls' or a 'tcp-tls' mapping",
                )
            data += chunk
    except TimeoutError as exc:
        raise PostbridgeTimeout(f"{settings.address} sent nothing within {settings.timeout:g} s", hint=hint) from exc
    return _text(data.split(b"\n", 1)[0].rstrip(b"\r"))[:200]


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace").strip()
    return str(data).strip()


_PROBES: dict[str, Callable[[_Run], None]] = {
    "imap": _probe_imap,
    "pop3": _probe_pop3,
    "smtp": _probe_smtp,
    "tcp": _probe_tcp,
    "tls": _probe_tls,
}
