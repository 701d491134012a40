"""Real mail through the tunnel: curl as the cloud application, a real Dovecot as the on-premise server.

The two configurations of the design's TLS table:
* a ``tcp`` mapping to the STARTTLS port, the client doing STARTTLS end to end (verified against the virtual host
  name, which is the server's real name);
* a ``tcp-tls`` mapping to the IMAPS port, the connector doing TLS against its backend trust store, the client
  speaking plain IMAP inside the encrypted tunnel.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import Connector, Stack, cli
from tests.servers import LOOPBACK, server_missing
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: sender@corp.example\r\nTo: alice@corp.example\r\nSubject: through the tunnel\r\n"
    b"Message-ID: <tunnel-1@corp.example>\r\n\r\nHello from the private network.\r\n"
)


def curl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        server_missing("curl not found")
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            f"{LOOPBACK}:{stack.socks_port}",
            "--proxy-user",
            f"acme/dc1:{stack.secret}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=40,
    )


def newest_uid(stack: Stack, url: str, *tls: str) -> int:
    """The highest UID in alice's INBOX (other tests share the mailbox, so UID 1 is not necessarily ours)."""
    found = curl(stack, *tls, "-u", "alice:secret", "-X", "UID SEARCH ALL", url)
    assert found.returncode == 0, found.stderr
    return max(int(uid) for uid in found.stdout.split("SEARCH", 1)[1].split())


def test_imap_starttls_end_to_end_over_a_tcp_mapping(stack: Stack, connected: Connector, dovecot: Dovecot) -> None:
    dovecot.deliver("alice", MESSAGE)
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    tls = ("--ssl-reqd", "--cacert", str(dovecot.pki.root_pem))
    uid = newest_uid(stack, "imap://mail.corp.example:143/INBOX", *tls)
    result = curl(stack, *tls, "-u", "alice:secret", f"imap://mail.corp.example:143/INBOX;UID={uid}")
    assert result.returncode == 0, result.stderr
    assert "Hello from the private network." in result.stdout
    # the connector saw only ciphertext after STARTTLS: it is not the TLS end point
    assert "tcp" in cli(connected.home, "connector", "mapping", "list").stdout


def test_imap_over_a_tcp_tls_mapping_with_plain_imap_inside_the_tunnel(
    stack: Stack, connected: Connector, dovecot: Dovecot
) -> None:
    dovecot.deliver("alice", MESSAGE)
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem), "--alias", "corp-root")
    stack.map(
        connected,
        "imaps.corp.example:993",
        f"{dovecot.host}:{dovecot.imaps_port}",
        "--protocol",
        "tcp-tls",
        "--tls-server-name",
        "mail.corp.example",
    )
    uid = newest_uid(stack, "imap://imaps.corp.example:993/INBOX")
    result = curl(stack, "-u", "alice:secret", f"imap://imaps.corp.example:993/INBOX;UID={uid}")
    assert result.returncode == 0, result.stderr
    assert "Hello from the private network." in result.stdout


def test_pop3_over_a_tcp_tls_mapping(stack: Stack, connected: Connector, dovecot: Dovecot) -> None:
    dovecot.deliver("bob", MESSAGE)
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem))
    stack.map(
        connected,
        "pop.corp.example:995",
        f"{dovecot.host}:{dovecot.pop3s_port}",
        "--protocol",
        "tcp-tls",
        "--tls-server-name",
        "mail.corp.example",
    )
    listing = curl(stack, "-u", "bob:secret", "pop3://pop.corp.example:995/")  # LIST: "n size" per message
    assert listing.returncode == 0, listing.stderr
    newest = max(int(line.split()[0]) for line in listing.stdout.splitlines() if line.strip())
    result = curl(stack, "-u", "bob:secret", f"pop3://pop.corp.example:995/{newest}")  # other tests share bob
    assert result.returncode == 0, result.stderr
    assert "Hello from the private network." in result.stdout


def test_tcp_tls_mapping_with_untrusted_backend_is_a_general_failure(
    stack: Stack, connected: Connector, dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import trustme

    foreign = tmp_path_factory.mktemp("foreign") / "foreign-root.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    cli(connected.home, "connector", "truststore", "add", str(foreign), "--alias", "someone-else")
    stack.map(
        connected,
        "imaps.corp.example:993",
        f"{dovecot.host}:{dovecot.imaps_port}",
        "--protocol",
        "tcp-tls",
        "--tls-server-name",
        "mail.corp.example",
    )
    result = curl(stack, "-u", "alice:secret", "imap://imaps.corp.example:993/INBOX")
    assert result.returncode == 97
    assert "(1)" in result.stderr
    log = connected.process.log() if connected.process else ""
    assert "certificate verify failed" in log


def test_tcp_tls_mapping_checks_the_host_name(stack: Stack, connected: Connector, dovecot: Dovecot) -> None:
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem))
    stack.map(
        connected,
        "imaps.corp.example:993",
        f"{dovecot.host}:{dovecot.imaps_port}",
        "--protocol",
        "tcp-tls",
        "--tls-server-name",
        "wrong.corp.example",
    )
    result = curl(stack, "-u", "alice:secret", "imap://imaps.corp.example:993/INBOX")
    assert result.returncode == 97
    assert "(1)" in result.stderr


def test_connector_check_reports_the_greeting_and_refusals(
    connected: Connector, dovecot: Dovecot, stack: Stack
) -> None:
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem))
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    stack.map(
        connected,
        "pop.corp.example:995",
        f"{dovecot.host}:{dovecot.pop3s_port}",
        "--protocol",
        "tcp-tls",
        "--tls-server-name",
        "mail.corp.example",
    )
    stack.map(connected, "down.corp.example:25", f"{LOOPBACK}:1")
    imap = cli(connected.home, "connector", "check", "mail.corp.example:143")
    assert f"reachable (IMAP greeting from {dovecot.host}:{dovecot.imap_port}" in imap.stdout
    pop3 = cli(connected.home, "connector", "check", "pop.corp.example:995")
    assert "TLS 1.3" in pop3.stdout and "POP3 greeting" in pop3.stdout
    down = cli(connected.home, "connector", "check", "down.corp.example:25", check=False)
    assert down.returncode == 1
    assert f"not reachable: connection refused by {LOOPBACK}:1" in down.stdout
