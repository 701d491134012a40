"""The runtime store's contract, run against both backends: a SQLite file and a real PostgreSQL (loopback).

Every test gets a fresh store (a new SQLite file in tmp_path, a new PostgreSQL database). The PostgreSQL cases
use the session's private cluster (tests/servers/postgres.py): they skip on a developer machine without
PostgreSQL and fail with CI=true.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from postbridge.errors import ConfigurationError, NetworkError, PostbridgeError
from postbridge.runtime.store import MessageStatus, RuntimeStore, SqliteStore, mask_url, open_store
from postbridge.runtime.store_pg import PostgresStore
from tests.servers import LOOPBACK, free_port
from tests.servers.postgres import Postgres

S = MessageStatus
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)]
PASSWORD = "hunter2-Secret"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty store: a SQLite file in tmp_path or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'state' / 'runtime.db'}"
    return str(request.getfixturevalue("postgres").new_database())


@pytest.fixture
def opener(store_url: str, tmp_path: Path) -> Iterator[Callable[[], RuntimeStore]]:
    """Opens (another) store on the same URL; every store it opened is closed after the test."""
    opened: list[RuntimeStore] = []

    def open_one() -> RuntimeStore:
        opened.append(open_store(store_url, home=tmp_path))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Callable[[], RuntimeStore]) -> RuntimeStore:
    return opener()


# -- the message log -------------------------------------------------------------------------------------


def test_record_inserts_a_row_with_every_field(store: RuntimeStore) -> None:
    before = time.time()
    row = store.record(
        "invoices",
        "imap:INBOX:7:42",
        S.RECEIVED,
        mailbox="INBOX",
        fingerprint="fp1",
        subject="Invoice 1",
        sender="a@corp.example",
        size=1234,
        idempotency_key="idem-1",
        next_attempt=None,
    )
    assert (row.flow, row.key, row.status, row.attempts) == ("invoices", "imap:INBOX:7:42", S.RECEIVED, 0)
    assert (row.mailbox, row.fingerprint, row.subject, row.sender, row.size) == (
        "INBOX",
        "fp1",
        "Invoice 1",
        "a@corp.example",
        1234,
    )
    assert row.idempotency_key == "idem-1" and row.error == "" and row.target_ref == ""
    assert before <= row.first_seen == row.updated <= time.time()
    assert row.delivered_at is None and row.done_at is None and row.next_attempt is None and row.duration_ms is None
    assert store.get("invoices", "imap:INBOX:7:42") == row
    assert store.get("invoices", "imap:INBOX:7:43") is None
    assert store.get("other", "imap:INBOX:7:42") is None


def test_record_upsert_keeps_stored_values_left_at_their_default(store: RuntimeStore) -> None:
    first = store.record(
        "f",
        "k",
        S.RECEIVED,
        mailbox="INBOX",
        subject="Hello",
        sender="s@x",
        size=10,
        fingerprint="fp",
        idempotency_key="idem",
    )
    retry = store.record("f", "k", S.RETRYING, error="HTTP 503", next_attempt=first.first_seen + 5, add_attempt=True)
    assert (retry.mailbox, retry.subject, retry.sender, retry.size, retry.fingerprint, retry.idempotency_key) == (
        "INBOX",
        "Hello",
        "s@x",
        10,
        "fp",
        "idem",
    )
    assert retry.first_seen == first.first_seen and retry.updated > first.updated
    assert (retry.attempts, retry.error, retry.next_attempt) == (1, "HTTP 503", first.first_seen + 5)
    delivered = store.record("f", "k", S.DELIVERED, target_ref="HTTP 201", duration_ms=12.5, add_attempt=True)
    assert delivered.delivered_at is not None and delivered.delivered_at == delivered.updated
    assert (delivered.attempts, delivered.target_ref, delivered.duration_ms) == (2, "HTTP 201", 12.5)
    assert delivered.error == "HTTP 503"  # the last error stays on record (left at its default)
    assert delivered.next_attempt is None  # only a retrying message has a next attempt
    again = store.record("f", "k", S.DELIVERED, subject="Changed", size=11)
    assert again.delivered_at == delivered.delivered_at  # only the first delivery sets it
    assert (again.subject, again.size, again.target_ref, again.duration_ms) == ("Changed", 11, "HTTP 201", 12.5)
    assert again.done_at is None and again.first_seen == first.first_seen
    assert store.get("f", "k") == again


@pytest.mark.parametrize("final", [S.POST_PROCESSED, S.QUARANTINED, S.FAILED])
def test_a_final_status_sets_done_at(store: RuntimeStore, final: MessageStatus) -> None:
    assert store.record("f", "k", S.RECEIVED).done_at is None
    done = store.record("f", "k", final)
    assert done.done_at is not None and done.done_at == done.updated and done.status is final
    # a message an operator sends back for another try is no longer done
    assert store.record("f", "k", S.RETRYING, add_attempt=True).done_at is None


def test_add_attempt_counts_concurrent_writers_exactly(store: RuntimeStore) -> None:
    def work() -> None:
        for _ in range(25):
            store.record("f", "k", S.RETRYING, add_attempt=True)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = store.get("f", "k")
    assert row is not None and row.attempts == 200


def test_mark_many_sets_every_status_in_one_call(store: RuntimeStore) -> None:
    store.record("f", "a", S.DELIVERED, subject="A")
    store.record("f", "b", S.RECEIVED, subject="B")
    store.record("g", "a", S.RECEIVED)
    store.mark_many("f", ["a", "b", "new"], S.POST_PROCESSED)
    a, b, new = store.get("f", "a"), store.get("f", "b"), store.get("f", "new")
    assert a is not None and b is not None and new is not None
    assert [a.status, b.status, new.status] == [S.POST_PROCESSED] * 3
    assert a.subject == "A" and a.delivered_at is not None and a.done_at is not None
    assert new.subject == "" and new.attempts == 0 and new.done_at is not None
    other = store.get("g", "a")
    assert other is not None and other.status is S.RECEIVED  # another flow's message with the same key
    store.mark_many("f", [], S.FAILED)
    assert store.counts("f")[S.POST_PROCESSED] == 3
    store.mark_many("f", ["b"], S.DELIVERED)
    b = store.get("f", "b")
    assert b is not None and b.delivered_at is not None and b.done_at is None


def test_mark_many_is_one_transaction(store: RuntimeStore) -> None:
    store.record("f", "a", S.DELIVERED)
    with pytest.raises(PostbridgeError):
        store.mark_many("f", ["a", object()], S.POST_PROCESSED)  # type: ignore[list-item]
    row = store.get("f", "a")
    assert row is not None and row.status is S.DELIVERED  # the first row's update was rolled back
    store.mark_many("f", ["a"], S.POST_PROCESSED)  # and the store is still usable
    assert store.counts("f")[S.POST_PROCESSED] == 1


def test_list_filters_and_orders_newest_first(store: RuntimeStore) -> None:
    store.record("invoices", "k1", S.POST_PROCESSED, subject="Invoice March", sender="billing@corp.example")
    store.record("invoices", "k2", S.RETRYING, subject="Statement", error="HTTP 503 from target")
    store.record("orders", "k3", S.RECEIVED, subject="100% discount", sender="Ärger@Straße.example")
    time.sleep(0.01)
    since = time.time()
    store.record("orders", "k4", S.RETRYING, subject="Order 1000", sender="shop@corp.example")
    assert [row.key for row in store.list()] == ["k4", "k3", "k2", "k1"]
    assert [row.key for row in store.list(limit=2)] == ["k4", "k3"]
    assert [row.key for row in store.list(flow="invoices")] == ["k2", "k1"]
    assert [row.key for row in store.list(status=S.RETRYING)] == ["k4", "k2"]
    assert [row.key for row in store.list(flow="orders", status=S.RETRYING)] == ["k4"]
    assert [row.key for row in store.list(since=since)] == ["k4"]
    assert [row.key for row in store.list(text="INVOICE")] == ["k1"]  # subject, any case
    assert [row.key for row in store.list(text="corp.EXAMPLE")] == ["k4", "k1"]  # sender
    assert [row.key for row in store.list(text="503")] == ["k2"]  # error
    assert [row.key for row in store.list(text="k3")] == ["k3"]  # key
    assert [row.key for row in store.list(text="ärger@strasse")] == []
    assert [row.key for row in store.list(text="ärger@STRASSE".replace("SS", "ß"))] == ["k3"]  # beyond ASCII
    assert [row.key for row in store.list(text="100%")] == ["k3"]  # % is no wildcard: "1000" does not match
    assert [row.key for row in store.list(text="Order_1")] == []  # nor is _
    assert store.list(flow="nobody") == [] and store.list(limit=0) == []
    store.record("invoices", "k1", S.POST_PROCESSED, error="touched")  # an update moves it to the front
    assert store.list(limit=1)[0].key == "k1"


def test_find_by_key_or_idempotency_key_across_flows(store: RuntimeStore) -> None:
    store.record("f", "imap:INBOX:1:5", S.DELIVERED, idempotency_key="idem-a")
    time.sleep(0.001)
    store.record("g", "imap:INBOX:1:5", S.RECEIVED, idempotency_key="idem-b")
    assert [(row.flow, row.status) for row in store.find("imap:INBOX:1:5")] == [("g", S.RECEIVED), ("f", S.DELIVERED)]
    assert [row.flow for row in store.find("idem-b")] == ["g"]
    assert store.find("idem") == [] and store.find("") == []


def test_counts_every_status_per_flow_and_overall(store: RuntimeStore) -> None:
    assert store.counts() == dict.fromkeys(MessageStatus, 0)
    for key, status in [("a", S.RECEIVED), ("b", S.RETRYING), ("c", S.RETRYING), ("d", S.QUARANTINED)]:
        store.record("f", key, status)
    store.record("g", "a", S.FAILED)
    assert store.counts("f") == {**dict.fromkeys(MessageStatus, 0), S.RECEIVED: 1, S.RETRYING: 2, S.QUARANTINED: 1}
    assert store.counts()[S.FAILED] == 1 and sum(store.counts().values()) == 5
    assert store.counts("nobody") == dict.fromkeys(MessageStatus, 0)


def test_fingerprint_done_only_for_delivered_or_post_processed(store: RuntimeStore) -> None:
    store.record("f", "k1", S.RECEIVED, mailbox="INBOX", fingerprint="fp1")
    store.record("f", "k2", S.RETRYING, mailbox="INBOX", fingerprint="fp2")
    assert not store.fingerprint_done("f", "INBOX", "fp1") and not store.fingerprint_done("f", "INBOX", "fp2")
    store.record("f", "k1", S.DELIVERED)
    store.record("f", "k2", S.POST_PROCESSED)
    assert store.fingerprint_done("f", "INBOX", "fp1") and store.fingerprint_done("f", "INBOX", "fp2")
    assert not store.fingerprint_done("f", "Archive", "fp1")
    assert not store.fingerprint_done("g", "INBOX", "fp1")
    store.record("f", "k3", S.DELIVERED, mailbox="INBOX")  # no fingerprint
    assert not store.fingerprint_done("f", "INBOX", "")


def test_uidvalidity_per_flow_and_mailbox(store: RuntimeStore) -> None:
    assert store.uidvalidity("f", "INBOX") is None
    store.set_uidvalidity("f", "INBOX", 1700000000)
    store.set_uidvalidity("f", "Archive", 7)
    assert store.uidvalidity("f", "INBOX") == 1700000000 and store.uidvalidity("f", "Archive") == 7
    store.set_uidvalidity("f", "INBOX", 4294967295)  # the largest UIDVALIDITY (32 bits, unsigned)
    assert store.uidvalidity("f", "INBOX") == 4294967295
    assert store.uidvalidity("g", "INBOX") is None


# -- leases ------------------------------------------------------------------------------------------------


def test_lease_lifecycle(store: RuntimeStore) -> None:
    now = 1_000_000.0
    assert store.lease("f") is None
    assert store.acquire_lease("f", "w1", 60, now=now)  # free -> acquired
    assert store.lease("f") == ("w1", now + 60)
    assert not store.acquire_lease("f", "w2", 60, now=now + 59)  # held by another -> refused
    assert store.lease("f") == ("w1", now + 60)
    assert store.acquire_lease("f", "w1", 60, now=now + 30)  # renewed by its holder
    assert store.lease("f") == ("w1", now + 90)
    assert store.acquire_lease("g", "w2", 60, now=now)  # another flow has its own lease
    assert store.acquire_lease("f", "w2", 60, now=now + 90)  # expired -> taken over
    assert store.lease("f") == ("w2", now + 150)
    assert not store.acquire_lease("f", "w1", 60, now=now + 100)
    store.release_lease("f", "w1")  # not the holder: nothing happens
    assert store.lease("f") == ("w2", now + 150)
    store.release_lease("f", "w2")
    assert store.lease("f") is None
    assert store.acquire_lease("f", "w1", 60, now=now + 100)  # free again
    assert store.lease("g") == ("w2", now + 60)


def test_lease_with_the_real_clock(store: RuntimeStore) -> None:
    assert store.acquire_lease("f", "w1", 0.2)
    assert not store.acquire_lease("f", "w2", 0.2)
    time.sleep(0.3)
    assert store.acquire_lease("f", "w2", 0.2)
    lease = store.lease("f")
    assert lease is not None and lease[0] == "w2" and time.time() < lease[1] <= time.time() + 0.2


def _race(stores: list[RuntimeStore], flow: str) -> list[str]:
    """Let one thread per store try to take the lease of `flow` at the same moment; return the winners."""
    barrier = threading.Barrier(len(stores))
    won: list[str] = []
    lock = threading.Lock()

    def contend(store: RuntimeStore, owner: str) -> None:
        barrier.wait()
        if store.acquire_lease(flow, owner, 60):
            with lock:
                won.append(owner)

    threads = [threading.Thread(target=contend, args=(store, f"w{n}")) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_eight_threads_with_their_own_connection_race_for_one_lease(opener: Callable[[], RuntimeStore]) -> None:
    stores = [opener() for _ in range(8)]
    for round_number in range(5):
        won = _race(stores, f"race-{round_number}")
        assert len(won) == 1, f"round {round_number}: winners {won}"
        assert stores[0].lease(f"race-{round_number}") == (won[0], pytest.approx(time.time() + 60, abs=5))


def test_eight_threads_sharing_one_store_race_for_one_lease(store: RuntimeStore) -> None:
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def contend(owner: str) -> None:
        barrier.wait()
        results.append(store.acquire_lease("f", owner, 60))

    threads = [threading.Thread(target=contend, args=(f"w{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


CONTENDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from postbridge.runtime.store import open_store
    url, owner = sys.argv[1], sys.argv[2]
    store = open_store(url, home=Path("/nonexistent"))
    print("ready", flush=True)
    sys.stdin.readline()  # the starting gun: every contender is connected by now
    results = [store.acquire_lease(f"race-{n}", owner, 60) for n in range(5)]
    print(" ".join("won" if result else "lost" for result in results), flush=True)
    store.close()
    """
)


def test_four_processes_race_for_one_lease(store_url: str, store: RuntimeStore) -> None:
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, store_url, f"process-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        for contender in contenders:
            assert contender.stdout is not None
            assert contender.stdout.readline().strip() == "ready", contender.communicate()[1]
        for contender in contenders:
            assert contender.stdin is not None
            contender.stdin.write("go\n")
            contender.stdin.flush()
        outputs = [contender.communicate(timeout=60) for contender in contenders]
    finally:
        for contender in contenders:
            if contender.poll() is None:
                contender.kill()
                contender.wait()
    assert [contender.returncode for contender in contenders] == [0] * 4, [err for _, err in outputs]
    for race in range(5):
        winners = [n for n, (out, _) in enumerate(outputs) if out.split()[race] == "won"]
        assert len(winners) == 1, f"race-{race}: winners {winners}"
        assert store.lease(f"race-{race}") == (f"process-{winners[0]}", pytest.approx(time.time() + 60, abs=30))


# -- flow health -------------------------------------------------------------------------------------------


def test_record_poll_arithmetic(store: RuntimeStore) -> None:
    assert store.health() == [] and store.health("f") == []
    store.record_poll("f", "w1", ok=False, at=100.0, error="connection refused", seen=0)
    store.record_poll("f", "w1", ok=False, at=160.0, error="timed out")
    [health] = store.health("f")
    assert (health.last_poll, health.last_success, health.last_error) == (160.0, None, "timed out")
    assert (health.consecutive_failures, health.polls) == (2, 2)
    store.record_poll("f", "w2", ok=True, at=220.0, seen=5, delivered=4, failed=1)
    store.record_poll("f", "w2", ok=True, at=280.0, seen=2, delivered=2)
    [health] = store.health("f")
    assert (health.owner, health.last_poll, health.last_success) == ("w2", 280.0, 280.0)
    assert health.last_error == "timed out"  # the last error stays visible after a success
    assert (health.consecutive_failures, health.polls, health.seen, health.delivered, health.failed) == (0, 4, 7, 6, 1)
    store.record_poll("f", "w2", ok=False, at=340.0, error="login failed", seen=1)
    [health] = store.health("f")
    assert (health.consecutive_failures, health.last_success, health.last_error) == (1, 280.0, "login failed")
    assert (health.polls, health.seen) == (5, 8)
    store.record_poll("a-flow", "w3", ok=True, at=1.0)
    assert [h.flow for h in store.health()] == ["a-flow", "f"]
    assert store.health("nobody") == []


# -- durability --------------------------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(opener: Callable[[], RuntimeStore]) -> None:
    store = opener()
    row = store.record(
        "f",
        "k",
        S.DELIVERED,
        mailbox="INBOX",
        subject="Kept",
        idempotency_key="idem",
        size=3,
        duration_ms=1.5,
        target_ref="/spool/idem.eml",
        add_attempt=True,
    )
    store.set_uidvalidity("f", "INBOX", 99)
    assert store.acquire_lease("f", "w1", 3600)
    store.record_poll("f", "w1", ok=True, at=5.0, seen=1, delivered=1)
    store.close()
    reopened = opener()
    assert reopened.get("f", "k") == row
    assert reopened.uidvalidity("f", "INBOX") == 99
    assert reopened.lease("f") is not None and not reopened.acquire_lease("f", "w2", 60)
    assert [(h.polls, h.delivered) for h in reopened.health("f")] == [(1, 1)]


WRITER_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from postbridge.runtime.store import MessageStatus, open_store
    store = open_store(sys.argv[1], home=Path("/nonexistent"))
    for n in range(20):
        store.record("f", f"k{n}", MessageStatus.DELIVERED, subject=f"message {n}")
    store.mark_many("f", [f"k{n}" for n in range(10)], MessageStatus.POST_PROCESSED)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no exit handlers: only what was committed remains
    """
)


def test_writes_survive_a_killed_writer(store_url: str, store: RuntimeStore) -> None:
    result = subprocess.run([sys.executable, "-c", WRITER_KILLED, store_url], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode(errors="replace")
    counts = store.counts("f")
    assert (counts[S.POST_PROCESSED], counts[S.DELIVERED]) == (10, 10)
    row = store.get("f", "k19")
    assert row is not None and row.subject == "message 19"


# -- opening -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "sqlite", "  sqlite  "])
def test_open_store_defaults_to_sqlite_in_home(tmp_path: Path, url: str) -> None:
    store = open_store(url, home=tmp_path / "home")
    try:
        assert isinstance(store, SqliteStore) and store.path == tmp_path / "home" / "runtime.db"
        store.record("f", "k", S.RECEIVED)
        for path in (store.path, store.path.with_name("runtime.db-wal"), store.path.with_name("runtime.db-shm")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        assert stat.S_IMODE(os.stat(tmp_path / "home").st_mode) == 0o700
    finally:
        store.close()


def test_open_store_sqlite_url_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "state.db"
    store = open_store(f"sqlite://{path}", home=tmp_path / "home")
    try:
        assert isinstance(store, SqliteStore) and store.path == path and path.exists()
        assert not (tmp_path / "home").exists()
    finally:
        store.close()


@pytest.mark.parametrize("url", ["sqlite://relative/path.db", "sqlite:///", "sqlite://"])
def test_open_store_sqlite_url_needs_an_absolute_path(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError, match="needs an absolute file path") as caught:
        open_store(url, home=tmp_path)
    assert "sqlite:///" in caught.value.hint


@pytest.mark.parametrize(
    "url", [f"mysql://app:{PASSWORD}@db.example/app", "redis://127.0.0.1", "runtime.db", f"pg://u:{PASSWORD}@h/d"]
)
def test_open_store_refuses_other_schemes_and_masks_passwords(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError, match="is neither SQLite nor PostgreSQL") as caught:
        open_store(url, home=tmp_path)
    assert PASSWORD not in str(caught.value) and "postgresql://" in caught.value.hint
    assert url.split("@")[-1] in str(caught.value)  # the rest of the value is quoted


def test_open_store_sqlite_in_a_folder_it_may_not_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigurationError, match="cannot be opened") as caught:
        open_store(f"sqlite://{tmp_path / 'file' / 'runtime.db'}", home=tmp_path)
    assert str(tmp_path / "file" / "runtime.db") in str(caught.value)


def test_open_store_refuses_a_file_that_is_no_database(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigurationError, match="cannot be used") as caught:
        open_store(f"sqlite://{path}", home=tmp_path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_unreachable_postgresql_never_shows_the_password(tmp_path: Path, scheme: str, form: str) -> None:
    port = free_port()  # nothing listens there
    if form == "userinfo":
        url = f"{scheme}://postbridge:{PASSWORD}@{LOOPBACK}:{port}/runtime"
    else:
        url = f"{scheme}://postbridge@{LOOPBACK}:{port}/runtime?password={PASSWORD}&connect_timeout=5"
    with pytest.raises(NetworkError) as caught:
        open_store(url, home=tmp_path)
    error = caught.value
    for text in (str(error), repr(error), error.hint, *map(str, error.args)):
        assert PASSWORD not in text
    assert f"{LOOPBACK}:{port}" in str(error) and "***" in str(error)


@pytest.mark.parametrize("rest", ["127.0.0.1:notaport/db", "127.0.0.1:1/db?bogus=1"])
def test_a_malformed_postgresql_url_is_a_configuration_error(tmp_path: Path, rest: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot connect") as caught:
        open_store(f"postgresql://u:{PASSWORD}@{rest}", home=tmp_path)
    assert PASSWORD not in str(caught.value) and "postgresql://u:***@" in str(caught.value)


def test_mask_url() -> None:
    assert mask_url(f"postgresql://u:{PASSWORD}@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert mask_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert mask_url("postgresql://u:p%40ss@h/d?sslmode=require") == "postgresql://u:***@h/d?sslmode=require"
    assert mask_url("postgresql://u@h/d?sslmode=require&password=x&a=b") == (
        "postgresql://u@h/d?sslmode=require&password=***&a=b"
    )
    assert mask_url("sqlite:///var/lib/runtime.db") == "sqlite:///var/lib/runtime.db"


def test_open_store_postgresql_url(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    store = open_store(url, home=tmp_path)
    try:
        assert isinstance(store, PostgresStore) and "postgres@" in repr(store)
        store.record("f", "k", S.RECEIVED)
        assert store.get("f", "k") is not None
    finally:
        store.close()
    assert not (tmp_path / "runtime.db").exists()


def test_a_closed_store_refuses_calls(store: RuntimeStore) -> None:
    store.record("f", "k", S.RECEIVED)
    store.close()
    store.close()  # twice is harmless
    with pytest.raises(PostbridgeError, match="was closed"):
        store.get("f", "k")


# -- schema --------------------------------------------------------------------------------------------------


def test_a_newer_schema_is_refused(store_url: str, tmp_path: Path) -> None:
    open_store(store_url, home=tmp_path).close()
    if store_url.startswith("sqlite://"):
        with sqlite3.connect(store_url.removeprefix("sqlite://")) as db:
            db.execute("UPDATE schema_version SET version = 99")
        db.close()
    else:
        with psycopg.connect(store_url, autocommit=True) as connection:
            connection.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigurationError, match="schema version 99"):
        open_store(store_url, home=tmp_path)


def test_two_postgresql_stores_create_the_schema_at_once(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    barrier = threading.Barrier(6)
    opened: list[RuntimeStore] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(open_store(url, home=tmp_path))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == [] and len(opened) == 6
        opened[0].record("f", "k", S.RECEIVED)
        assert opened[5].get("f", "k") is not None
    finally:
        for store in opened:
            store.close()


def test_postgresql_mark_many_is_one_transaction(postgres: Postgres, tmp_path: Path) -> None:
    store = open_store(postgres.new_database(), home=tmp_path)
    try:
        store.record("f", "a", S.DELIVERED)
        with pytest.raises(PostbridgeError):
            store.mark_many("f", ["a", "b\x00"], S.POST_PROCESSED)  # PostgreSQL text cannot hold NUL
        row = store.get("f", "a")
        assert row is not None and row.status is S.DELIVERED  # the first update was rolled back
        store.record("f", "c", S.RECEIVED)  # the store is still usable
    finally:
        store.close()


def test_postgresql_store_replaces_a_connection_the_server_dropped(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    store = open_store(url, home=tmp_path)
    try:
        store.record("f", "k", S.RECEIVED)
        database = url.rsplit("/", 1)[1]
        postgres.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        with pytest.raises(NetworkError, match="terminating connection"):
            store.get("f", "k")
        row = store.get("f", "k")  # a fresh connection
        assert row is not None and row.status is S.RECEIVED
    finally:
        store.close()


def test_attempts_are_numbered_per_message_and_kept_in_order(store: RuntimeStore) -> None:
    first = store.record_attempt("f", "k", outcome="refused", detail="HTTP 503", at=10.0, duration_ms=3.5, worker="w1")
    second = store.record_attempt("f", "k", outcome="delivered", detail="HTTP 201", at=20.0, worker="w2")
    other = store.record_attempt("f", "other", outcome="delivered", detail="ok", at=30.0)
    elsewhere = store.record_attempt("g", "k", outcome="refused", detail="x", at=40.0)
    assert (first.attempt, second.attempt, other.attempt, elsewhere.attempt) == (1, 2, 1, 1)
    history = store.attempts("f", "k")
    assert [(a.attempt, a.outcome, a.detail, a.worker) for a in history] == [
        (1, "refused", "HTTP 503", "w1"), (2, "delivered", "HTTP 201", "w2"),
    ]  # fmt: skip
    assert history[0].duration_ms == 3.5 and history[1].duration_ms is None and history[0].at == 10.0
    assert store.attempts("f", "missing") == []
