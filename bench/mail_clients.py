"""The mail clients the mail benchmark drives, each timed: postbridge's poller, a naive imaplib client, SMTP sends.

Owns: draining one mailbox with :func:`postbridge.mail.poller.poll_imap` (a real ``SqliteState``, a handler that
hashes every message), draining it with the one-message-per-round-trip ``imaplib`` client the issue compares
against (``UID FETCH uid (BODY.PEEK[])`` then ``UID MOVE uid Archive``), and sending prepared messages through
:class:`postbridge.mail.smtp.SmtpSession` over one connection or a new connection each. Each figure carries the
wall time (connecting, STARTTLS and login included), this process's CPU time and how much was actually done; every
loop stops at its count or its deadline, whichever comes first.
Must not: start servers or processes, write the report, or connect anywhere but where it is told (loopback).
"""

from __future__ import annotations

import hashlib
import imaplib
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postbridge.errors import PostbridgeError
from postbridge.mail.imap import open_session
from postbridge.mail.poller import ReceivedMessage, SenderSettings, poll_imap
from postbridge.mail.settings import ChannelSettings
from postbridge.mail.smtp import OutgoingMail, open_smtp
from postbridge.mail.state import SqliteState

ARCHIVE = "Archive"


@dataclass
class Timed:
    """What one timed loop did: counts, wall and CPU seconds, and why it stopped early (if it did)."""

    name: str
    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0  # CPU seconds of this (the client) process
    server_cpu: float | None = None  # the mail server's process tree (set by the caller)
    relay_cpu: float | None = None  # hub + connector (set by the caller)
    connections: int = 0
    round_trips: int = 0  # IMAP commands sent after login (postbridge: polls x commands; naive: 2 per message)
    errors: list[str] = field(default_factory=list)
    stopped_by: str = ""  # "" when the count was reached
    digests: Counter[str] = field(default_factory=Counter)  # sha256 of each message handed on

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def per_message_ms(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.messages else cpu / self.messages * 1e3


@contextmanager
def _timed(result: Timed, time_limit: float) -> Iterator[Callable[[], bool]]:
    """Measure the block's wall and CPU time; yields ``expired()`` that notes the deadline once it passed."""
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = wall + time_limit

    def expired() -> bool:
        if time.perf_counter() < deadline:
            return False
        result.stopped_by = f"time limit of {time_limit:.0f} s"
        return True

    try:
        yield expired
    finally:
        result.seconds = time.perf_counter() - wall
        result.client_cpu = time.process_time() - cpu


class _CountingSession:
    """Counts the IMAP commands a session sends, by wrapping imaplib's ``_command`` of one instance."""

    def __init__(self, imap: imaplib.IMAP4) -> None:
        self.count = 0
        original = imap._command

        def counted(name: str, *args: Any) -> Any:
            self.count += 1
            return original(name, *args)

        imap._command = counted  # type: ignore[attr-defined]


def drain_poller(
    name: str,
    channel: ChannelSettings,
    sender: SenderSettings,
    state_path: Path,
    *,
    count: int,
    time_limit: float,
    batch: int = 50,
) -> Timed:
    """Drain the channel's mailbox with ``poll_imap`` until ``count`` messages were handed on or none is left."""
    result = Timed(name)
    state = SqliteState(state_path)

    def handler(message: ReceivedMessage) -> None:  # consume it, as a real target would
        result.digests[hashlib.sha256(message.raw).hexdigest()] += 1
        result.bytes += message.size

    try:
        with _timed(result, time_limit) as expired, open_session(channel) as session:
            result.connections = 1
            counter = _CountingSession(session.imap)
            while result.messages < count and not expired():
                report = poll_imap(session, sender, handler, state, batch=batch)
                result.messages += report.delivered
                result.errors += report.errors
                if report.failed or report.quarantined:
                    result.errors.append(f"{report.failed} failed, {report.quarantined} quarantined in one poll")
                if not report.seen:
                    break
            result.round_trips = counter.count
    except PostbridgeError as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        state.close()
    return result


def drain_naive(
    name: str,
    host: str,
    port: int,
    user: str,
    password: str,
    context: ssl.SSLContext,
    *,
    count: int,
    time_limit: float,
) -> Timed:
    """The comparison client: plain imaplib with STARTTLS, then FETCH and MOVE one message per round trip."""
    result = Timed(name)
    try:
        with _timed(result, time_limit) as expired:
            imap = imaplib.IMAP4(host, port, timeout=30)
            result.connections = 1
            try:
                imap.starttls(ssl_context=context)
                imap.login(user, password)
                counter = _CountingSession(imap)
                _ok(imap.select("INBOX"), "SELECT INBOX")
                _ok(imap.create(ARCHIVE), f"CREATE {ARCHIVE}", allow=b"ALREADYEXISTS")
                data = _ok(imap.uid("SEARCH", "ALL"), "UID SEARCH ALL")
                for uid in (data[0] or b"").decode().split()[:count]:
                    if expired():
                        break
                    fetched = _ok(imap.uid("FETCH", uid, "(BODY.PEEK[])"), f"UID FETCH {uid}")
                    raw = fetched[0][1]
                    result.digests[hashlib.sha256(raw).hexdigest()] += 1
                    result.bytes += len(raw)
                    _ok(imap.uid("MOVE", uid, ARCHIVE), f"UID MOVE {uid}")
                    result.messages += 1
                result.round_trips = counter.count
            finally:
                imap.logout()
    except (imaplib.IMAP4.error, OSError, RuntimeError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    return result


def _ok(answer: tuple[str, Any], what: str, allow: bytes = b"") -> Any:
    typ, data = answer
    if typ != "OK" and not (allow and any(isinstance(x, bytes) and allow in x for x in data)):
        raise RuntimeError(f"{what} answered {typ} {data!r}")
    return data


def send_smtp(
    name: str,
    channel: ChannelSettings,
    mails: Sequence[OutgoingMail],
    *,
    reuse: bool,
    time_limit: float,
) -> Timed:
    """Send ``mails`` over one session (``reuse``) or with open_smtp + send + QUIT for each one."""
    result = Timed(name)
    try:
        with _timed(result, time_limit) as expired:
            session = open_smtp(channel) if reuse else None
            result.connections = 1 if reuse else 0
            try:
                for mail in mails:
                    if expired():
                        break
                    if session is None:
                        with open_smtp(channel) as once:
                            result.connections += 1
                            once.send_mail(mail)
                    else:
                        session.send_mail(mail)
                    result.messages += 1
            finally:
                if session is not None:
                    session.quit()
    except PostbridgeError as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    return result
