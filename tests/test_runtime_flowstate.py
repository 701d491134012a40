"""The runtime's view of the store in the poller's words: backoff between attempts, permanent refusals, scoping."""

from __future__ import annotations

import random
from pathlib import Path

from postbridge.runtime.config import RetryPolicy
from postbridge.runtime.flowstate import FlowState
from postbridge.runtime.runner import idempotency_key
from postbridge.runtime.store import MessageStatus, open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_message_waits_for_its_backoff_then_is_retried_then_quarantined(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    clock = Clock()
    retry = RetryPolicy(max_attempts=3, initial=10, maximum=100, multiplier=2)
    state = FlowState(store, "f", retry, clock=clock, rng=random.Random(1))
    assert state.status("k") is None
    assert state.record_failure("k", "HTTP 503") == 1
    assert state.status("k") == "waiting"  # the poller passes over it
    clock.now += 9
    assert state.status("k") == "waiting"
    clock.now += 2  # 10 s +- 10 % jitter have passed
    assert state.status("k") == "failing"
    assert state.record_failure("k", "HTTP 503") == 2
    record = store.get("f", "k")
    assert record is not None and record.status is MessageStatus.RETRYING and record.error == "HTTP 503"
    assert record.next_attempt is not None and 18 <= record.next_attempt - clock.now <= 22  # the second delay doubles
    state.mark("k", "quarantined", error="refused 3 times")
    assert state.status("k") == "quarantined"
    store.close()


def test_a_permanent_refusal_counts_as_the_last_attempt(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    state = FlowState(store, "f", RetryPolicy(max_attempts=5), clock=Clock())
    state.permanent.add("k")
    assert state.record_failure("k", "HTTP 422") == 5  # the poller quarantines at once
    assert state.record_failure("other", "HTTP 503") == 1  # the mark applied to that key only
    store.close()


def test_states_are_scoped_per_flow_and_map_to_the_poller_words(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    one, two = FlowState(store, "one", RetryPolicy()), FlowState(store, "two", RetryPolicy())
    one.mark("k", "delivered", fingerprint="fp")
    assert one.status("k") == "delivered" and two.status("k") is None
    one.mark_many(["k"], "done")
    assert one.status("k") == "done"
    store.record("one", "k2", MessageStatus.DELIVERED, mailbox="INBOX", fingerprint="fp2")
    assert one.fingerprint_done("INBOX", "fp2") and not two.fingerprint_done("INBOX", "fp2")
    one.set_uidvalidity("box", 7)
    assert one.uidvalidity("box") == 7 and two.uidvalidity("box") is None
    store.record("one", "r", MessageStatus.RECEIVED)
    assert one.status("r") is None  # received but never accepted: hand it on again
    store.close()


def test_idempotency_keys_are_stable_and_distinct() -> None:
    assert idempotency_key("f", "k") == idempotency_key("f", "k")
    assert idempotency_key("f", "k") != idempotency_key("g", "k") != idempotency_key("f", "k2")
    assert len(idempotency_key("f", "k")) == 32 and idempotency_key("f", "k").isalnum()
