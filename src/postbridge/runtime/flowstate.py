"""One flow's view of the runtime store, in the words of the mail poller (:class:`postbridge.mail.state.PollState`).

The poller knows ``delivered``, ``done``, ``failing``, ``quarantined`` and ``waiting``; the message processing log
knows received, delivered, post-processed, retrying, quarantined and failed. This adapter translates, scopes every
key to its flow, and adds what the poller does not do itself: exponential backoff between attempts (a retrying
message is ``waiting`` until its next attempt is due) and immediate quarantine of a permanent refusal.
Must not: speak a mail protocol or call a target.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from postbridge.runtime.config import RetryPolicy
from postbridge.runtime.store import AttemptInput, MessageStatus, RuntimeStore

_TO_POLLER = {
    MessageStatus.POST_PROCESSED: "done",
    MessageStatus.DELIVERED: "delivered",
    MessageStatus.QUARANTINED: "quarantined",
    MessageStatus.FAILED: "quarantined",
}
_FROM_POLLER = {
    "delivered": MessageStatus.DELIVERED,
    "done": MessageStatus.POST_PROCESSED,
    "quarantined": MessageStatus.QUARANTINED,
}


class FlowState:
    """A :class:`PollState` for one flow. ``permanent`` marks keys whose last refusal must not be retried."""

    def __init__(
        self,
        store: RuntimeStore,
        flow: str,
        retry: RetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.flow = flow
        self.retry = retry
        self.clock = clock
        self.rng = rng or random.Random()
        self.permanent: set[str] = set()
        self.refusals: dict[str, AttemptInput] = {}  # the handler's refused attempt, written with the failure
        self.delivered_now: set[str] = set()  # the handler already wrote 'delivered' (with the fingerprint)

    def status(self, key: str) -> str | None:
        record = self.store.get(self.flow, key)
        if record is None or record.status is MessageStatus.RECEIVED:
            return None  # never handed on (or the process died while the target had it): hand it on
        if record.status is MessageStatus.RETRYING:
            due = record.next_attempt is None or record.next_attempt <= self.clock()
            return "failing" if due else "waiting"
        return _TO_POLLER[record.status]

    def attempts(self, key: str) -> int:
        record = self.store.get(self.flow, key)
        return 0 if record is None else record.attempts

    def mark(self, key: str, status: str, *, fingerprint: str = "", error: str = "") -> None:
        if status == "delivered" and key in self.delivered_now:
            self.delivered_now.discard(key)  # written by the handler already: spare the store a second commit
            return
        self.store.record(self.flow, key, _FROM_POLLER[status], fingerprint=fingerprint, error=error)

    def mark_many(self, keys: list[str], status: str) -> None:
        self.store.mark_many(self.flow, keys, _FROM_POLLER[status])

    def record_failure(self, key: str, error: str) -> int:
        """Count a refused attempt and schedule the next one; a permanent refusal counts as the last attempt."""
        record = self.store.get(self.flow, key)
        attempts = (record.attempts if record else 0) + 1
        permanent = key in self.permanent
        self.permanent.discard(key)
        due = self.clock() + self.retry.delay(attempts, rng=self.rng)
        self.store.record(
            self.flow,
            key,
            MessageStatus.RETRYING,
            error=error,
            add_attempt=True,
            next_attempt=None if permanent else due,
            attempt=self.refusals.pop(key, None),
        )
        return self.retry.max_attempts if permanent else attempts

    def fingerprint_done(self, mailbox: str, fingerprint: str) -> bool:
        return self.store.fingerprint_done(self.flow, mailbox, fingerprint)

    def uidvalidity(self, mailbox: str) -> int | None:
        return self.store.uidvalidity(self.flow, mailbox)

    def set_uidvalidity(self, mailbox: str, value: int) -> None:
        self.store.set_uidvalidity(self.flow, mailbox, value)
