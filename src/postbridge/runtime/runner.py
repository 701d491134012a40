"""One flow's runner: polls its mailbox (or watches it with IDLE), hands each message to the target and keeps the
message processing log, and reconciles the log after a crash.

The log says ``received`` before the target and ``delivered`` (with the target's reference, the time and the
attempt) after; the poller then post-processes and the log says ``post-processed``. Every delivery of one message
carries the same idempotency key (:func:`idempotency_key`), on every attempt and after every restart. A runner whose
lease went to another worker stops at once (:class:`LeaseLost`).

Must not: schedule, take or renew leases (engine.py does), or know a target's kind.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser

from postbridge.mail.imap import ImapSession, open_session
from postbridge.mail.poller import (
    PollReport,
    Pop3PostProcessing,
    PostProcessing,
    ReceivedMessage,
    Selection,
    fingerprint,
    poll_imap,
    poll_pop3,
    watch_imap,
)
from postbridge.mail.pop3 import Pop3Session, open_pop3
from postbridge.runtime.config import FlowConfig
from postbridge.runtime.flowstate import FlowState
from postbridge.runtime.metrics import Metrics
from postbridge.runtime.store import AttemptInput, MessageStatus, RuntimeStore
from postbridge.runtime.targets import Delivery, Target, TargetError

log = logging.getLogger("postbridge.runtime")


def idempotency_key(flow: str, key: str) -> str:
    """The key every delivery of one message carries, on every attempt and after every restart."""
    return hashlib.sha256(f"{flow}\0{key}".encode()).hexdigest()[:32]


class LeaseLost(BaseException):
    """The flow's lease went to another worker: stop at once (a BaseException, so the poller does not count it as a
    refusal of the message it was about to hand on)."""


@dataclass
class FlowRunner:
    """One flow: its target, its view of the store, and the lease this worker holds for it."""

    flow: FlowConfig
    store: RuntimeStore
    target: Target
    metrics: Metrics
    owner: str
    state: FlowState = field(init=False)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    _session: ImapSession | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.state = FlowState(self.store, self.flow.name, self.flow.retry)

    # -- one message ----------------------------------------------------------------------------------------------

    def handle(self, message: ReceivedMessage) -> None:
        """Hand one message to the target. Raises to refuse it (the poller retries), LeaseLost to stop.

        Two commits per delivered message: ``received`` before the target, then the attempt and ``delivered`` (with
        the fingerprint, so the poller's own ``delivered`` mark is skipped) together. A refusal's attempt row is
        written with the poller's failure record (:meth:`FlowState.record_failure`)."""
        if self.lease_lost.is_set() or self.stop.is_set():
            raise LeaseLost(self.flow.name)
        name = self.flow.name
        headers = BytesHeaderParser().parsebytes(_header_block(message.raw))
        ikey = idempotency_key(name, message.key)
        record = self.store.record(
            name, message.key, MessageStatus.RECEIVED, mailbox=message.mailbox, subject=str(headers.get("Subject", "")),
            sender=str(headers.get("From", "")), size=message.size, idempotency_key=ikey,
        )  # fmt: skip
        delivery = Delivery(
            flow=name, key=message.key, idempotency_key=ikey, raw=message.raw, mailbox=message.mailbox,
            uid=message.uid, received_at=record.first_seen, attempt=record.attempts + 1,
        )  # fmt: skip
        started, at = time.perf_counter(), time.time()
        try:
            result = self.target.deliver(delivery)
        except Exception as exc:  # a target is user-configurable code: every failure is a refusal to record
            permanent = isinstance(exc, TargetError) and not exc.retryable
            if permanent:
                self.state.permanent.add(message.key)
            detail = exc.message if isinstance(exc, TargetError) else f"{type(exc).__name__}: {exc}"
            self.state.refusals[message.key] = AttemptInput(
                "refused-permanently" if permanent else "refused", detail, at,
                (time.perf_counter() - started) * 1000, self.owner,
            )  # fmt: skip
            self.metrics.message(name, "refused")
            raise
        elapsed = time.perf_counter() - started
        outcome = "duplicate" if result.duplicate else "delivered"
        self.store.record(
            name, message.key, MessageStatus.DELIVERED, target_ref=result.ref, duration_ms=elapsed * 1000,
            fingerprint=fingerprint(message.raw),
            attempt=AttemptInput(outcome, result.ref, at, elapsed * 1000, self.owner),
        )  # fmt: skip
        self.state.delivered_now.add(message.key)
        self.metrics.delivered(name, elapsed, duplicate=result.duplicate)

    # -- one poll -------------------------------------------------------------------------------------------------

    def poll(self) -> PollReport:
        """Drain the mailbox: poll until a poll sees fewer than a batch. Raises PostbridgeError for the session."""
        total = PollReport()
        flow = self.flow
        while True:
            if flow.protocol == "pop3":
                with open_pop3(flow.channel) as pop:
                    self._reconcile_pop3(pop)
                    report = poll_pop3(
                        pop, self.handle, self.state, post_processing=flow.pop3_post_processing,
                        max_messages_per_poll=flow.sender.max_messages_per_poll,
                        max_message_size=flow.sender.max_message_size, max_attempts=flow.retry.max_attempts,
                    )  # fmt: skip
            else:
                with open_session(flow.channel) as imap:
                    self._reconcile_imap(imap)
                    report = poll_imap(imap, flow.sender, self.handle, self.state)
            _add(total, report)
            if report.seen < flow.sender.max_messages_per_poll or self.stop.is_set():
                return total

    # -- after a crash: post-processing that happened but was not recorded -------------------------------------

    def _delivered(self) -> list[str]:
        records = self.store.list(flow=self.flow.name, status=MessageStatus.DELIVERED, limit=100_000)
        return [record.key for record in records]

    def _reconcile_imap(self, imap: ImapSession) -> None:
        """A message the log calls ``delivered`` that the poll's search no longer finds was post-processed (moved,
        deleted or marked read) just before a crash: record it, or the log would say "delivered" forever."""
        keys = self._delivered()
        if not keys:
            return
        sender = self.flow.sender
        mailbox = imap.select(sender.folder)
        user = self.flow.channel.credentials.user if self.flow.channel.credentials else ""
        prefix = f"imap:{user}@{self.flow.channel.address}/{sender.folder}:{mailbox.uidvalidity}:"
        by_uid = {int(key[len(prefix) :]): key for key in keys if key.startswith(prefix)}
        if not by_uid or sender.post_processing is PostProcessing.KEEP:
            return
        criteria = "UNSEEN" if sender.selection is Selection.UNREAD else "ALL"
        still = set(imap.search(f"UID {','.join(map(str, sorted(by_uid)))} {criteria} UNDELETED"))
        done = [key for uid, key in by_uid.items() if uid not in still]
        if done:
            log.info("flow %s: %d message(s) were post-processed before a restart; recorded", self.flow.name, len(done))
            self.store.mark_many(self.flow.name, done, MessageStatus.POST_PROCESSED)

    def _reconcile_pop3(self, pop: Pop3Session) -> None:
        """The POP3 twin: a delivered message whose UIDL is gone was deleted by the QUIT before a crash."""
        if self.flow.pop3_post_processing is not Pop3PostProcessing.DELETE:
            return
        keys = self._delivered()
        if not keys:
            return
        user = self.flow.channel.credentials.user if self.flow.channel.credentials else ""
        prefix = f"pop3:{user}@{self.flow.channel.address}:"  # poll_pop3's keys: the box, then the UIDL
        present = set(pop.uidl().values())
        done = [key for key in keys if key.startswith(prefix) and key[len(prefix) :] not in present]
        if done:
            self.store.mark_many(self.flow.name, done, MessageStatus.POST_PROCESSED)

    def watch(self, on_report: Callable[[PollReport], None]) -> None:
        """IDLE mode: keep the mailbox drained until :meth:`halt` (stop, or the lease lost)."""

        def opened() -> ImapSession:
            session = open_session(self.flow.channel)
            self._session = session
            return session

        watch_imap(
            opened, self.flow.sender, self.handle, self.state, self.stop, interval=self.flow.interval,
            on_report=on_report,
        )  # fmt: skip

    def halt(self, *, lease_lost: bool = False) -> None:
        """Stop the flow here: no further hand-on, and an IDLE in progress is hung up at once (from any thread)."""
        if lease_lost:
            self.lease_lost.set()
        self.stop.set()
        session = self._session
        if session is not None:
            session.interrupt()


def _header_block(raw: bytes, limit: int = 65536) -> bytes:
    """The header block of a message (parsing the body too costs and adds nothing)."""
    end = raw.find(b"\r\n\r\n", 0, limit)
    return raw[: end + 2] if end >= 0 else raw[:limit]


def _add(total: PollReport, report: PollReport) -> None:
    total.seen += report.seen
    total.delivered += report.delivered
    total.post_processed += report.post_processed
    total.skipped += report.skipped
    total.failed += report.failed
    total.quarantined += report.quarantined
    total.errors += report.errors
