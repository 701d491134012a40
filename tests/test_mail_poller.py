"""Polling against a real Dovecot: post-processing only after hand-over, no loss, no duplicates."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.mail.imap import ImapSession, append, open_session
from postbridge.mail.poller import PostProcessing, ReceivedMessage, Selection, SenderSettings, poll_imap
from postbridge.mail.settings import ChannelSettings, Credentials, Protection
from postbridge.mail.state import SqliteState
from postbridge.trust.truststore import TrustStore
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki


def message(n: int, size: int = 0) -> bytes:
    body = b"x" * size if size else f"message {n}".encode()
    return (
        (
            f"From: sender@corp.example\r\nTo: alice@corp.example\r\nSubject: poll {n}\r\n"
            f"Message-ID: <poll-{n}-{uuid.uuid4().hex}@corp.example>\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
    )


@pytest.fixture
def session(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path) -> ImapSession:
    store = TrustStore(tmp_path / "keystore")
    store.add(test_pki.root_pem.read_bytes(), alias="root")
    channel = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imaps_port),
        protection=Protection.TLS,
        credentials=Credentials("alice", "secret"),
        keystore=store.directory,
        tls_server_name="mail.corp.example",
    )
    with open_session(channel) as opened:
        yield opened


@pytest.fixture
def folder(session: ImapSession) -> str:
    name = f"T{uuid.uuid4().hex[:10]}"
    session.create_folder(name)
    return name


@pytest.fixture
def state(tmp_path: Path) -> SqliteState:
    return SqliteState(tmp_path / "state.sqlite")


class Collect:
    def __init__(self, fail_times: int = 0) -> None:
        self.received: list[ReceivedMessage] = []
        self.fail_times = fail_times

    def __call__(self, message: ReceivedMessage) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("target unavailable")
        self.received.append(message)


def fill(session: ImapSession, folder: str, count: int) -> list[bytes]:
    raws = [message(n) for n in range(count)]
    for raw in raws:
        append(session, folder, raw)
    return raws


@pytest.mark.parametrize("action", list(PostProcessing))
def test_each_post_processing_after_hand_over(
    session: ImapSession, folder: str, state: SqliteState, action: PostProcessing
) -> None:
    raws = fill(session, folder, 3)
    handler = Collect()
    settings = SenderSettings(folder=folder, post_processing=action, archive_folder=folder + "-archive")
    report = poll_imap(session, settings, handler, state)
    assert sorted(m.raw for m in handler.received) == sorted(raws)
    assert report.delivered == 3 and report.post_processed == 3
    again = poll_imap(session, settings, handler, state)
    assert again.delivered == 0 and len(handler.received) == 3  # nothing twice
    session.select(folder)
    remaining = session.search("ALL")
    if action is PostProcessing.KEEP:
        assert len(session.search("UNSEEN")) == 3
    elif action is PostProcessing.MARK_READ:
        assert len(session.search("SEEN")) == 3
    elif action is PostProcessing.DELETE:
        assert remaining == []
    else:
        assert remaining == []
        session.select(folder + "-archive")
        assert len(session.search("ALL")) == 3
        seen = len(session.search("SEEN"))
        assert seen == (3 if action is PostProcessing.ARCHIVE_AND_MARK_READ else 0)


def test_a_refused_message_is_retried_then_quarantined_and_the_rest_flows(
    session: ImapSession, folder: str, state: SqliteState
) -> None:
    fill(session, folder, 2)
    settings = SenderSettings(folder=folder, max_attempts=2, quarantine_folder=folder + "-q")

    def handler(received: ReceivedMessage) -> None:
        if b"message 0" in received.raw:
            raise RuntimeError("poison message")
        accepted.append(received)

    accepted: list[ReceivedMessage] = []
    first = poll_imap(session, settings, handler, state)
    assert first.failed == 1 and first.delivered == 1 and first.quarantined == 0
    second = poll_imap(session, settings, handler, state)
    assert second.failed == 1 and second.quarantined == 1
    assert len(accepted) == 1
    session.select(folder + "-q")
    assert len(session.search("ALL")) == 1
    session.select(folder)
    assert session.search("UNSEEN UNDELETED") == []


def test_crash_between_hand_over_and_post_processing_does_not_deliver_twice(
    session: ImapSession, folder: str, state: SqliteState, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(session, folder, 1)
    settings = SenderSettings(folder=folder)
    handler = Collect()
    real_store = session.store_flags

    def broken(uid: int, flags: str) -> None:
        from postbridge.mail.common import MailProtocolError

        raise MailProtocolError("connection lost before STORE")

    monkeypatch.setattr(session, "store_flags", broken)
    report = poll_imap(session, settings, handler, state)
    assert report.delivered == 1 and report.post_processed == 0 and report.errors
    monkeypatch.setattr(session, "store_flags", real_store)
    report = poll_imap(session, settings, handler, state)
    assert report.delivered == 0 and report.post_processed == 1
    assert len(handler.received) == 1


def test_oversized_message_is_quarantined_without_fetching(
    session: ImapSession, folder: str, state: SqliteState
) -> None:
    append(session, folder, message(1, size=50_000))
    handler = Collect()
    report = poll_imap(
        session, SenderSettings(folder=folder, max_message_size=10_000, quarantine_folder=folder + "-q"), handler, state
    )
    assert report.quarantined == 1 and handler.received == []


def test_uidvalidity_change_does_not_replay_handled_mail(session: ImapSession, folder: str, state: SqliteState) -> None:
    raws = fill(session, folder, 3)
    settings = SenderSettings(folder=folder, post_processing=PostProcessing.KEEP, selection=Selection.ALL)
    handler = Collect()
    poll_imap(session, settings, handler, state)
    assert len(handler.received) == 3
    # recreate the folder: same messages, new UIDVALIDITY (what a server restore or migration does)
    old = session.select(folder).uidvalidity
    session.select("INBOX")  # a selected mailbox cannot be renamed away under the session
    session.imap.rename(f'"{folder}"', f'"{folder}-old"')
    session.create_folder(folder)
    for raw in raws:
        append(session, folder, raw)
    append(session, folder, message(99))
    assert session.select(folder).uidvalidity != old
    report = poll_imap(session, settings, handler, state)
    assert report.delivered == 1  # only the new one
    assert len(handler.received) == 4


def test_idle_delivers_new_mail_re_arms_and_catches_up_after_a_dropped_connection(
    dovecot: Dovecot, test_pki: TestPki, tmp_path: Path, session: ImapSession, folder: str, state: SqliteState
) -> None:
    import socket
    import threading
    import time

    from postbridge.mail.poller import watch_imap

    channel = session.settings
    opened: list[ImapSession] = []

    def connect() -> ImapSession:
        opened.append(open_session(channel))
        return opened[-1]

    handler = Collect()
    stop = threading.Event()
    settings = SenderSettings(folder=folder)
    worker = threading.Thread(
        target=watch_imap,
        args=(connect, settings, handler, state, stop),
        kwargs={"rearm": 1.0, "backoff_cap": 0.5},
        daemon=True,
    )
    worker.start()

    def wait_for(count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(handler.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(handler.received) == count

    try:
        time.sleep(2.5)  # long enough for at least one re-arm (rearm = 1 s)
        append(session, folder, message(1))
        wait_for(1, timeout=3)  # IDLE woke up for it
        opened[-1].imap.sock.shutdown(socket.SHUT_RDWR)  # the line drops ...
        append(session, folder, message(2))  # ... and mail arrives meanwhile
        wait_for(2)  # reconnect + catch-up poll
        assert len(opened) >= 2
    finally:
        stop.set()
        worker.join(5)


def test_pop3_poll_keep_then_delete_hands_each_message_on_once(
    dovecot: Dovecot, test_pki: TestPki, tmp_path: Path, state: SqliteState
) -> None:
    from postbridge.mail.poller import Pop3PostProcessing, poll_pop3
    from postbridge.mail.pop3 import open_pop3

    store = TrustStore(tmp_path / "pop-keystore")
    store.add(test_pki.root_pem.read_bytes(), alias="root")
    channel = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.pop3s_port),
        protection=Protection.TLS,
        credentials=Credentials("bob", "secret"),
        keystore=store.directory,
        tls_server_name="mail.corp.example",
    )
    tag = uuid.uuid4().hex.encode()
    for n in range(3):
        dovecot.deliver("bob", message(n).replace(b"Subject: poll", b"Subject: " + tag))
    mine: list[ReceivedMessage] = []

    def handler(received: ReceivedMessage) -> None:
        if tag in received.raw:
            mine.append(received)

    with open_pop3(channel) as session:
        poll_pop3(session, handler, state, post_processing=Pop3PostProcessing.KEEP)
    with open_pop3(channel) as session:
        poll_pop3(session, handler, state, post_processing=Pop3PostProcessing.KEEP)
    assert len(mine) == 3  # kept on the server, remembered by UIDL
    fresh = SqliteState(tmp_path / "fresh.sqlite")
    mine.clear()
    with open_pop3(channel) as session:
        report = poll_pop3(session, handler, fresh, post_processing=Pop3PostProcessing.DELETE)
    assert len(mine) == 3 and report.post_processed >= 3
    with open_pop3(channel) as session:
        assert all(tag not in session.retrieve(number) for number in session.uidl())


def test_state_keeps_accounts_apart(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path, state: SqliteState) -> None:
    """The same message in two accounts' folders of the same name is handed on for each account."""
    store = TrustStore(tmp_path / "ks2")
    store.add(test_pki.root_pem.read_bytes(), alias="root")
    raw = message(7)
    folder = f"S{uuid.uuid4().hex[:8]}"
    received: dict[str, int] = {}
    for user in ("alice", "bob"):
        channel = ChannelSettings(
            address=HostPort(dovecot.host, dovecot.imaps_port),
            protection=Protection.TLS,
            credentials=Credentials(user, "secret"),
            keystore=store.directory,
            tls_server_name="mail.corp.example",
        )
        with open_session(channel) as opened:
            opened.create_folder(folder)
            append(opened, folder, raw)
            handler = Collect()
            poll_imap(opened, SenderSettings(folder=folder, post_processing=PostProcessing.KEEP), handler, state)
            received[user] = len(handler.received)
    assert received == {"alice": 1, "bob": 1}


def test_a_bad_answer_after_login_is_our_error_not_imaplibs(session: ImapSession) -> None:
    from postbridge.mail.common import MailProtocolError

    session.select("INBOX")
    with pytest.raises(MailProtocolError, match="UID SEARCH"):
        session.search("NOT-A-SEARCH-KEY (")
