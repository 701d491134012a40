"""The POP3 client against a real Dovecot (every protection x auth), small hostile servers, and hub + connector."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, NetworkError, TrustError
from postbridge.mail.common import MailProtocolError, TlsDowngrade
from postbridge.mail.pop3 import Pop3Session, open_pop3
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Credentials, Protection, Proxy
from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.servers import LOOPBACK
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

WRONG_PASSWORD = "hunter2-Wr0ng"


def new_message() -> bytes:
    """A unique message with what POP3 must carry exactly: dot-stuffed lines, a line longer than 2 KiB, 8 bits."""
    tag = uuid.uuid4().hex
    return (
        f"From: a@corp.example\r\nTo: alice@corp.example\r\nSubject: pop3 {tag}\r\n"
        f"Message-ID: <{tag}@corp.example>\r\n\r\n"
        f".a line that starts with a dot\r\n..two dots\r\n.\r\n x\r\n{'y' * 3000}\r\n"
        "Gr\u00fc\u00dfe\r\nlast line\r\n"
    ).encode()


@pytest.fixture
def secrets_logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    """Everything postbridge logged during the test (DEBUG and up), to assert no secret is in it."""
    caplog.set_level(logging.DEBUG, logger="postbridge")
    yield lambda: "\n".join(record.getMessage() for record in caplog.records)


def settings(
    dovecot: Dovecot, store: Path | None, port: int, protection: Protection, **extra: object
) -> ChannelSettings:
    values: dict[str, object] = {
        "address": HostPort(dovecot.host, port),
        "protection": protection,
        "credentials": Credentials("alice", "secret"),
        "keystore": store,
        "tls_server_name": "mail.corp.example",
        "timeout": 10.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def wait_for_log(dovecot: Dovecot, since: int, text: str) -> str:
    """Dovecot's log after offset ``since`` once it contains ``text`` (its log process writes a moment later)."""
    deadline = time.monotonic() + 5
    while text not in dovecot.log_text[since:] and time.monotonic() < deadline:
        time.sleep(0.02)
    return dovecot.log_text[since:]


def find(session: Pop3Session, message: bytes) -> tuple[int, str]:
    """(number, UIDL) of ``message`` in the mailbox, looking at the newest messages first."""
    uids = session.uidl()
    for number in sorted(uids, reverse=True):
        if session.size(number) == len(message) and session.retrieve(number) == message:
            return number, uids[number]
    raise AssertionError("message not in the POP3 mailbox")


@pytest.mark.parametrize(
    ("protection", "port_name"),
    [
        (Protection.STARTTLS_MANDATORY, "pop3_port"),
        (Protection.STARTTLS_OPTIONAL, "pop3_port"),
        (Protection.TLS, "pop3s_port"),
    ],
)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5])
def test_retrieves_mail_byte_exact_in_every_tls_mode(
    dovecot: Dovecot,
    keystore: Path,
    protection: Protection,
    port_name: str,
    auth: AuthMethod,
    secrets_logged: Callable[[], str],
) -> None:
    message = new_message()
    dovecot.deliver("alice", message)
    since = len(dovecot.log_text)
    with open_pop3(settings(dovecot, keystore, getattr(dovecot, port_name), protection, auth=auth)) as session:
        assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
        count, total = session.stat()
        assert count >= 1 and total >= len(message)
        number, _ = find(session, message)
        assert session.sizes()[number] == len(message)
    method = {AuthMethod.PLAIN: "PLAIN", AuthMethod.LOGIN: "PLAIN", AuthMethod.CRAM_MD5: "CRAM-MD5"}[auth]
    assert f"pop3-login: Info: Login: user=<alice>, method={method}," in wait_for_log(dovecot, since, "Login:")
    logged = secrets_logged()
    assert "alice" in logged  # the login was logged ...
    assert (
        "secret" not in logged and base64.b64encode(b"\0alice\0secret").decode() not in logged
    )  # ... not the password


def test_capabilities_are_read_again_after_stls(dovecot: Dovecot, keystore: Path) -> None:
    with open_pop3(settings(dovecot, keystore, dovecot.pop3_port, Protection.STARTTLS_MANDATORY)) as session:
        assert "STLS" in session.capabilities_before_tls
        assert "STLS" not in session.capabilities  # the post-TLS list, not the pre-TLS one
        assert "UIDL" in session.capabilities


def test_uidl_is_stable_and_delete_takes_effect_at_quit(dovecot: Dovecot, keystore: Path) -> None:
    message = new_message()
    dovecot.deliver("alice", message)
    channel = settings(dovecot, keystore, dovecot.pop3s_port, Protection.TLS)
    with open_pop3(channel) as session:
        number, uid = find(session, message)
    # leaving by an exception closes without QUIT: the mark is dropped, the message stays
    with pytest.raises(RuntimeError), open_pop3(channel) as session:
        assert session.uidl()[number] == uid
        session.delete(number)
        raise RuntimeError("the target failed")
    with open_pop3(channel) as session:
        number, again = find(session, message)
        assert again == uid  # same UIDL in every session
        session.delete(number)
        with pytest.raises(MailProtocolError, match=r"RETR \d+ failed: -ERR"):
            session.retrieve(number)  # marked: gone for this session already
    with open_pop3(channel) as session:
        assert uid not in session.uidl().values()


def test_unknown_message_is_a_protocol_error_and_the_session_goes_on(dovecot: Dovecot, keystore: Path) -> None:
    with open_pop3(settings(dovecot, keystore, dovecot.pop3s_port, Protection.TLS)) as session:
        count, _ = session.stat()
        with pytest.raises(MailProtocolError) as caught:
            session.retrieve(count + 1000)
        assert caught.value.reply.startswith("-ERR")
        assert session.stat()[0] == count


@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5])
def test_wrong_password_is_an_authentication_error_without_the_password(
    dovecot: Dovecot, keystore: Path, auth: AuthMethod, secrets_logged: Callable[[], str]
) -> None:
    wrong = Credentials("alice", WRONG_PASSWORD)
    with pytest.raises(AuthenticationError, match="refused the login of 'alice'") as caught:
        open_pop3(settings(dovecot, keystore, dovecot.pop3_port, Protection.STARTTLS_MANDATORY, auth=auth,
                           credentials=wrong))  # fmt: skip
    everything = f"{caught.value} {caught.value.hint} {caught.value!r} {secrets_logged()}"
    assert WRONG_PASSWORD not in everything
    assert base64.b64encode(WRONG_PASSWORD.encode()).decode() not in everything


def test_unknown_ca_and_wrong_name_are_trust_errors(dovecot: Dovecot, keystore: Path, tmp_path: Path) -> None:
    import trustme

    other = TrustStore(tmp_path / "other")
    other.add(trustme.CA().cert_pem.bytes(), alias="someone-else")
    with pytest.raises(TrustError, match="not trusted") as unknown:
        open_pop3(settings(dovecot, keystore, dovecot.pop3s_port, Protection.TLS, keystore=other.directory))
    assert "keystore" in unknown.value.hint
    with pytest.raises(TrustError) as wrong_name:  # also after STLS on the plain port
        open_pop3(settings(dovecot, keystore, dovecot.pop3_port, Protection.STARTTLS_MANDATORY,
                           tls_server_name="other.example"))  # fmt: skip
    assert "tls_server_name" in wrong_name.value.hint


def test_starttls_against_the_implicit_tls_port_explains_the_mismatch(dovecot: Dovecot, keystore: Path) -> None:
    with pytest.raises(NetworkError) as caught:
        open_pop3(settings(dovecot, keystore, dovecot.pop3s_port, Protection.STARTTLS_MANDATORY, timeout=1.5))
    assert "'tls'" in caught.value.hint and "tcp-tls" in caught.value.hint


def test_implicit_tls_against_the_plain_port_explains_the_mismatch(dovecot: Dovecot, keystore: Path) -> None:
    with pytest.raises(NetworkError) as caught:
        open_pop3(settings(dovecot, keystore, dovecot.pop3_port, Protection.TLS, timeout=3.0))
    assert "starttls-mandatory" in caught.value.hint


def test_no_credentials_in_clear_text_over_the_internet(dovecot: Dovecot) -> None:
    since = len(dovecot.log_text)
    with pytest.raises(TlsDowngrade, match="without TLS"):
        open_pop3(settings(dovecot, None, dovecot.pop3_port, Protection.OFF))
    assert "(no auth attempts" in wait_for_log(dovecot, since, "pop3-login: Info: Disconnected")
    # with allow_cleartext_auth it is the user's explicit choice (Dovecot trusts 127.0.0.1 as secure)
    with open_pop3(settings(dovecot, None, dovecot.pop3_port, Protection.OFF, allow_cleartext_auth=True)) as session:
        assert not session.tls
        session.stat()


# -- hostile servers: fail closed before any credential leaves -------------------------------------------


class ScriptedPop3:
    """A one-connection POP3 server on loopback answering each command verb from ``answers`` ("*": any other)."""

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
            connection.sendall(b"+OK fake POP3 ready\r\n")
            for raw in reader:
                command = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.received.append(command)
                default = self.answers.get("*", b"-ERR unknown command\r\n")
                connection.sendall(self.answers.get(command.split(" ")[0].upper(), default))

    def close(self) -> list[str]:
        self._thread.join(10)
        self._listener.close()
        return self.received


CAPA_WITH_STLS = b"+OK\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n.\r\n"
CAPA_WITHOUT_STLS = b"+OK\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\n.\r\n"


@pytest.mark.parametrize(
    ("protection", "answers", "error", "words"),
    [
        (Protection.STARTTLS_MANDATORY, {"CAPA": CAPA_WITHOUT_STLS}, TlsDowngrade, "does not offer STLS"),
        (Protection.STARTTLS_MANDATORY, {"CAPA": b"-ERR what\r\n"}, TlsDowngrade, "does not offer STLS"),
        (Protection.STARTTLS_OPTIONAL, {"CAPA": CAPA_WITHOUT_STLS}, TlsDowngrade, "without TLS"),
        (Protection.STARTTLS_MANDATORY, {"CAPA": CAPA_WITH_STLS, "STLS": b"-ERR not now\r\n"}, TlsDowngrade,
         "refused STLS"),
        (Protection.STARTTLS_OPTIONAL, {"CAPA": CAPA_WITH_STLS, "STLS": b"+ go on\r\n"}, TlsDowngrade,
         "instead of \\+OK"),
        (Protection.STARTTLS_MANDATORY, {"CAPA": CAPA_WITH_STLS, "STLS": b"+OK begin TLS\r\n+OK injected\r\n"},
         MailProtocolError, "bytes after the STLS answer"),
    ],
)  # fmt: skip
def test_a_hostile_server_never_gets_credentials(
    keystore: Path, protection: Protection, answers: dict[str, bytes], error: type[Exception], words: str
) -> None:
    server = ScriptedPop3(answers)
    channel = ChannelSettings(
        address=HostPort(LOOPBACK, server.port),
        protection=protection,
        credentials=Credentials("alice", "secret"),
        keystore=keystore,
        timeout=5.0,
    )
    try:
        with pytest.raises(error, match=words):
            open_pop3(channel)
    finally:
        received = server.close()
    assert not any(command.split(" ")[0].upper() in ("USER", "PASS", "AUTH", "APOP") for command in received)


CHALLENGE = base64.b64encode(b'{"status":"401"}')
LONG_TOKEN = "ya29." + "t" * 300


@pytest.mark.parametrize(
    ("auth", "token", "answers", "expected"),
    [
        (AuthMethod.OAUTHBEARER, "short-token", {"AUTH": b"+ " + CHALLENGE + b"\r\n"},
         ["AUTH OAUTHBEARER " + base64.b64encode(b"n,a=alice,\x01auth=Bearer short-token\x01\x01").decode(), "AQ=="]),
        # over 255 octets: RFC 5034 sends the initial response after an empty challenge
        (AuthMethod.XOAUTH2, LONG_TOKEN, {"AUTH": b"+ \r\n", "*": b"+ " + CHALLENGE + b"\r\n"},
         ["AUTH XOAUTH2", base64.b64encode(f"user=alice\x01auth=Bearer {LONG_TOKEN}\x01\x01".encode()).decode(), ""]),
    ],
)  # fmt: skip
def test_oauth_mechanisms_speak_rfc_5034(
    auth: AuthMethod, token: str, answers: dict[str, bytes], expected: list[str]
) -> None:
    capa = b"+OK\r\nUSER\r\nSASL XOAUTH2 OAUTHBEARER\r\n.\r\n"
    server = ScriptedPop3({"CAPA": capa, **answers, "": b"-ERR [AUTH] Invalid token\r\n",
                           "AQ==": b"-ERR [AUTH] Invalid token\r\n"})  # fmt: skip
    channel = ChannelSettings(
        address=HostPort(LOOPBACK, server.port),
        protection=Protection.OFF,
        allow_cleartext_auth=True,
        auth=auth,
        credentials=Credentials("alice", token),
        timeout=5.0,
    )
    try:
        with pytest.raises(AuthenticationError, match="Invalid token") as caught:
            open_pop3(channel)
    finally:
        received = server.close()
    assert received == ["CAPA", *expected]
    assert token not in f"{caught.value} {caught.value.hint}"


# -- through hub + connector ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_through_hub_and_connector_both_tls_setups(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path, test_pki: TestPki
) -> None:
    message = new_message()
    dovecot.deliver("alice", message)
    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)
    # STLS end to end over a 'tcp' mapping; the virtual host is the server's real name
    stack.map(connected, "mail.corp.example:110", f"{dovecot.host}:{dovecot.pop3_port}")
    starttls = ChannelSettings(
        address=HostPort("mail.corp.example", 110),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("alice", "secret"),
        keystore=keystore,
    )
    with open_pop3(starttls) as session:
        assert session.tls
        find(session, message)
    # implicit TLS done by the connector over a 'tcp-tls' mapping; plain POP3 inside the tunnel
    cli(connected.home, "connector", "truststore", "add", str(test_pki.root_pem))
    stack.map(connected, "pop3s.corp.example:995", f"{dovecot.host}:{dovecot.pop3s_port}", "--protocol", "tcp-tls",
              "--tls-server-name", "mail.corp.example")  # fmt: skip
    tcp_tls = ChannelSettings(
        address=HostPort("pop3s.corp.example", 995),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.OFF,
        credentials=Credentials("alice", "secret"),
    )
    with open_pop3(tcp_tls) as session:
        assert not session.tls
        find(session, message)
    # plain POP3 to the mapping of the implicit-TLS port directly ('tcp'): the hint names the fix
    stack.map(connected, "pop3s-raw.corp.example:995", f"{dovecot.host}:{dovecot.pop3s_port}")
    wrong = ChannelSettings(
        address=HostPort("pop3s-raw.corp.example", 995),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.OFF,
        credentials=Credentials("alice", "secret"),
        timeout=1.5,
    )
    with pytest.raises(NetworkError) as caught:
        open_pop3(wrong)
    assert "port 995 expects TLS" in caught.value.hint
