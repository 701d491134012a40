"""``postbridge lab``: the stand-in mail server, tested with postbridge's own clients, probe and CLI.

One lab runs (in a thread) for the whole module; tests that read mail use a unique subject and never assume a
message number, UID or folder order. The POP3 state machine is also tested alone (transcripts, one byte at a
time, arbitrary bytes).
"""

from __future__ import annotations

import base64
import email
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, ConfigurationError, TrustError
from postbridge.lab import LabServer, LabUser
from postbridge.lab import pop3 as core
from postbridge.mail.imap import ImapSession, append, open_session
from postbridge.mail.pop3 import Pop3Session, open_pop3
from postbridge.mail.probe import run_probe
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection
from postbridge.mail.smtp import SmtpReplyError, open_smtp
from postbridge.trust.truststore import TrustStore
from tests.harness import cli
from tests.servers.pki import TestPki

PASSWORDS = {"alice": "alice-lab", "bob": "bob-lab", "carol": "carol-lab"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    server = LabServer(tmp_path_factory.mktemp("lab"))
    with server.run_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def lab_keystore(lab: LabServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keystore holding the lab root only: the intermediate must come from the server."""
    store = TrustStore(tmp_path_factory.mktemp("keystore") / "keystore")
    store.add(lab.root_pem.read_bytes(), alias="lab-root")
    return store.directory


def channel(
    lab: LabServer, keystore: Path, port: int, protection: Protection, user: str = "bob", password: str | None = None
) -> ChannelSettings:
    return ChannelSettings(
        address=HostPort(lab.host, port),
        protection=protection,
        credentials=Credentials(user, PASSWORDS[user] if password is None else password),
        keystore=keystore,
        timeout=10.0,
    )


def message(subject: str, to: str = "bob@corp.example") -> bytes:
    return (
        f"From: alice@corp.example\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@corp.example>"
        "\r\n\r\n.a line that starts with a dot\r\nhello\r\n"
    ).encode()


def send(lab: LabServer, keystore: Path, subject: str, to: str = "bob") -> None:
    settings = channel(lab, keystore, lab.ports.submission, Protection.STARTTLS_MANDATORY, user="alice")
    with open_smtp(settings) as session:
        assert session.send(message(subject, f"{to}@corp.example"), sender="alice@corp.example",
                            recipients=[f"{to}@corp.example"]) == {}  # fmt: skip


def imap_find(session: ImapSession, folder: str, subject: str) -> list[int]:
    session.select(folder)
    found = session.fetch_many(session.search("ALL"))
    return [uid for uid, raw in found.items() if email.message_from_bytes(raw)["Subject"] == subject]


def pop3_find(session: Pop3Session, subject: str) -> list[tuple[int, str]]:
    """(number, UIDL) of the messages with ``subject``."""
    uids = session.uidl()
    return [
        (number, uids[number])
        for number in uids
        if email.message_from_bytes(session.retrieve(number))["Subject"] == subject
    ]


# -- TLS and login on all six ports ---------------------------------------------------------------------------------

PORTS = [
    ("imap", "imap", Protection.STARTTLS_MANDATORY),
    ("imap", "imaps", Protection.TLS),
    ("pop3", "pop3", Protection.STARTTLS_MANDATORY),
    ("pop3", "pop3s", Protection.TLS),
    ("smtp", "submission", Protection.STARTTLS_MANDATORY),
    ("smtp", "smtps", Protection.TLS),
]


def open_any(kind: str, settings: ChannelSettings) -> ImapSession | Pop3Session | object:
    return {"imap": open_session, "pop3": open_pop3, "smtp": open_smtp}[kind](settings)


@pytest.mark.parametrize(("kind", "port_name", "protection"), PORTS)
def test_login_over_tls_with_only_the_lab_root_trusted(
    lab: LabServer, lab_keystore: Path, kind: str, port_name: str, protection: Protection
) -> None:
    settings = channel(lab, lab_keystore, getattr(lab.ports, port_name), protection)
    with open_any(kind, settings) as session:  # type: ignore[attr-defined]
        assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(("kind", "port_name", "protection"), PORTS)
def test_a_wrong_password_is_refused(
    lab: LabServer, lab_keystore: Path, kind: str, port_name: str, protection: Protection
) -> None:
    settings = channel(lab, lab_keystore, getattr(lab.ports, port_name), protection, password="alice-lab")
    with pytest.raises(AuthenticationError) as caught:
        open_any(kind, settings)
    assert "'bob'" in str(caught.value) and "alice-lab" not in str(caught.value)


@pytest.mark.parametrize(("kind", "port_name", "protection"), PORTS)
def test_another_root_does_not_verify_the_lab(
    lab: LabServer, test_pki: TestPki, tmp_path: Path, kind: str, port_name: str, protection: Protection
) -> None:
    other = TrustStore(tmp_path / "other")
    other.add(test_pki.root_pem.read_bytes(), alias="other-root")
    with pytest.raises(TrustError):
        open_any(kind, channel(lab, other.directory, getattr(lab.ports, port_name), protection))


def test_the_chain_verifies_through_the_intermediate_the_server_sends(lab: LabServer) -> None:
    context = ssl.create_default_context(cafile=str(lab.root_pem))  # the root alone: no intermediate here
    with (
        socket.create_connection((lab.host, lab.ports.imaps), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="mail.corp.example") as tls,
    ):
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    root = x509.load_pem_x509_certificate(lab.root_pem.read_bytes())
    intermediate = x509.load_pem_x509_certificate(lab.intermediate_pem.read_bytes())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_credentials_before_starttls_are_refused_by_every_plain_port(lab: LabServer) -> None:
    for port, greeting_end, command, refusal in [
        (lab.ports.imap, b"\r\n", b"a LOGIN bob bob-lab\r\n", b"a NO"),
        (lab.ports.pop3, b"\r\n", b"USER bob\r\n", b"-ERR [AUTH]"),
        (lab.ports.submission, b"\r\n", b"EHLO me\r\nAUTH PLAIN AGJvYgBib2ItbGFi\r\n", b"530"),
    ]:
        with socket.create_connection((lab.host, port), timeout=10) as sock:
            received = sock.recv(4096)
            assert received.endswith(greeting_end)
            sock.sendall(command)
            answer = b""
            while refusal not in answer:
                chunk = sock.recv(4096)
                assert chunk, f"port {port} closed without refusing: {answer!r}"
                answer += chunk


# -- one message, three protocols -----------------------------------------------------------------------------------


def test_mail_sent_over_smtp_shows_up_in_imap_and_pop3_and_pop3_deletes_it(lab: LabServer, lab_keystore: Path) -> None:
    subject = f"lab {uuid.uuid4().hex}"
    send(lab, lab_keystore, subject)
    imap_settings = channel(lab, lab_keystore, lab.ports.imaps, Protection.TLS)
    with open_session(imap_settings) as session:
        [uid] = imap_find(session, "INBOX", subject)
        body = session.fetch(uid)
    assert body is not None and b"\r\n.a line that starts with a dot\r\n" in body
    assert body.startswith(b"Return-Path: <alice@corp.example>\r\nReceived: from ")
    pop3_settings = channel(lab, lab_keystore, lab.ports.pop3, Protection.STARTTLS_MANDATORY)
    with open_pop3(pop3_settings) as session:
        [(number, unique_id)] = pop3_find(session, subject)
        assert session.retrieve(number) == body  # the same bytes in both protocols
        assert session.size(number) == len(body)
    with open_pop3(pop3_settings) as session:
        assert pop3_find(session, subject) == [(number, unique_id)]  # UIDL stable across sessions
        session.delete(number)
    with open_pop3(pop3_settings) as session:
        assert pop3_find(session, subject) == []
    with open_session(imap_settings) as session:
        assert imap_find(session, "INBOX", subject) == []


def test_pop3_leaves_the_message_when_the_session_ends_without_quit(lab: LabServer, lab_keystore: Path) -> None:
    subject = f"kept {uuid.uuid4().hex}"
    lab.deliver_sync("bob", message(subject))
    settings = channel(lab, lab_keystore, lab.ports.pop3s, Protection.TLS)
    session = open_pop3(settings)
    [(number, _)] = pop3_find(session, subject)
    session.delete(number)
    session.close()  # no QUIT: RFC 1939 says nothing marked is removed
    with open_pop3(settings) as again:
        assert len(pop3_find(again, subject)) == 1


def test_a_second_pop3_session_of_the_same_user_is_refused_while_the_first_holds_the_lock(
    lab: LabServer, lab_keystore: Path
) -> None:
    settings = channel(lab, lab_keystore, lab.ports.pop3s, Protection.TLS, user="alice")
    with open_pop3(settings), pytest.raises(AuthenticationError, match="IN-USE"):
        open_pop3(settings)
    with open_pop3(settings) as session:  # released at QUIT
        session.stat()


def test_smtp_refuses_mail_without_login_and_to_unknown_users(lab: LabServer, lab_keystore: Path) -> None:
    anonymous = ChannelSettings(
        address=HostPort(lab.host, lab.ports.smtps), protection=Protection.TLS, auth=AuthMethod.NONE,
        keystore=lab_keystore, timeout=10.0,
    )  # fmt: skip
    with open_smtp(anonymous) as session, pytest.raises(SmtpReplyError) as caught:
        session.send(message("x"), sender="alice@corp.example", recipients=["bob@corp.example"])
    assert caught.value.code == 530
    alice = channel(lab, lab_keystore, lab.ports.smtps, Protection.TLS, user="alice")
    with open_smtp(alice) as session, pytest.raises(SmtpReplyError) as unknown:
        session.send(message("x"), sender="alice@corp.example", recipients=["mallory@corp.example"])
    assert unknown.value.code == 550 and "bob@corp.example" in str(unknown.value)


def test_imap_folders_can_be_created_and_messages_moved(lab: LabServer, lab_keystore: Path) -> None:
    folder = f"F{uuid.uuid4().hex[:8]}"
    subject = f"move {uuid.uuid4().hex}"
    with open_session(channel(lab, lab_keystore, lab.ports.imap, Protection.STARTTLS_MANDATORY)) as session:
        session.create_folder(folder)
        session.create_folder(folder)  # ALREADYEXISTS is fine
        assert folder in session.list_folders()
        append(session, "INBOX", message(subject))
        [uid] = imap_find(session, "INBOX", subject)
        session.move(uid, folder)
        assert imap_find(session, "INBOX", subject) == []
        assert len(imap_find(session, folder, subject)) == 1


# -- the connection test and the CLI against the lab ----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "port_name", "protection"), PORTS)
def test_run_probe_passes_every_step(
    lab: LabServer, lab_keystore: Path, kind: str, port_name: str, protection: Protection
) -> None:
    settings = channel(lab, lab_keystore, getattr(lab.ports, port_name), protection, user="alice")
    extra: dict[str, object] = {"check_auth": True}
    if kind == "imap":
        extra["list_folders"] = True
    if kind == "smtp":
        extra.update(sender="alice@corp.example", recipients=("bob@corp.example",))
    report = run_probe(kind, settings, **extra)  # type: ignore[arg-type]
    assert report.ok, [(step.name, step.cause) for step in report.steps if not step.ok]
    names = [step.name for step in report.steps]
    assert "login" in names and "certificate chain" in names
    assert report.chain is not None
    chain = [(c.role, c.sent) for c in report.chain.certificates]
    assert chain == [("server", True), ("intermediate", True), ("root", False)]  # the root comes from the keystore


def test_cli_send_and_poll_with_archive(lab: LabServer, lab_keystore: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "keystore").add(lab.root_pem.read_bytes(), alias="lab-root")
    subject = f"cli lab {uuid.uuid4().hex}"
    sent = cli(
        home, "mail", "send", "--from", "alice@corp.example", "--to", "carol@corp.example", "--subject", subject,
        "--text", "hello carol", "--address", f"{lab.host}:{lab.ports.submission}",
        "--protection", "starttls-mandatory", "--user", "alice", "--password-stdin", stdin="alice-lab\n",
    )  # fmt: skip
    assert "sent to carol@corp.example" in sent.stdout
    polled = cli(
        home, "mail", "poll", "--address", f"{lab.host}:{lab.ports.imap}", "--protection", "starttls-mandatory",
        "--user", "carol", "--password-stdin", "--post-processing", "archive", "--archive-folder", "Archive",
        "--json", stdin="carol-lab\n",
    )  # fmt: skip
    assert subject in [json.loads(line)["subject"] for line in polled.stdout.splitlines()]
    assert "carol-lab" not in polled.stdout + polled.stderr
    with open_session(channel(lab, lab_keystore, lab.ports.imaps, Protection.TLS, user="carol")) as session:
        assert imap_find(session, "INBOX", subject) == []
        assert len(imap_find(session, "Archive", subject)) == 1


def test_cli_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "lab", "--host", "0.0.0.0", "--folder", str(tmp_path / "lab"), check=False)
    assert result.returncode == 2
    assert "loopback only" in result.stderr and "'0.0.0.0'" in result.stderr
    assert not (tmp_path / "lab").exists()  # nothing was made or bound


# -- the server object ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "mail.corp.example", ""])
def test_only_loopback_addresses_are_accepted(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigurationError, match="loopback only"):
        LabServer(tmp_path, host=host)


def test_lab_json_describes_the_running_lab_and_goes_with_it(lab: LabServer) -> None:
    data = json.loads(lab.lab_json.read_text())
    assert data["ports"] == lab.ports.as_dict() and len(set(data["ports"].values())) == 6
    assert {user["name"]: user["password"] for user in data["users"]} == PASSWORDS
    assert Path(data["root_pem"]) == lab.root_pem and Path(data["intermediate_pem"]) == lab.intermediate_pem
    assert lab.lab_json.stat().st_mode & 0o077 == 0  # it holds the lab passwords
    assert lab.startup_seconds < 5


def test_base_port_gives_six_consecutive_ports_and_a_taken_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        taken_lab = LabServer(tmp_path / "taken", base_port=taken)
        with pytest.raises(ConfigurationError, match=f"port {taken}: the port is in use"), taken_lab.run_in_thread():
            pass
    for base in (24311, 31411, 42511):  # the first free range of six wins
        server = LabServer(tmp_path / str(base), base_port=base, users=[LabUser("dave", "dave-lab", "dave@x.test")])
        try:
            with server.run_in_thread() as running:
                assert running.ports.as_dict() == dict(zip(
                    ("imap", "imaps", "pop3", "pop3s", "submission", "smtps"), range(base, base + 6), strict=True
                ))  # fmt: skip
                assert running.lab_json.exists()
            assert not server.lab_json.exists() and server.root_pem.exists()
            return
        except ConfigurationError as exc:
            assert "in use" in str(exc)
    pytest.fail("no free range of six ports found")


# -- the POP3 state machine alone -----------------------------------------------------------------------------------

DROP = [core.MaildropMessage(101, "7.101", b"Subject: one\r\n\r\n.dot\r\nbody\r\n"),
        core.MaildropMessage(102, "7.102", b"Subject: two\r\n\r\nline 1\r\nline 2\r\n")]  # fmt: skip


def sent(commands: list[core.Command]) -> bytes:
    return b"".join(command.data for command in commands if isinstance(command, core.SendData))


def logged_in() -> core.Pop3Server:
    server = core.Pop3Server(secure=True, tls_available=False)
    server.start()
    assert server.receive_data(b"USER bob\r\nPASS bob-lab\r\n") == [
        core.SendData(b"+OK send the password of bob\r\n"),
        core.CheckPassword("bob", "bob-lab"),
    ]
    server.login_accepted(DROP)
    return server


def test_pop3_transcript_of_a_session() -> None:
    server = logged_in()
    assert sent(server.receive_data(b"STAT\r\nUIDL\r\nLIST 2\r\n")) == (
        b"+OK 2 60\r\n+OK unique-id listing follows\r\n1 7.101\r\n2 7.102\r\n.\r\n+OK 2 32\r\n"
    )
    assert sent(server.receive_data(b"RETR 1\r\n")) == b"+OK 28 octets\r\nSubject: one\r\n\r\n..dot\r\nbody\r\n.\r\n"
    assert (
        sent(server.receive_data(b"TOP 2 1\r\n"))
        == b"+OK top of message follows\r\nSubject: two\r\n\r\nline 1\r\n.\r\n"
    )
    assert sent(server.receive_data(b"DELE 1\r\nRETR 1\r\nRSET\r\nDELE 2\r\n")).count(b"-ERR") == 1
    assert server.receive_data(b"QUIT\r\n") == [core.DeleteMessages((102,))]
    assert server.deletions_applied()[-1] == core.CloseConnection()


def test_pop3_stls_discards_what_was_sent_before_the_handshake_and_only_then_allows_credentials() -> None:
    server = core.Pop3Server(secure=False, tls_available=True)
    server.start()
    assert sent(server.receive_data(b"USER bob\r\n")).startswith(b"-ERR [AUTH]")
    commands = server.receive_data(b"STLS\r\nUSER injected\r\nPASS injected\r\n")
    assert commands == [core.SendData(b"+OK begin TLS negotiation\r\n"), core.StartTls()]
    assert server.tls_started() == []
    encoded = base64.b64encode(b"\0bob\0bob-lab")
    assert server.receive_data(b"AUTH PLAIN\r\n") == [core.SendData(b"+ \r\n")]
    assert server.receive_data(encoded + b"\r\n") == [core.CheckPassword("bob", "bob-lab")]
    assert sent(server.login_refused("[AUTH] invalid user name or password")).startswith(b"-ERR [AUTH]")


def test_pop3_one_byte_at_a_time_gives_the_same_answers() -> None:
    script = b"CAPA\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 2\r\nTOP 1 0\r\nNOOP\r\nDELE 2\r\nSTAT\r\n"
    whole = sent(logged_in().receive_data(script))
    server = logged_in()
    assert sent([command for byte in script for command in server.receive_data(bytes([byte]))]) == whole


@given(st.binary(max_size=2000))
def test_pop3_any_bytes_get_replies_not_exceptions(data: bytes) -> None:
    for server in (core.Pop3Server(secure=False, tls_available=True), logged_in()):
        for command in server.receive_data(data):
            assert isinstance(command, core.SendData | core.StartTls | core.CheckPassword | core.CloseConnection
                              | core.DeleteMessages)  # fmt: skip
