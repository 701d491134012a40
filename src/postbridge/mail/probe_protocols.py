"""The connection test's walk through each protocol: IMAP, POP3, SMTP, a raw TCP line, an implicit TLS handshake.

Owns: the order of the steps per protocol, reusing the mail clients' own connection steps (greeting, STARTTLS,
capabilities, login) so that the test behaves exactly like a channel; folder counts, POP3 message count and the SMTP
envelope check. In an inspecting run (:attr:`Run.inspect`) every walk stops right after the TLS handshake.
Must not: print, log, or put a password or token into a step.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import smtplib
import socket
from collections.abc import Callable

from postbridge.errors import NetworkError, PostbridgeError, PostbridgeTimeout
from postbridge.mail.common import AT_GREETING, MailProtocolError
from postbridge.mail.imap import ImapSession, _Imap4
from postbridge.mail.pop3 import POP3S_PORT, Pop3Session, _Pop3
from postbridge.mail.probe_run import (
    FolderCount,
    Run,
    after_handshake,
    connect_step,
    implicit_tls,
    login_detail,
    mechanisms_detail,
    tls_detail,
)
from postbridge.mail.settings import AuthMethod, ChannelSettings, Protection
from postbridge.mail.smtp import (
    SMTPS_PORT,
    EnvelopeReply,
    SmtpReplyError,
    SmtpSession,
    _default_local_name,
    _Smtp,
    envelope_hint,
)

# -- IMAP -----------------------------------------------------------------------------------------------------------


def _probe_imap(run: Run) -> None:
    settings, check_auth, list_folders = run.settings, run.options.check_auth, run.options.list_folders
    session = ImapSession(settings)
    session.tls_context = run.tls_context
    sock = connect_step(run)
    try:
        if settings.protection is Protection.TLS:
            sock = implicit_tls(run, sock)
            session._mark_tls(sock)

        def greet() -> _Imap4:
            try:
                return _Imap4(sock, settings.server_name, settings.address.port)
            except (imaplib.IMAP4.error, OSError, EOFError) as exc:
                sock.close()
                raise session._dropped(AT_GREETING, exc) from exc

        imap = run.step("greeting", greet, lambda imap: _text(imap.welcome))
        session._imap = imap
        starttls = settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL)
        run.step(
            "capabilities before TLS" if starttls else "capabilities",
            lambda: tuple(imap.capabilities),
            " ".join,
        )
        if starttls:
            run.step("STARTTLS", lambda: session._starttls(imap), lambda _: tls_detail(imap.sock))
            after_handshake(run, imap.sock)
            if session.tls:
                run.step("capabilities after TLS", lambda: tuple(imap.capabilities), " ".join)
        offered = [cap[5:] for cap in imap.capabilities if cap.startswith("AUTH=")]
        if "LOGINDISABLED" not in imap.capabilities:
            offered.append("LOGIN")
        run.step("authentication mechanisms", lambda: offered, lambda o: mechanisms_detail(o, settings.auth))
        if (check_auth or list_folders) and settings.auth is not AuthMethod.NONE and imap.state == "NONAUTH":
            run.step("login", lambda: session._login(imap), login_detail(settings))
        if list_folders:
            run.step("folders", lambda: _count_folders(run, session), _folders_detail)
    finally:
        session.close()
        with contextlib.suppress(OSError):
            sock.close()


def _count_folders(run: Run, session: ImapSession) -> list[FolderCount]:
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


def _probe_pop3(run: Run) -> None:
    settings, check_auth = run.settings, run.options.check_auth or run.options.list_folders
    session = Pop3Session(settings)
    session.tls_context = run.tls_context
    sock = connect_step(run)
    try:
        if settings.protection is Protection.TLS:
            sock = implicit_tls(run, sock)
            session._mark_tls(sock)

        def greet() -> _Pop3:
            try:
                return _Pop3(sock, settings.server_name, settings.address.port)
            except poplib.error_proto as exc:
                text = str(exc.args[0] if exc.args else exc)
                if "EOF" in text:
                    raise session._lost(AT_GREETING, EOFError("closed")) from exc
                raise MailProtocolError(f"{settings.address} refused the session: {text}", reply=text) from exc
            except (OSError, EOFError) as exc:
                raise session._lost(AT_GREETING, exc) from exc

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
            run.step("STLS", lambda: session._starttls(pop), lambda _: tls_detail(pop.sock))
            after_handshake(run, pop.sock)
            if session.tls:
                run.step("capabilities after TLS", lambda: session.capabilities, _capa_detail)
        offered = [m.upper() for m in session.capabilities.get("SASL", [])]
        if "USER" in session.capabilities:
            offered.append("USER/PASS")
        run.step("authentication mechanisms", lambda: offered, lambda o: mechanisms_detail(o, settings.auth))
        if check_auth and settings.auth is not AuthMethod.NONE:
            run.step("login", lambda: session._login(pop), login_detail(settings))
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


def _probe_smtp(run: Run) -> None:
    settings, options = run.settings, run.options
    session = SmtpSession(settings)
    session.tls_context = run.tls_context
    sock = connect_step(run)
    try:
        if settings.protection is Protection.TLS:
            sock = implicit_tls(run, sock)
            session._mark_tls(sock)
        smtp = _Smtp(sock, local_hostname=_default_local_name(sock), timeout=settings.timeout)
        session._smtp = smtp

        def greet() -> str:
            try:
                code, text = smtp.connect(settings.server_name, settings.address.port)
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                raise session._lost(AT_GREETING, exc) from exc
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
            run.step("STARTTLS", lambda: session._starttls(smtp), lambda _: tls_detail(smtp.sock or sock))
            after_handshake(run, smtp.sock or sock)
            if session.tls:
                features = run.step("EHLO after TLS", lambda: dict(smtp.esmtp_features), _features)
        offered = features.get("auth", "").upper().split()
        run.step("authentication mechanisms", lambda: offered, lambda o: mechanisms_detail(o, settings.auth))
        if (options.check_auth or options.sender) and settings.auth is not AuthMethod.NONE:
            run.step("login", lambda: session._login(smtp), login_detail(settings))
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


def _envelope(run: Run, session: SmtpSession) -> list[EnvelopeReply]:
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


def _probe_tcp(run: Run) -> None:
    sock = connect_step(run)
    try:
        run.step("first line", lambda: _first_line(run.settings, sock), lambda line: line or "(empty line)")
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _probe_tls(run: Run) -> None:
    sock = connect_step(run)
    try:
        sock = implicit_tls(run, sock)
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


PROBES: dict[str, Callable[[Run], None]] = {
    "imap": _probe_imap,
    "pop3": _probe_pop3,
    "smtp": _probe_smtp,
    "tcp": _probe_tcp,
    "tls": _probe_tls,
}
