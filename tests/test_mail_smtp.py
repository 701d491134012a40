"""The SMTP client against a real Postfix (submission + STARTTLS, SMTPS) delivering into the real Dovecot,
message composition, small hostile servers, and the way through hub + connector."""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, ConfigurationError, NetworkError, PostbridgeTimeout, TrustError
from postbridge.mail.common import MailProtocolError, TlsDowngrade
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Credentials, Protection, Proxy
from postbridge.mail.smtp import Attachment, SmtpReplyError, build_message, open_smtp
from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.servers import LOOPBACK
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki
from tests.servers.postfix import Postfix

WRONG_PASSWORD = "hunter2-Wr0ng"


@pytest.fixture(scope="module")
def postfix(dovecot: Dovecot) -> Iterator[Postfix]:
    """A real Postfix delivering into the session's Dovecot (LMTP), so mail sent here is read back from it."""
    with Postfix(dovecot) as server:
        yield server


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """Everything postbridge logged during the test (DEBUG and up), to assert no secret is in it."""
    caplog.set_level(logging.DEBUG, logger="postbridge")
    return lambda: "\n".join(record.getMessage() for record in caplog.records)


def settings(
    postfix: Postfix, store: Path | None, port: int, protection: Protection, **extra: object
) -> ChannelSettings:
    values: dict[str, object] = {
        "address": HostPort(postfix.host, port),
        "protection": protection,
        "credentials": Credentials("alice", "secret"),
        "keystore": store,
        "tls_server_name": "mail.corp.example",
        "timeout": 10.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def submission(postfix: Postfix, store: Path, **extra: object) -> ChannelSettings:
    return settings(postfix, store, postfix.submission_port, Protection.STARTTLS_MANDATORY, **extra)


def plain_message(subject: str, to: str = "bob@corp.example") -> bytes:
    # bare LF line ends and a line with a lone dot: both must arrive as proper CRLF lines, the dot unharmed
    return (
        f"From: alice@corp.example\nTo: {to}\nSubject: {subject}\nMessage-ID: <{uuid.uuid4().hex}@corp.example>\n\n"
        "first line\n.\nafter the dot\n"
    ).encode()


def wait_for_message_id(dovecot: Dovecot, user: str, message_id: str, timeout: float = 10.0) -> Path:
    """The file of the message with ``message_id`` in ``user``'s INBOX (for subjects stored encoded)."""
    wanted = f"message-id: {message_id}".lower().encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # INBOX only: new/ and cur/ (other tests' folders are dot-directories beside them)
        for path in sorted([*dovecot.maildir(user).glob("new/*"), *dovecot.maildir(user).glob("cur/*")]):
            try:
                if wanted in path.read_bytes().lower():
                    return path
            except FileNotFoundError:  # moved from new/ to cur/ by a reader meanwhile
                continue
        time.sleep(0.02)
    raise TimeoutError(f"no message {message_id} arrived for {user} within {timeout:.0f} s")


def read_back(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.parametrize(
    ("protection", "port_name"), [(Protection.STARTTLS_MANDATORY, "submission_port"), (Protection.TLS, "smtps_port")]
)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN])
def test_sends_mail_that_arrives(
    postfix: Postfix,
    keystore: Path,
    protection: Protection,
    port_name: str,
    auth: AuthMethod,
    logged: Callable[[], str],
) -> None:
    subject = f"smtp {protection} {auth} {uuid.uuid4().hex}"
    channel = settings(postfix, keystore, getattr(postfix, port_name), protection, auth=auth)
    with open_smtp(channel, local_hostname="client.corp.example") as session:
        assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
        assert session.send(plain_message(subject), sender="alice@corp.example", recipients=["bob@corp.example"]) == {}
    delivered = postfix.wait_for_message("bob", subject).read_bytes()
    assert b"from client.corp.example" in delivered and b"with ESMTPSA" in delivered
    assert b"\n\nfirst line\n.\nafter the dot\n" in delivered  # Dovecot stores LF; the lone dot survived
    assert f"sasl_method={auth.value.upper()}, sasl_username=alice" in postfix.log_text
    assert "secret" not in logged() and base64.b64encode(b"secret").decode() not in logged()


def test_ehlo_is_sent_again_after_starttls(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(submission(postfix, keystore, auth=AuthMethod.NONE)) as session:
        assert "starttls" in session.features_before_tls and "auth" not in session.features_before_tls
        assert "starttls" not in session.features and "auth" in session.features  # the post-TLS answer


def test_composed_message_round_trip(postfix: Postfix, dovecot: Dovecot, keystore: Path) -> None:
    subject = f"Grüße aus der Zentrale, ein Betreff, der länger ist als eine Zeile {uuid.uuid4().hex}"
    message_id = f"<{uuid.uuid4().hex}@corp.example>"
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    mail = build_message(
        sender="Alice Example <alice@corp.example>",
        to=["Bob <bob@corp.example>"],
        cc=["alice@corp.example"],
        subject=subject,
        text="Hallo Bob,\nschöne Grüße.\n.\n",
        html="<p>Hallo Bob, <b>schöne</b> Grüße.</p>",
        attachments=[
            Attachment("report.pdf", pdf, "application/pdf"),
            Attachment("notes.txt", b"a\nb\n", "text/plain"),
        ],
        headers={"X-Postbridge-Flow": "orders", "Reply-To": "team@corp.example", "Message-ID": message_id},
    )
    assert mail.sender == "alice@corp.example"
    assert mail.recipients == ("bob@corp.example", "alice@corp.example")
    with open_smtp(submission(postfix, keystore)) as session:
        assert session.send_mail(mail) == {}
    assert b"Subject: =?utf-8?" in mail.message.as_bytes()  # RFC 2047 encoded, folded, 7-bit
    for user in ("bob", "alice"):
        received = read_back(wait_for_message_id(dovecot, user, message_id))
        assert received["Subject"] == subject
        assert received["To"] == "Bob <bob@corp.example>" and received["Cc"] == "alice@corp.example"
        assert received["X-Postbridge-Flow"] == "orders" and received["Reply-To"] == "team@corp.example"
        assert received.get_content_type() == "multipart/mixed"
        alternative, *attached = received.iter_parts()
        assert alternative.get_content_type() == "multipart/alternative"
        text, html = alternative.iter_parts()
        assert text.get_content() == "Hallo Bob,\nschöne Grüße.\n.\n"
        assert html.get_content_type() == "text/html" and "<b>schöne</b>" in html.get_content()
        assert [(part.get_filename(), part.get_content_type()) for part in attached] == [
            ("report.pdf", "application/pdf"), ("notes.txt", "text/plain")
        ]  # fmt: skip
        assert attached[0].get_content() == pdf


def test_bcc_is_in_the_envelope_only(postfix: Postfix, keystore: Path) -> None:
    subject = f"bcc {uuid.uuid4().hex}"
    mail = build_message(sender="alice@corp.example", to=["bob@corp.example"], bcc=["alice@corp.example"],
                         subject=subject, text="hidden copy")  # fmt: skip
    assert "Bcc" not in mail.message and mail.recipients == ("bob@corp.example", "alice@corp.example")
    with open_smtp(submission(postfix, keystore)) as session:
        session.send_mail(mail)
    for user in ("bob", "alice"):
        received = read_back(postfix.wait_for_message(user, subject))
        assert received["Bcc"] is None and received["To"] == "bob@corp.example" and received["Cc"] is None


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "hello\r\nBcc: victim@elsewhere.example"},
        {"subject": "hello\nX-Injected: yes"},
        {"headers": {"X-Flow": "a\r\nBcc: victim@elsewhere.example"}},
        {"headers": {"X-Flow\r\nBcc": "victim@elsewhere.example"}},
        {"headers": {"X-Bad:Name": "x"}},
        {"headers": {"Bcc": "victim@elsewhere.example"}},
        {"to": ["bob@corp.example\r\nBcc: victim@elsewhere.example"]},
        {"to": ["bob@corp.example, victim@elsewhere.example"]},
        {"to": "bob@corp.example"},
        {"to": []},
        {"attachments": [Attachment("a\r\nb.txt", b"x", "text/plain")]},
        {"attachments": [Attachment("a.txt", b"x", "text/plain\r\nX-Injected: yes")]},
        {"charset": "no-such-charset"},
        {"charset": "ascii", "text": "Grüße"},
    ],
)
def test_build_message_refuses_injection_and_bad_fields(fields: dict[str, object]) -> None:
    values: dict[str, object] = {"sender": "alice@corp.example", "to": ["bob@corp.example"], "text": "x"}
    values.update(fields)
    with pytest.raises(ConfigurationError):
        build_message(**values)  # type: ignore[arg-type]


def test_envelope_injection_is_refused_before_anything_is_sent(postfix: Postfix, keystore: Path) -> None:
    with open_smtp(submission(postfix, keystore)) as session:
        for sender, recipients in (
            ("alice@corp.example\r\nRCPT TO:<x@elsewhere.example>", ["bob@corp.example"]),
            ("alice@corp.example", ["bob@corp.example>\r\nDATA"]),
            ("alice@corp.example", []),
        ):
            with pytest.raises(ConfigurationError):
                session.send(b"Subject: x\r\n\r\nx\r\n", sender=sender, recipients=recipients)


def test_relay_refused_is_a_reply_error_and_the_session_goes_on(postfix: Postfix, keystore: Path) -> None:
    subject = f"after refusal {uuid.uuid4().hex}"
    with open_smtp(submission(postfix, keystore)) as session:
        with pytest.raises(SmtpReplyError) as caught:
            session.send(plain_message("never"), sender="alice@corp.example", recipients=["x@elsewhere.example"])
        assert caught.value.code == 554 and "Relay access denied" in caught.value.reply
        assert caught.value.refused["x@elsewhere.example"][0] == 554
        assert "relay" in caught.value.hint
        # one good, one refused recipient: sent, and the refusal reported
        refused = session.send(plain_message(subject), sender="alice@corp.example",
                               recipients=["bob@corp.example", "carol@corp.example"])  # fmt: skip
        assert list(refused) == ["carol@corp.example"] and refused["carol@corp.example"][0] == 550
    postfix.wait_for_message("bob", subject)


def test_one_connection_carries_twenty_messages(postfix: Postfix, keystore: Path) -> None:
    tag = uuid.uuid4().hex
    since = len(postfix.log_text)
    with open_smtp(submission(postfix, keystore)) as session:
        for number in range(20):
            session.send(plain_message(f"reuse {tag} {number}"), sender="alice@corp.example",
                         recipients=["bob@corp.example"])  # fmt: skip
    for number in range(20):
        postfix.wait_for_message("bob", f"reuse {tag} {number}")
    # Postfix sums up each connection when it ends: one connection, twenty transactions
    deadline = time.monotonic() + 5
    while "disconnect from" not in postfix.log_text[since:] and time.monotonic() < deadline:
        time.sleep(0.02)
    summaries = [
        line
        for line in postfix.log_text[since:].splitlines()
        if "submission/smtpd" in line and "disconnect from" in line
    ]
    assert len(summaries) == 1 and " mail=20 rcpt=20 data=20 " in summaries[0], summaries


def test_wrong_password_is_an_authentication_error_without_the_password(
    postfix: Postfix, keystore: Path, logged: Callable[[], str]
) -> None:
    with pytest.raises(AuthenticationError, match="refused the login of 'alice'") as caught:
        open_smtp(submission(postfix, keystore, credentials=Credentials("alice", WRONG_PASSWORD)))
    assert "535" in str(caught.value)
    everything = f"{caught.value} {caught.value.hint} {caught.value!r} {logged()}"
    assert WRONG_PASSWORD not in everything and base64.b64encode(WRONG_PASSWORD.encode()).decode() not in everything
    plain = base64.b64encode(f"\0alice\0{WRONG_PASSWORD}".encode()).decode()
    assert plain not in everything


def test_no_credentials_in_clear_text_and_no_auth_without_tls(postfix: Postfix, keystore: Path) -> None:
    with pytest.raises(TlsDowngrade, match="without TLS"):
        open_smtp(settings(postfix, keystore, postfix.submission_port, Protection.OFF))
    # the MX-style port offers no AUTH even over TLS: say so instead of trying
    with pytest.raises(AuthenticationError, match="offers no AUTH") as caught:
        open_smtp(settings(postfix, keystore, postfix.smtp_port, Protection.STARTTLS_OPTIONAL))
    assert "auth 'none'" in caught.value.hint
    subject = f"mx {uuid.uuid4().hex}"
    with open_smtp(settings(postfix, keystore, postfix.smtp_port, Protection.STARTTLS_OPTIONAL,
                            auth=AuthMethod.NONE)) as session:  # fmt: skip
        assert session.tls
        session.send(plain_message(subject, "alice@corp.example"), sender="someone@elsewhere.example",
                     recipients=["alice@corp.example"])  # fmt: skip
    postfix.wait_for_message("alice", subject)


def test_trust_and_port_mismatches_are_explained(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    import trustme

    other = TrustStore(tmp_path / "other")
    other.add(trustme.CA().cert_pem.bytes(), alias="someone-else")
    with pytest.raises(TrustError, match="not trusted") as unknown:
        open_smtp(submission(postfix, other.directory))
    assert "keystore" in unknown.value.hint
    with pytest.raises(TrustError) as wrong_name:
        open_smtp(settings(postfix, keystore, postfix.smtps_port, Protection.TLS, tls_server_name="other.example"))
    assert "tls_server_name" in wrong_name.value.hint
    with pytest.raises(PostbridgeTimeout) as silent:  # SMTPS waits for our TLS hello, we for its greeting
        open_smtp(settings(postfix, keystore, postfix.smtps_port, Protection.STARTTLS_MANDATORY, timeout=1.5))
    assert "'tls'" in silent.value.hint and "tcp-tls" in silent.value.hint
    with pytest.raises(NetworkError) as plain:
        open_smtp(settings(postfix, keystore, postfix.submission_port, Protection.TLS, timeout=3.0))
    assert "starttls-mandatory" in plain.value.hint


# -- hostile servers: fail closed before any credential leaves -------------------------------------------


class ScriptedSmtp:
    """A one-connection SMTP server on loopback answering each command verb from ``answers`` (default 502)."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.received: list[str] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(10)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:
            return
        with connection, connection.makefile("rb") as reader:
            connection.sendall(b"220 fake.example ESMTP\r\n")
            for raw in reader:
                command = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.received.append(command)
                connection.sendall(self.answers.get(command.split(" ")[0].upper(), b"502 5.5.2 what?\r\n"))

    def close(self) -> list[str]:
        self._thread.join(10)
        self._listener.close()
        return self.received


EHLO_WITH_STARTTLS = b"250-fake.example\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"
EHLO_WITHOUT_STARTTLS = b"250-fake.example\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"


@pytest.mark.parametrize(
    ("protection", "answers", "error", "words"),
    [
        (Protection.STARTTLS_MANDATORY, {"EHLO": EHLO_WITHOUT_STARTTLS}, TlsDowngrade, "does not offer STARTTLS"),
        (Protection.STARTTLS_MANDATORY, {"EHLO": b"500 no ESMTP\r\n", "HELO": b"250 fake\r\n"}, TlsDowngrade,
         "does not offer STARTTLS"),
        (Protection.STARTTLS_OPTIONAL, {"EHLO": EHLO_WITHOUT_STARTTLS}, TlsDowngrade, "without TLS"),
        (Protection.STARTTLS_MANDATORY, {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"454 4.7.0 not now\r\n"},
         TlsDowngrade, "answered STARTTLS with 454"),
        (Protection.STARTTLS_OPTIONAL, {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"250 sure\r\n"}, TlsDowngrade,
         "answered STARTTLS with 250"),
        (Protection.STARTTLS_MANDATORY,
         {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n"},
         MailProtocolError, "bytes after the STARTTLS answer"),
    ],
)  # fmt: skip
def test_a_hostile_server_never_gets_credentials(
    keystore: Path, protection: Protection, answers: dict[str, bytes], error: type[Exception], words: str
) -> None:
    server = ScriptedSmtp(answers)
    channel = ChannelSettings(
        address=HostPort(LOOPBACK, server.port),
        protection=protection,
        credentials=Credentials("alice", "secret"),
        keystore=keystore,
        timeout=5.0,
    )
    try:
        with pytest.raises(error, match=words):
            open_smtp(channel, local_hostname="client.example")
    finally:
        received = server.close()
    assert received and not any(command.upper().startswith(("AUTH", "MAIL")) for command in received)


CHALLENGE = base64.b64encode(b'{"status":"401"}')


@pytest.mark.parametrize(
    ("auth", "initial", "answer"),
    [
        (AuthMethod.XOAUTH2, b"user=alice\x01auth=Bearer tok-123\x01\x01", ""),
        (AuthMethod.OAUTHBEARER, b"n,a=alice,\x01auth=Bearer tok-123\x01\x01", "AQ=="),
    ],
)
def test_oauth_mechanisms_speak_rfc_4954(auth: AuthMethod, initial: bytes, answer: str) -> None:
    server = ScriptedSmtp({
        "EHLO": b"250-fake.example\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n",
        "AUTH": b"334 " + CHALLENGE + b"\r\n",
        answer: b"535 5.7.8 invalid token\r\n",
    })  # fmt: skip
    channel = ChannelSettings(
        address=HostPort(LOOPBACK, server.port),
        protection=Protection.OFF,
        allow_cleartext_auth=True,
        auth=auth,
        credentials=Credentials("alice", "tok-123"),
        timeout=5.0,
    )
    try:
        with pytest.raises(AuthenticationError, match=r"535 5\.7\.8 invalid token") as caught:
            open_smtp(channel, local_hostname="client.example")
    finally:
        received = server.close()
    assert received == [
        "ehlo client.example",
        f"AUTH {auth.value.upper()} {base64.b64encode(initial).decode()}",
        answer,
    ]
    assert "tok-123" not in f"{caught.value} {caught.value.hint}"


# -- through hub + connector ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_submission_through_hub_and_connector_with_starttls(
    stack: Stack, connected: Connector, postfix: Postfix, keystore: Path
) -> None:
    stack.map(connected, "mail.corp.example:587", f"{postfix.host}:{postfix.submission_port}")
    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)
    channel = ChannelSettings(
        address=HostPort("mail.corp.example", 587),  # the certificate's name, so no tls_server_name
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("alice", "secret"),
        keystore=keystore,
    )
    subject = f"through the tunnel {uuid.uuid4().hex}"
    with open_smtp(channel, local_hostname="cloud-app.example") as session:
        assert session.tls
        session.send_mail(build_message(sender="alice@corp.example", to=["bob@corp.example"], subject=subject,
                                        text="via hub and connector"))  # fmt: skip
    received = read_back(postfix.wait_for_message("bob", subject))
    assert received.get_content().strip() == "via hub and connector"


@pytest.mark.e2e
def test_smtps_through_a_tcp_tls_mapping_with_protection_off(
    stack: Stack, connected: Connector, postfix: Postfix, test_pki: TestPki
) -> None:
    """The connector does the implicit TLS to port 465; the cloud side speaks plain SMTP inside the tunnel."""
    cli(connected.home, "connector", "truststore", "add", str(test_pki.root_pem))
    stack.map(connected, "smtps.corp.example:465", f"{postfix.host}:{postfix.smtps_port}", "--protocol", "tcp-tls",
              "--tls-server-name", "mail.corp.example")  # fmt: skip
    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)
    channel = ChannelSettings(
        address=HostPort("smtps.corp.example", 465),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.OFF,
        credentials=Credentials("alice", "secret"),
    )
    subject = f"through tcp-tls {uuid.uuid4().hex}"
    with open_smtp(channel, local_hostname="cloud-app.example") as session:
        assert not session.tls  # no TLS on the cloud side: the connector did it
        session.send_mail(build_message(sender="alice@corp.example", to=["bob@corp.example"], subject=subject,
                                        text="via the connector's TLS"))  # fmt: skip
    received = read_back(postfix.wait_for_message("bob", subject))
    assert received.get_content().strip() == "via the connector's TLS"
