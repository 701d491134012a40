"""Polling a mailbox without losing or duplicating mail: fetch, hand on, and only then post-process.

For every message: ``BODY.PEEK[]`` (it stays unread) -> the handler accepts it (or raises) -> the state says
``delivered`` -> post-processing (mark read, delete with ``UID EXPUNGE``, move with ``UID MOVE`` or COPY + \\Deleted +
``UID EXPUNGE``) -> ``done``. A crash between two steps repeats only the step that did not finish. A message whose
handler keeps failing is quarantined after ``max_attempts`` (moved to ``quarantine_folder``) and the rest flows on.
A UIDVALIDITY change voids remembered UIDs; messages are then recognised by fingerprint (Message-ID, size, Date)
instead of being replayed blindly.

This module drives an :class:`ImapSession` or :class:`Pop3Session`; it must not open connections itself.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from typing import Any

from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.mail.imap import ImapSession
from postbridge.mail.pop3 import Pop3Session
from postbridge.mail.state import PollState

log = logging.getLogger("postbridge.mail.poller")


class Selection(enum.StrEnum):
    UNREAD = "unread"
    ALL = "all"


class PostProcessing(enum.StrEnum):
    MARK_READ = "mark-read"
    DELETE = "delete"
    ARCHIVE = "archive"
    ARCHIVE_AND_MARK_READ = "archive-and-mark-read"
    KEEP = "keep"


@dataclass(frozen=True)
class SenderSettings:
    """What to read from a mailbox and what to do with a message once it was handed on."""

    folder: str = "INBOX"
    selection: Selection = Selection.UNREAD
    max_messages_per_poll: int = 100
    post_processing: PostProcessing = PostProcessing.MARK_READ
    archive_folder: str = "Archive"
    quarantine_folder: str = "Quarantine"
    max_message_size: int = 25 * 1024 * 1024
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if (
            self.post_processing in (PostProcessing.ARCHIVE, PostProcessing.ARCHIVE_AND_MARK_READ)
            and not self.archive_folder
        ):
            raise ConfigurationError("post-processing 'archive' needs archive_folder")
        if self.max_messages_per_poll < 1 or self.max_attempts < 1:
            raise ConfigurationError("max_messages_per_poll and max_attempts must be at least 1")


@dataclass(frozen=True)
class ReceivedMessage:
    key: str
    raw: bytes = field(repr=False)
    size: int
    mailbox: str
    uid: int | None = None
    uidl: str | None = None


Handler = Callable[[ReceivedMessage], Any]  # raises to refuse the message (it will be retried)

SKIPPED = ("done", "quarantined", "waiting")
"""States a poll passes over: finished, quarantined, or ``waiting`` (a retry whose backoff is not over yet)."""


@dataclass
class PollReport:
    seen: int = 0
    delivered: int = 0
    post_processed: int = 0
    skipped: int = 0  # already handled (state) or no longer there
    failed: int = 0
    quarantined: int = 0
    errors: list[str] = field(default_factory=list)


def fingerprint(raw: bytes) -> str:
    """Message-ID, Date and size: stable across UIDVALIDITY changes and mailbox moves."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]  # only the header block: parsing the body costs and adds nothing
    headers = BytesHeaderParser().parsebytes(head)
    basis = f"{headers.get('Message-ID', '')}|{headers.get('Date', '')}|{len(raw)}"
    return hashlib.sha256(basis.encode("utf-8", "replace")).hexdigest()[:32]


def poll_imap(
    session: ImapSession, settings: SenderSettings, handler: Handler, state: PollState, *, batch: int = 50
) -> PollReport:
    """Drain up to ``max_messages_per_poll`` messages once. Raises PostbridgeError only for session-level failures.

    Messages travel in batches of ``batch``: one round trip for the sizes, one for the bodies, then each is handed on
    and marked ``delivered`` one by one, and the batch is post-processed with one command per action.
    """
    report = PollReport()
    mailbox = session.select(settings.folder)
    channel = session.settings
    user = channel.credentials.user if channel.credentials else ""
    box = f"imap:{user}@{channel.address}/{settings.folder}"  # one state per account and folder
    known = state.uidvalidity(box)
    revalidated = known is not None and known != mailbox.uidvalidity
    if revalidated:
        log.warning(
            "UIDVALIDITY of %s changed (%s -> %s): old UIDs are void, handled mail is matched by fingerprint",
            settings.folder,
            known,
            mailbox.uidvalidity,
        )
    state.set_uidvalidity(box, mailbox.uidvalidity)
    if settings.post_processing in (PostProcessing.ARCHIVE, PostProcessing.ARCHIVE_AND_MARK_READ):
        session.create_folder(settings.archive_folder)  # once per poll, not once per batch
    criteria = "UNSEEN" if settings.selection is Selection.UNREAD else "ALL"
    if settings.post_processing is not PostProcessing.KEEP:
        criteria += " UNDELETED"
    pending: list[tuple[int, str, str | None]] = []  # (uid, key, status) still to do
    for uid in session.search(criteria):
        key = f"{box}:{mailbox.uidvalidity}:{uid}"
        status = state.status(key)
        if status in SKIPPED:
            report.skipped += 1
            continue
        if len(pending) >= settings.max_messages_per_poll:
            break
        pending.append((uid, key, status))
    report.seen = len(pending)
    for start in range(0, len(pending), batch):
        chunk = pending[start : start + batch]
        to_fetch = [uid for uid, _, status in chunk if status != "delivered"]
        sizes = session.sizes(to_fetch)
        small = [uid for uid in to_fetch if sizes.get(uid, 0) <= settings.max_message_size]
        bodies = session.fetch_many(small)
        handed: list[tuple[int, str]] = []
        for uid, key, status in chunk:
            if status == "delivered":
                handed.append((uid, key))  # handed on in an earlier poll; only post-processing is missing
                continue
            if uid not in sizes:
                report.skipped += 1  # gone meanwhile
                continue
            if uid not in bodies:
                why = f"message of {sizes[uid]} bytes is over max_message_size ({settings.max_message_size})"
                _quarantine_imap(session, settings, state, key, uid, why, report)
                continue
            raw = bodies.pop(uid)
            stamp = fingerprint(raw)
            if not (revalidated and state.fingerprint_done(box, stamp)):
                try:
                    handler(ReceivedMessage(key, raw, len(raw), settings.folder, uid=uid))
                except Exception as exc:  # the handler is user code: any failure means "not accepted"
                    _handler_failed(session, settings, state, key, uid, exc, report)
                    continue
                report.delivered += 1
            state.mark(key, "delivered", fingerprint=stamp)
            handed.append((uid, key))
        if not handed:
            continue
        try:
            _post_process(session, settings, [uid for uid, _ in handed])
        except PostbridgeError as exc:
            report.errors.append(f"UIDs {handed[0][0]}..{handed[-1][0]}: post-processing failed: {exc}")
            log.error("%s: post-processing failed, will retry next poll: %s", settings.folder, exc)
            continue
        state.mark_many([key for _, key in handed], "done")  # 'delivered' was committed per message
        report.post_processed += len(handed)
    return report


def _post_process(session: ImapSession, settings: SenderSettings, uids: list[int]) -> None:
    action = settings.post_processing
    if action in (PostProcessing.MARK_READ, PostProcessing.ARCHIVE_AND_MARK_READ):
        session.store_flags(uids, "\\Seen")
    if action is PostProcessing.DELETE:
        session.store_flags(uids, "\\Deleted")
        session.expunge_uid(uids)
    elif action in (PostProcessing.ARCHIVE, PostProcessing.ARCHIVE_AND_MARK_READ):
        session.move(uids, settings.archive_folder)


def _handler_failed(
    session: ImapSession,
    settings: SenderSettings,
    state: PollState,
    key: str,
    uid: int,
    exc: Exception,
    report: PollReport,
) -> None:
    error = f"{type(exc).__name__}: {exc}"
    attempts = state.record_failure(key, error)
    report.failed += 1
    log.warning(
        "UID %s of %s was not accepted (attempt %d of %d): %s",
        uid,
        settings.folder,
        attempts,
        settings.max_attempts,
        error,
    )
    if attempts >= settings.max_attempts:
        _quarantine_imap(session, settings, state, key, uid, f"refused {attempts} times, last: {error}", report)


def _quarantine_imap(
    session: ImapSession, settings: SenderSettings, state: PollState, key: str, uid: int, why: str, report: PollReport
) -> None:
    try:
        session.create_folder(settings.quarantine_folder)
        session.move(uid, settings.quarantine_folder)
    except PostbridgeError as exc:
        session.store_flags(uid, "$Quarantined")  # cannot move: at least flag it, and remember it
        why += f" (moving to {settings.quarantine_folder} failed: {exc})"
    state.mark(key, "quarantined", error=why)
    report.quarantined += 1
    log.error("UID %s of %s quarantined: %s", uid, settings.folder, why)


IDLE_REARM = 28 * 60.0  # below the 29 minutes after which servers may drop an idle client (RFC 2177)


def watch_imap(
    open_session: Callable[[], ImapSession],
    settings: SenderSettings,
    handler: Handler,
    state: PollState,
    stop: threading.Event,
    *,
    idle: bool = True,
    interval: float = 60.0,
    rearm: float = IDLE_REARM,
    backoff_cap: float = 60.0,
    on_report: Callable[[PollReport], None] | None = None,
) -> None:
    """Keep a mailbox drained until ``stop`` is set: IDLE (re-armed every ``rearm`` s) or poll every ``interval`` s.

    Every (re)connect starts with a catch-up poll, so mail that arrived while disconnected is never missed.
    Connection failures are retried with full-jitter exponential backoff; handler failures are the poller's business.
    """
    attempt = 0
    while not stop.is_set():
        try:
            with open_session() as session:
                attempt = 0
                while not stop.is_set():
                    report = poll_imap(session, settings, handler, state)  # catch-up first, then after each wake-up
                    if on_report:
                        on_report(report)
                    if report.seen >= settings.max_messages_per_poll:
                        continue  # more is waiting: drain before waiting
                    if idle and "IDLE" in session.capabilities:
                        session.idle(rearm)
                    else:
                        stop.wait(interval)
        except PostbridgeError as exc:
            if stop.is_set():
                return  # the owner hung up on purpose (to end an IDLE at once)
            attempt += 1
            delay = random.uniform(0, min(backoff_cap, 0.5 * 2**attempt))
            log.warning("mailbox %s: %s — reconnecting in %.1f s", settings.folder, exc, delay)
            stop.wait(delay)


class Pop3PostProcessing(enum.StrEnum):
    DELETE = "delete"
    KEEP = "keep"


def poll_pop3(
    session: Pop3Session,
    handler: Handler,
    state: PollState,
    *,
    post_processing: Pop3PostProcessing = Pop3PostProcessing.DELETE,
    max_messages_per_poll: int = 100,
    max_message_size: int = 25 * 1024 * 1024,
    max_attempts: int = 5,
) -> PollReport:
    """Drain a POP3 mailbox once, keyed by UIDL. Deletions take effect at QUIT, which this function sends; only then
    are the messages ``done``. POP3 has no folders, so a poison message is left on the server, remembered as
    quarantined and skipped from then on."""
    report = PollReport()
    settings = session.settings
    user = settings.credentials.user if settings.credentials else ""
    box = f"pop3:{user}@{settings.address}"
    deleted: list[str] = []
    sizes = session.sizes()
    for number, uidl in sorted(session.uidl().items()):
        key = f"{box}:{uidl}"
        status = state.status(key)
        if status in SKIPPED:
            report.skipped += 1
            continue
        if report.seen >= max_messages_per_poll:
            break
        report.seen += 1
        if status != "delivered":
            if sizes.get(number, 0) > max_message_size:
                state.mark(key, "quarantined", error=f"message of {sizes[number]} bytes is over max_message_size")
                report.quarantined += 1
                continue
            raw = session.retrieve(number)
            try:
                handler(ReceivedMessage(key, raw, len(raw), box, uidl=uidl))
            except Exception as exc:  # user code: any failure means "not accepted"
                attempts = state.record_failure(key, f"{type(exc).__name__}: {exc}")
                report.failed += 1
                if attempts >= max_attempts:
                    state.mark(key, "quarantined", error=f"refused {attempts} times: {exc}")
                    report.quarantined += 1
                continue
            state.mark(key, "delivered", fingerprint=fingerprint(raw))
            report.delivered += 1
        if post_processing is Pop3PostProcessing.DELETE:
            session.delete(number)
            deleted.append(key)
        else:
            state.mark(key, "done")
            report.post_processed += 1
    session.quit()  # commits the deletions; if it fails, they are retried next poll (the state says 'delivered')
    for key in deleted:
        state.mark(key, "done")
        report.post_processed += 1
    return report
