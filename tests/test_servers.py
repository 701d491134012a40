"""The real-server fixtures work: Dovecot, tinyproxy and the Java SOCKS probe, each alone, without postbridge.

These tests pin down what the integration tests rely on: every Dovecot port greets, TLS verifies against
the throwaway root (so the intermediate is sent), curl reads seeded mail, plaintext LOGIN is refused where
promised, tinyproxy really forwards CONNECT, and Java's SOCKS client prints the classic texts for SOCKS5
reply codes.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import find_executable, in_ci, wait_for_port
from tests.servers.dovecot import Dovecot
from tests.servers.java import run_socks_probe
from tests.servers.pki import TestPki, make_test_pki
from tests.servers.tinyproxy import Tinyproxy


@pytest.fixture(scope="module")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dovecot(test_pki: TestPki) -> Iterator[Dovecot]:
    with Dovecot(pki=test_pki) as server:
        yield server


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with Tinyproxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


def message(subject: str) -> bytes:
    return (
        f"From: sender@corp.example\r\nTo: alice@corp.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@corp.example>\r\n\r\nHello from the test suite.\r\n"
    ).encode()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = find_executable("curl")
    return subprocess.run(
        [str(binary), "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- PKI -------------------------------------------------------------------------------------------


def test_pki_files_form_a_chain_to_the_root(test_pki: TestPki) -> None:
    chain = test_pki.chain_pem.read_bytes()
    assert chain.count(b"BEGIN CERTIFICATE") == 2
    assert chain.startswith(test_pki.leaf_pem.read_bytes())
    assert test_pki.intermediate_pem.read_bytes() in chain
    assert test_pki.root_pem.read_bytes() not in chain
    assert b"PRIVATE KEY" in test_pki.key_pem.read_bytes()


# -- the skip/fail rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_server_skips_locally_but_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    assert in_ci() is (ci == "true")
    with pytest.raises(outcome, match="no-such-mail-server"):
        find_executable("no-such-mail-server", ["/nonexistent/no-such-mail-server"])


# -- Dovecot ---------------------------------------------------------------------------------------


def test_dovecot_greets_on_all_four_ports(dovecot: Dovecot) -> None:
    verifying = dovecot.pki.client_context()
    assert wait_for_port(dovecot.imap_port, dovecot.host, expect=b"* OK").startswith(b"* OK")
    assert wait_for_port(dovecot.pop3_port, dovecot.host, expect=b"+OK").startswith(b"+OK")
    # Implicit TLS verified against the root alone: works only if Dovecot sends leaf + intermediate.
    assert wait_for_port(dovecot.imaps_port, dovecot.host, expect=b"* OK", tls=verifying).startswith(b"* OK")
    assert wait_for_port(dovecot.pop3s_port, dovecot.host, expect=b"+OK", tls=verifying).startswith(b"+OK")


def test_dovecot_offers_starttls_on_the_plain_ports(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(dovecot.pki.client_context())
        imap.login("alice", "secret")
        status, _ = imap.select("INBOX")
        assert status == "OK"
        imap.logout()
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        pop.stls(dovecot.pki.client_context())
        pop.user("bob")
        pop.pass_("secret")
    finally:
        pop.quit()


def test_dovecot_rejects_a_wrong_password(dovecot: Dovecot) -> None:
    with (
        imaplib.IMAP4_SSL(
            dovecot.host, dovecot.imaps_port, ssl_context=dovecot.pki.client_context(), timeout=10
        ) as imap,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        imap.login("alice", "wrong")


def test_curl_reads_delivered_mail_over_starttls(dovecot: Dovecot) -> None:
    subject = f"starttls {uuid.uuid4().hex}"
    dovecot.deliver("alice", message(subject))
    base = f"imap://{dovecot.host}:{dovecot.imap_port}/INBOX"
    common = ["--ssl-reqd", "--cacert", str(dovecot.pki.root_pem), "-u", "alice:secret"]

    search = curl(*common, "-X", f'SEARCH SUBJECT "{subject}"', base)
    assert search.returncode == 0, search.stderr
    uids = search.stdout.split("SEARCH", 1)[1].split()
    assert len(uids) == 1, search.stdout

    fetched = curl(*common, f"{base};MAILINDEX={uids[0]}")
    assert fetched.returncode == 0, fetched.stderr
    assert f"Subject: {subject}" in fetched.stdout
    assert "Hello from the test suite." in fetched.stdout


def test_curl_reads_delivered_mail_over_imaps_and_pop3s(dovecot: Dovecot) -> None:
    subject = f"implicit tls {uuid.uuid4().hex}"
    dovecot.deliver("bob", message(subject))
    common = ["--cacert", str(dovecot.pki.root_pem), "-u", "bob:secret"]

    imaps = curl(*common, "-X", f'SEARCH SUBJECT "{subject}"', f"imaps://{dovecot.host}:{dovecot.imaps_port}/INBOX")
    assert imaps.returncode == 0, imaps.stderr
    assert imaps.stdout.startswith("* SEARCH ")
    assert len(imaps.stdout.split()) == 3, imaps.stdout

    listing = curl(*common, f"pop3s://{dovecot.host}:{dovecot.pop3s_port}/")
    assert listing.returncode == 0, listing.stderr
    last_number = listing.stdout.split()[-2]
    retrieved = curl(*common, f"pop3s://{dovecot.host}:{dovecot.pop3s_port}/{last_number}")
    assert retrieved.returncode == 0, retrieved.stderr
    assert f"Subject: {subject}" in retrieved.stdout


def test_curl_refuses_a_server_it_cannot_verify(dovecot: Dovecot, tmp_path: Path) -> None:
    foreign = make_test_pki(tmp_path / "foreign")
    result = curl(
        "--cacert",
        str(foreign.root_pem),
        "-u",
        "alice:secret",
        f"imaps://{dovecot.host}:{dovecot.imaps_port}/",
    )
    assert result.returncode == 60, result.stderr  # CURLE_PEER_FAILED_VERIFICATION


def test_deliver_rejects_an_unknown_user(dovecot: Dovecot) -> None:
    with pytest.raises(KeyError, match="carol"):
        dovecot.deliver("carol", message("nobody home"))


def test_dovecot_refuses_plaintext_login_when_tls_login_is_required(test_pki: TestPki) -> None:
    with Dovecot(pki=test_pki, require_tls_login=True) as strict:
        with imaplib.IMAP4(strict.host, strict.imap_port, timeout=10) as imap:
            assert "LOGINDISABLED" in imap.capabilities
            with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                imap.login("alice", "secret")
        inbox = f"imap://{strict.host}:{strict.imap_port}/INBOX"
        plain = curl("-u", "alice:secret", inbox)
        assert plain.returncode == 67, plain.stderr  # CURLE_LOGIN_DENIED
        secured = curl("--ssl-reqd", "--cacert", str(strict.pki.root_pem), "-u", "alice:secret", inbox)
        assert secured.returncode == 0, secured.stderr
        assert "Login: user=<alice>" in strict.log_text


# -- tinyproxy -------------------------------------------------------------------------------------


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A one-connection-at-a-time echo server on 127.0.0.1 that greets with 'ECHO READY'."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                connection.sendall(b"ECHO READY\r\n")
                while data := connection.recv(4096):
                    connection.sendall(data)

    thread = threading.Thread(target=serve, name="echo-server", daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        thread.join(5)
        listener.close()


def test_tinyproxy_forwards_connect_and_logs_it(tinyproxy: Tinyproxy, echo_port: int) -> None:
    target = f"127.0.0.1:{echo_port}"
    with socket.create_connection((tinyproxy.host, tinyproxy.port), timeout=10) as connection:
        connection.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        reader = connection.makefile("rb")
        status = reader.readline()
        assert status.split()[1] == b"200", status
        while reader.readline() not in (b"\r\n", b""):
            pass
        assert reader.readline() == b"ECHO READY\r\n"
        connection.sendall(b"ping through the proxy\n")
        assert reader.readline() == b"ping through the proxy\n"
        reader.close()
    assert target in tinyproxy.connect_targets()


def test_tinyproxy_log_lists_no_connect_without_one(tinyproxy: Tinyproxy) -> None:
    assert tinyproxy.connect_targets() == []
    assert tinyproxy.url == f"http://127.0.0.1:{tinyproxy.port}"


# -- Java SOCKS probe ------------------------------------------------------------------------------


@dataclass
class StubSocks5:
    """A throwaway SOCKS5 server: insists on username/password, answers CONNECT with a fixed reply code."""

    reply: int
    greeting: bytes = b"* OK stub mail server ready\r\n"
    # One (user, password, address type, host, port) per CONNECT received.
    seen: list[tuple[str, str, int, str, int]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            version, method_count = await reader.readexactly(2)
            methods = await reader.readexactly(method_count)
            if version != 5 or 0x02 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x02")
            _, user_length = await reader.readexactly(2)
            user = (await reader.readexactly(user_length)).decode()
            password = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            writer.write(b"\x01\x00")
            _, _command, _, address_type = await reader.readexactly(4)
            if address_type == 0x03:
                host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            else:
                raw = await reader.readexactly(4 if address_type == 0x01 else 16)
                host = socket.inet_ntop(socket.AF_INET if address_type == 0x01 else socket.AF_INET6, raw)
            port = int.from_bytes(await reader.readexactly(2), "big")
            self.seen.append((user, password, address_type, host, port))
            writer.write(bytes([5, self.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
            if self.reply == 0:
                writer.write(self.greeting)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def probe_through_stub(stub: StubSocks5) -> tuple[int, str]:
    server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await asyncio.to_thread(run_socks_probe, port, "acme/dc1", "s3cret", "mail.corp.example", 143)


async def test_java_probe_connects_and_sends_the_name_unresolved() -> None:
    stub = StubSocks5(reply=0x00)
    exit_code, output = await probe_through_stub(stub)
    assert (exit_code, output) == (0, "CONNECTED * OK stub mail server ready")
    assert stub.seen == [("acme/dc1", "s3cret", 0x03, "mail.corp.example", 143)]


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (0x02, "Connection not allowed by ruleset"),
        (0x03, "Network unreachable"),
        (0x04, "Host unreachable"),
        (0x05, "Connection refused"),
    ],
)
async def test_java_probe_prints_the_classic_socks_texts(reply: int, text: str) -> None:
    exit_code, output = await probe_through_stub(StubSocks5(reply=reply))
    assert (exit_code, output) == (1, f"ERROR java.net.SocketException: SOCKS: {text}")


def test_java_probe_reports_a_refused_proxy_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        closed_port = int(placeholder.getsockname()[1])
    exit_code, output = run_socks_probe(closed_port, "acme", "s3cret", "mail.corp.example", 143)
    # Not the same words as SOCKS reply 0x05 ("SOCKS: Connection refused"): no proxy answered at all.
    assert (exit_code, output) == (1, "ERROR java.net.SocketException: Connection refused")


def test_tls_context_helpers_talk_to_each_other(test_pki: TestPki) -> None:
    server_context = test_pki.server_context()
    client_context = test_pki.client_context()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept_one() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"hello\n")

        thread = threading.Thread(target=accept_one, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="mail.corp.example") as tls,
        ):
            assert tls.recv(6) == b"hello\n"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        thread.join(5)
    assert isinstance(client_context, ssl.SSLContext)
