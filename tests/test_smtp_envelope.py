"""The envelope check (:meth:`SmtpSession.check_envelope`): MAIL FROM, RCPT TO, RSET, and never DATA.

Against the real Postfix (delivering into the session's Dovecot): a sender and a local recipient accepted after a
login, relaying refused without a login, an unknown local user refused, a mixed list, a refused sender that stops
the check, an SMTPUTF8 address, and the proof that no mail was sent (Postfix's own command count for the
connection, its log, its queue and the mailboxes). Against scripted servers: the exact command transcript, line
breaks refused before anything is sent, 421 and dropped connections. And :func:`envelope_hint` for the refusals
it explains.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError, NetworkError, PostbridgeError
from postbridge.mail.common import MailProtocolError
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection
from postbridge.mail.smtp import EnvelopeReply, SmtpReplyError, build_message, envelope_hint, open_smtp
from tests.hostile.servers import Close, Expect, FakeServer, Send, Step, Transcript
from tests.servers.dovecot import Dovecot
from tests.servers.postfix import Postfix

RELAY_HINT = "use --check-auth with the channel's credentials, or a recipient in the server's own domain"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


@pytest.fixture(scope="module")
def postfix(dovecot: Dovecot) -> Iterator[Postfix]:
    """A real Postfix in front of the session's Dovecot: alice and bob at corp.example, nothing else."""
    with Postfix(dovecot) as server:
        yield server


def submission(postfix: Postfix, keystore: Path, **extra: object) -> ChannelSettings:
    """The submission port after STARTTLS, logged in as alice (unless ``auth`` says otherwise)."""
    values: dict[str, object] = {
        "address": HostPort(postfix.host, postfix.submission_port),
        "protection": Protection.STARTTLS_MANDATORY,
        "credentials": Credentials("alice", "secret"),
        "keystore": keystore,
        "tls_server_name": postfix.hostname,
        "timeout": 10.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def mx(postfix: Postfix, keystore: Path) -> ChannelSettings:
    """The MX-style port: STARTTLS offered, no login."""
    return ChannelSettings(
        address=HostPort(postfix.host, postfix.smtp_port),
        protection=Protection.STARTTLS_OPTIONAL,
        auth=AuthMethod.NONE,
        keystore=keystore,
        tls_server_name=postfix.hostname,
        timeout=10.0,
    )


def codes(replies: list[EnvelopeReply]) -> list[tuple[str, str, int, bool]]:
    return [(reply.role, reply.address, reply.code, reply.accepted) for reply in replies]


def connection_summary(postfix: Postfix, since: int, service: str) -> str:
    """Postfix's closing line for the one ``service`` connection after log offset ``since``: its command counts."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [
            line
            for line in postfix.log_text[since:].splitlines()
            if f"{service}/smtpd" in line and "disconnect from" in line
        ]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.02)
    raise TimeoutError(f"Postfix logged no end of the {service} connection:\n{postfix.log_text[since:]}")


def queued_files(postfix: Postfix, settle: float = 2.0) -> list[Path]:
    """The files in Postfix's queues, once empty or after ``settle`` s (cleanup drops an aborted file on its own)."""
    deadline = time.monotonic() + settle
    while True:
        found = [path for queue in QUEUES for path in (postfix.queue_dir / queue).rglob("*") if path.is_file()]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def delivered_with(dovecot: Dovecot, user: str, marker: str) -> list[Path]:
    """The files in ``user``'s INBOX that contain ``marker`` (its envelope sender ends up in Return-Path)."""
    found = []
    for path in [*dovecot.maildir(user).glob("new/*"), *dovecot.maildir(user).glob("cur/*")]:
        try:
            if marker.encode() in path.read_bytes():
                found.append(path)
        except FileNotFoundError:  # moved from new/ to cur/ by a reader meanwhile
            continue
    return found


# -- the real Postfix ------------------------------------------------------------------------------------------


def test_sender_and_local_recipient_are_accepted_after_login(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(submission(postfix, keystore)) as session:
        replies = session.check_envelope("alice@corp.example", ["alice@corp.example"])
        assert replies == [
            EnvelopeReply("alice@corp.example", "sender", 250, "2.1.0 Ok"),
            EnvelopeReply("alice@corp.example", "recipient", 250, "2.1.5 Ok"),
        ]
        assert all(reply.accepted and envelope_hint(reply) == "" for reply in replies)
        # the RSET closed the transaction: a second check in the same session is no "nested MAIL command"
        again = session.check_envelope("alice@corp.example", ["bob@corp.example"])
        assert codes(again) == [
            ("sender", "alice@corp.example", 250, True),
            ("recipient", "bob@corp.example", 250, True),
        ]


def test_unauthenticated_relay_is_refused_with_the_relay_hint(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(mx(postfix, keystore)) as session:
        sender, recipient = session.check_envelope("someone@elsewhere.example", ["x@elsewhere.example"])
    assert sender.accepted and sender.code == 250
    assert (recipient.code, recipient.accepted) == (554, False)
    assert recipient.text == "5.7.1 <x@elsewhere.example>: Relay access denied"
    assert RELAY_HINT in envelope_hint(recipient)


def test_unauthenticated_submission_is_refused_with_the_login_hint(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(submission(postfix, keystore, auth=AuthMethod.NONE, credentials=None)) as session:
        sender, recipient = session.check_envelope("alice@corp.example", ["alice@corp.example"])
    assert sender.accepted  # Postfix delays the client restriction until RCPT (smtpd_delay_reject)
    assert recipient.code == 554 and "Client host rejected: Access denied" in recipient.text
    assert "--check-auth" in envelope_hint(recipient) and "login" in envelope_hint(recipient)


def test_unknown_local_user_is_refused_with_550(postfix: Postfix, keystore: Path) -> None:
    nobody = f"nobody-{uuid.uuid4().hex[:8]}@corp.example"
    with open_smtp(submission(postfix, keystore)) as session:
        _, recipient = session.check_envelope("alice@corp.example", [nobody])
    assert (recipient.address, recipient.code, recipient.accepted) == (nobody, 550, False)
    assert recipient.text.startswith("5.1.1 ") and "User unknown" in recipient.text
    assert envelope_hint(recipient) == "no such mailbox at the server: check the address"


def test_a_mixed_list_reports_each_recipient_in_order(postfix: Postfix, keystore: Path) -> None:
    recipients = ["bob@corp.example", "carol@corp.example", "x@elsewhere.example", "alice@corp.example"]
    with open_smtp(submission(postfix, keystore)) as session:
        replies = session.check_envelope("alice@corp.example", recipients)
    assert codes(replies) == [
        ("sender", "alice@corp.example", 250, True),
        ("recipient", "bob@corp.example", 250, True),
        ("recipient", "carol@corp.example", 550, False),
        ("recipient", "x@elsewhere.example", 554, False),
        ("recipient", "alice@corp.example", 250, True),
    ]
    assert [envelope_hint(reply).split(":")[0] for reply in replies[2:4]] == [
        "no such mailbox at the server",
        "the server relays only for authenticated users",
    ]


def test_a_refused_sender_stops_the_check_before_any_recipient(postfix: Postfix, keystore: Path) -> None:
    since = len(postfix.log_text)
    with open_smtp(mx(postfix, keystore)) as session:
        replies = session.check_envelope("not an@address", ["alice@corp.example", "bob@corp.example"])
    (sender,) = replies
    assert (sender.role, sender.code, sender.accepted) == ("sender", 501, False)
    assert sender.text == "5.1.7 Bad sender address syntax"
    assert envelope_hint(sender) == "the server refuses this sender: use an address the login may send as"
    summary = connection_summary(postfix, since, "postfix/smtp")
    assert " mail=0/1 rset=1 " in summary and "rcpt=" not in summary, summary


def test_a_non_ascii_address_goes_with_smtputf8(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(submission(postfix, keystore)) as session:
        sender, recipient = session.check_envelope("alice@corp.example", ["jürgen@corp.example"])
    assert sender.accepted  # MAIL FROM:<alice@corp.example> SMTPUTF8 BODY=8BITMIME
    assert recipient.code == 550 and "<jürgen@corp.example>: Recipient address rejected: User unknown" in recipient.text


def test_the_check_sends_no_mail(postfix: Postfix, dovecot: Dovecot, keystore: Path) -> None:
    sender = f"envelope-{uuid.uuid4().hex}@corp.example"
    since = len(postfix.log_text)
    with open_smtp(submission(postfix, keystore)) as session:
        replies = session.check_envelope(sender, ["alice@corp.example", "bob@corp.example"])
    assert all(reply.accepted for reply in replies)
    summary = connection_summary(postfix, since, "postfix/submission")
    assert " mail=1 rcpt=2 rset=1 quit=1 " in summary and "data=" not in summary, summary
    log = postfix.log_text[since:]
    assert "message-id=" not in log and f"from=<{sender}>, size=" not in log  # no cleanup, no queue manager
    assert queued_files(postfix) == []
    assert delivered_with(dovecot, "alice", sender) == [] and delivered_with(dovecot, "bob", sender) == []

    # the same evidence shows a real send, so its absence above means something
    since = len(postfix.log_text)
    subject = f"control {uuid.uuid4().hex}"
    with open_smtp(submission(postfix, keystore)) as session:
        session.send_mail(build_message(sender=sender, to=["alice@corp.example"], subject=subject, text="sent"))
    postfix.wait_for_message("alice", subject)
    assert "data=1" in connection_summary(postfix, since, "postfix/submission")
    assert "message-id=" in postfix.log_text[since:] and delivered_with(dovecot, "alice", sender)


# -- scripted servers ----------------------------------------------------------------------------------------------


def greeted() -> list[Step]:
    return [
        Send(b"220 fake.example ESMTP\r\n"),
        Expect(b"EHLO"),
        Send(b"250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
    ]


def answer_quit(line: bytes) -> bytes | None:
    return b"221 2.0.0 bye\r\n" if line.upper().startswith(b"QUIT") else None


def scripted(server: FakeServer) -> ChannelSettings:
    return ChannelSettings(
        address=HostPort(server.host, server.port), protection=Protection.OFF, auth=AuthMethod.NONE, timeout=3.0
    )


def finished(server: FakeServer) -> Transcript:
    (transcript,) = server.wait()
    assert transcript.script_error == ""
    return transcript


def test_the_transcript_is_mail_rcpt_rset_and_never_data() -> None:
    script = [
        *greeted(),
        Expect(b"MAIL FROM:<alice@corp.example>"),
        Send(b"250 2.1.0 ok\r\n"),
        Expect(b"RCPT TO:<bob@corp.example>"),
        Send(b"250 2.1.5 ok\r\n"),
        Expect(b"RCPT TO:<carol@corp.example>"),
        Send(b"450 4.2.0 <carol@corp.example>: Recipient address rejected: greylisted\r\n"),
        Expect(b"RSET"),
        Send(b"250 2.0.0 ok\r\n"),
        # a refused sender: no RCPT, but still RSET
        Expect(b"MAIL FROM:<>"),
        Send(b"553 5.7.1 <>: Sender address rejected: not owned by user alice\r\n"),
        Expect(b"RSET"),
        Send(b"250 2.0.0 ok\r\n"),
    ]
    with FakeServer(script, after_script=answer_quit) as server:
        with open_smtp(scripted(server), local_hostname="client.example") as session:
            first = session.check_envelope("alice@corp.example", ["bob@corp.example", "carol@corp.example"])
            second = session.check_envelope("", ["bob@corp.example"])
        transcript = finished(server)
    assert transcript.cleartext_commands() == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"RSET", b"MAIL", b"RSET", b"QUIT"]
    assert [(reply.code, reply.accepted) for reply in first] == [(250, True), (250, True), (450, False)]
    assert envelope_hint(first[2]) == "a temporary refusal: send again later"
    assert codes(second) == [("sender", "", 553, False)]
    assert "refuses this sender" in envelope_hint(second[0])


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        ("alice@corp.example\r\nRCPT TO:<x@elsewhere.example>", ["bob@corp.example"]),
        ("alice@corp.example", ["bob@corp.example>\r\nDATA"]),
        ("alice@corp.example", ["bob@corp.example", "carol@corp.example\n"]),
        ("alice@corp.example\r", ["bob@corp.example"]),
        ("alice@corp.example", []),
        ("alice@corp.example", ["bob@corp.example", ""]),
        ("alice@corp.example", "bob@corp.example"),
    ],
)
def test_line_breaks_and_empty_recipients_are_refused_before_anything_is_sent(
    sender: str, recipients: list[str]
) -> None:
    script = [*greeted(), Expect(b"MAIL FROM:<a@corp.example>"), Send(b"250 ok\r\n"),
              Expect(b"RCPT TO:<b@corp.example>"), Send(b"250 ok\r\n"),
              Expect(b"RSET"), Send(b"250 ok\r\n")]  # fmt: skip
    with FakeServer(script, after_script=answer_quit) as server:
        with open_smtp(scripted(server), local_hostname="client.example") as session:
            with pytest.raises(ConfigurationError):
                session.check_envelope(sender, recipients)
            assert codes(session.check_envelope("a@corp.example", ["b@corp.example"]))[1][3]  # the session goes on
        transcript = finished(server)
    assert transcript.cleartext_commands() == [b"EHLO", b"MAIL", b"RCPT", b"RSET", b"QUIT"]


def test_421_ends_the_check_and_the_session() -> None:
    script = [*greeted(), Expect(b"MAIL"), Send(b"250 ok\r\n"), Expect(b"RCPT"),
              Send(b"421 4.7.0 fake.example closing: too many errors\r\n")]  # fmt: skip
    with FakeServer(script) as server:
        session = open_smtp(scripted(server), local_hostname="client.example")
        with pytest.raises(SmtpReplyError, match="closed the session at RCPT TO: 421") as caught:
            session.check_envelope("a@corp.example", ["b@corp.example"])
        assert isinstance(caught.value, MailProtocolError) and caught.value.code == 421
        with pytest.raises(PostbridgeError, match="not connected"):
            session.check_envelope("a@corp.example", ["b@corp.example"])
        transcript = finished(server)
    assert transcript.cleartext_commands() == [b"EHLO", b"MAIL", b"RCPT"]  # no RSET on a closed session


def test_a_connection_dropped_before_the_replies_are_in_is_a_network_error() -> None:
    with FakeServer([*greeted(), Expect(b"MAIL"), Close()]) as server:
        session = open_smtp(scripted(server), local_hostname="client.example")
        with pytest.raises(NetworkError, match="after MAIL FROM") as caught:
            session.check_envelope("a@corp.example", ["b@corp.example"])
        finished(server)
    assert "no mail was sent" in str(caught.value)


def test_a_server_that_hangs_up_instead_of_answering_rset_leaves_the_replies_standing() -> None:
    script = [*greeted(), Expect(b"MAIL"), Send(b"250 ok\r\n"), Expect(b"RCPT"),
              Send(b"550 5.1.1 no such user\r\n"), Expect(b"RSET"), Close()]  # fmt: skip
    with FakeServer(script) as server:
        session = open_smtp(scripted(server), local_hostname="client.example")
        replies = session.check_envelope("a@corp.example", ["b@corp.example"])
        transcript = finished(server)
    assert codes(replies) == [("sender", "a@corp.example", 250, True), ("recipient", "b@corp.example", 550, False)]
    assert transcript.completed  # the RSET was sent
    with pytest.raises(PostbridgeError, match="not connected"):
        session.check_envelope("a@corp.example", ["b@corp.example"])


def test_non_ascii_addresses_need_smtputf8() -> None:
    with FakeServer(greeted(), after_script=answer_quit) as server:
        with (
            open_smtp(scripted(server), local_hostname="client.example") as session,
            pytest.raises(MailProtocolError, match="SMTPUTF8") as caught,
        ):
            session.check_envelope("a@corp.example", ["jürgen@corp.example"])
        transcript = finished(server)
    assert "ASCII" in caught.value.hint
    assert transcript.cleartext_commands() == [b"EHLO", b"QUIT"]


# -- hints -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "code", "text", "words"),
    [
        ("recipient", 554, "5.7.1 <x@elsewhere.example>: Relay access denied", "relays only for authenticated"),
        ("recipient", 550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain", "own domain"),
        ("sender", 530, "5.7.0 Authentication required", "after a login"),
        ("sender", 530, "5.7.0 Must issue a STARTTLS command first", "starttls-mandatory"),
        ("sender", 553, "5.7.1 <bob@corp.example>: Sender address rejected: not owned by user alice", "this sender"),
        ("sender", 501, "5.1.7 Bad sender address syntax", "this sender"),
        ("recipient", 550, "5.1.1 <carol@corp.example>: Recipient address rejected: User unknown", "no such mailbox"),
        ("recipient", 452, "4.5.3 Error: too many recipients", "too many recipients"),
        ("recipient", 452, "4.2.2 Mailbox full", "over quota"),
        ("recipient", 451, "4.3.0 try again", "temporary"),
    ],
)
def test_envelope_hint_explains_the_refusal(role: str, code: int, text: str, words: str) -> None:
    assert words in envelope_hint(EnvelopeReply("x@corp.example", role, code, text))


def test_envelope_hint_is_empty_for_an_accepted_address() -> None:
    reply = EnvelopeReply("x@corp.example", "recipient", 250, "2.1.5 Ok relay")
    assert reply.accepted and envelope_hint(reply) == ""
    assert not EnvelopeReply("x@corp.example", "recipient", 354, "go ahead").accepted
