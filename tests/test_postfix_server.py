"""The real Postfix fixture works: submission with STARTTLS, SMTPS, SASL through Dovecot, LMTP into Dovecot.

These tests pin down what the mail adapter's SMTP tests rely on: every port greets 220 and verifies against
the throwaway root, AUTH appears only after STARTTLS, a mail submitted over either TLS flavour lands in the
recipient's Dovecot mailbox (and is readable over IMAP and POP3), wrong passwords, unauthenticated senders,
unknown users and relaying are refused with the classic codes, the instance listens on 127.0.0.1 only, and
Dovecot offers CRAM-MD5.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import wait_for_port
from tests.servers.dovecot import STRICT_LOOPBACK, Dovecot
from tests.servers.pki import TestPki
from tests.servers.postfix import Postfix


@pytest.fixture(scope="module")
def mailboxes(test_pki: TestPki) -> Iterator[Dovecot]:
    """A Dovecot of this module's own, so that the mail sent here never shows up in other tests' mailboxes."""
    with Dovecot(pki=test_pki, lmtp=True) as server:
        yield server


@pytest.fixture(scope="module")
def postfix(mailboxes: Dovecot) -> Iterator[Postfix]:
    with Postfix(mailboxes) as server:
        yield server


def new_subject(what: str) -> str:
    return f"{what} {uuid.uuid4().hex}"


def message(subject: str, sender: str, recipient: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@corp.example>\r\n\r\nSent through the test Postfix.\r\n"
    ).encode()


def submission(postfix: Postfix) -> smtplib.SMTP:
    """An SMTP session on the submission port after a verified STARTTLS and the second EHLO."""
    client = smtplib.SMTP(postfix.host, postfix.submission_port, local_hostname="client.example", timeout=10)
    client.starttls(context=postfix.pki.client_context())
    client.ehlo()
    return client


def imap_subjects(dovecot: Dovecot, user: str, subject: str) -> list[bytes]:
    """The message numbers in `user`'s INBOX whose subject contains `subject`, read over verified IMAPS."""
    context = dovecot.pki.client_context()
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=context, timeout=10) as imap:
        imap.login(user, dovecot.users[user])
        imap.select("INBOX", readonly=True)
        status, data = imap.search(None, "SUBJECT", f'"{subject}"')
        assert status == "OK", data
        imap.logout()
    numbers: list[bytes] = data[0].split()
    return numbers


# -- greetings and capabilities --------------------------------------------------------------------


def test_every_port_greets_with_the_mail_host_name(postfix: Postfix) -> None:
    expected = b"220 mail.corp.example ESMTP"
    assert wait_for_port(postfix.smtp_port, postfix.host, expect=b"220").startswith(expected)
    assert wait_for_port(postfix.submission_port, postfix.host, expect=b"220").startswith(expected)
    # Implicit TLS verified against the root alone: works only if Postfix sends leaf + intermediate.
    verifying = postfix.pki.client_context()
    assert wait_for_port(postfix.smtps_port, postfix.host, expect=b"220", tls=verifying).startswith(expected)


def test_smtps_presents_the_mail_host_certificate(postfix: Postfix) -> None:
    context = postfix.pki.client_context()
    with (
        socket.create_connection((postfix.host, postfix.smtps_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="mail.corp.example") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.recv(4) == b"220 "


def test_submission_offers_auth_only_after_starttls(postfix: Postfix) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        # Neither AUTH (alice/secret in the clear) nor mail before STARTTLS.
        for command, argument in (("AUTH", "PLAIN AGFsaWNlAHNlY3JldA=="), ("MAIL", "FROM:<alice@corp.example>")):
            code, reply = client.docmd(command, argument)
            assert (code, reply) == (530, b"5.7.0 Must issue a STARTTLS command first"), command

        client.starttls(context=postfix.pki.client_context())
        client.ehlo()
        mechanisms = client.esmtp_features["auth"].upper().split()
        assert {"PLAIN", "LOGIN"} <= set(mechanisms), mechanisms
        assert not client.has_extn("starttls")


def test_the_smtp_port_offers_starttls_but_no_auth(postfix: Postfix) -> None:
    with smtplib.SMTP(postfix.host, postfix.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=postfix.pki.client_context())
        client.ehlo()
        assert not client.has_extn("auth")


# -- sending mail that arrives -----------------------------------------------------------------------


def test_starttls_login_and_send_arrives_in_bobs_imap_inbox(postfix: Postfix, mailboxes: Dovecot) -> None:
    subject = new_subject("submission")
    with submission(postfix) as client:
        client.login("alice", "secret")
        refused = client.sendmail(
            "alice@corp.example", ["bob@corp.example"], message(subject, "alice@corp.example", "bob@corp.example")
        )
        assert refused == {}
    delivered = postfix.wait_for_message("bob", subject, timeout=10).read_bytes()
    assert b"Sent through the test Postfix." in delivered
    # It went through this Postfix, over TLS, and was handed over to Dovecot by LMTP.
    assert b"by mail.corp.example (Postfix) with ESMTPSA" in delivered
    assert b"using TLSv1." in delivered
    assert len(imap_subjects(mailboxes, "bob", subject)) == 1
    assert imap_subjects(mailboxes, "alice", subject) == []
    assert "sasl_username=alice" in postfix.log_text
    assert f"relay=mail.corp.example[{mailboxes.lmtp_socket}]" in postfix.log_text


def test_smtps_login_and_send_arrives_in_alices_pop3_inbox(postfix: Postfix, mailboxes: Dovecot) -> None:
    subject = new_subject("smtps")
    with smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=postfix.pki.client_context(), timeout=10) as client:
        client.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].upper().split())
        client.login("bob", "secret")
        client.sendmail("bob@corp.example", ["alice@corp.example"], message(subject, "bob", "alice"))
    postfix.wait_for_message("alice", subject, timeout=10)

    pop = poplib.POP3_SSL(mailboxes.host, mailboxes.pop3s_port, context=mailboxes.pki.client_context(), timeout=10)
    try:
        pop.user("alice")
        pop.pass_("secret")
        count, _ = pop.stat()
        tops = [b"\n".join(pop.top(number, 0)[1]) for number in range(1, count + 1)]
    finally:
        pop.quit()
    assert sum(f"Subject: {subject}".encode() in top for top in tops) == 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_each_offered_mechanism_logs_in(postfix: Postfix, mechanism: str) -> None:
    with submission(postfix) as client:
        client.user, client.password = "bob", "secret"
        authenticator = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, reply = client.auth(mechanism, authenticator)
        assert code == 235, reply


def test_the_smtp_port_takes_mail_for_local_users_without_auth(postfix: Postfix) -> None:
    subject = new_subject("mx")
    with smtplib.SMTP(postfix.host, postfix.smtp_port, timeout=10) as client:
        client.sendmail("someone@elsewhere.example", ["alice@corp.example"], message(subject, "someone", "alice"))
    assert b"with ESMTP" in postfix.wait_for_message("alice", subject, timeout=10).read_bytes()


# -- refusals ----------------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_with_535(postfix: Postfix) -> None:
    # One mechanism only: Dovecot answers every failed SASL attempt after about 0.5 s, and login() would
    # try all three offered mechanisms in turn.
    with submission(postfix) as client, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.user, client.password = "alice", "wrong"
        client.auth("PLAIN", client.auth_plain)
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error == b"5.7.8 Error: authentication failed: (reason unavailable)"


def test_submission_refuses_mail_without_authentication(postfix: Postfix) -> None:
    with submission(postfix) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail("alice@corp.example", ["bob@corp.example"], message("never", "alice", "bob"))
    code, reply = refused.value.recipients["bob@corp.example"]
    assert code == 554, reply
    assert b"Access denied" in reply


@pytest.mark.parametrize("port_name", ["smtp_port", "submission_port"])
def test_relaying_to_another_domain_is_refused(postfix: Postfix, port_name: str) -> None:
    with smtplib.SMTP(postfix.host, getattr(postfix, port_name), timeout=10) as client:
        client.starttls(context=postfix.pki.client_context())
        client.ehlo()
        if port_name == "submission_port":
            client.login("alice", "secret")  # even an authenticated sender may not send off the machine
        client.mail("alice@corp.example")
        code, reply = client.rcpt("someone@elsewhere.example")
    assert (code, reply) == (554, b"5.7.1 <someone@elsewhere.example>: Relay access denied")


def test_an_unknown_local_user_is_refused(postfix: Postfix) -> None:
    with submission(postfix) as client:
        client.login("alice", "secret")
        client.mail("alice@corp.example")
        code, reply = client.rcpt("carol@corp.example")
    assert code == 550, reply
    assert b"User unknown" in reply


def test_postfix_listens_on_127_0_0_1_only(postfix: Postfix) -> None:
    for port in (postfix.smtp_port, postfix.submission_port, postfix.smtps_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((STRICT_LOOPBACK, port), timeout=5).close()


def test_postfix_needs_a_running_dovecot(test_pki: TestPki) -> None:
    idle = Dovecot(pki=test_pki, lmtp=True)  # never started: its sockets do not exist
    try:
        server = Postfix(idle)
        with pytest.raises(RuntimeError, match="start the Dovecot before the Postfix"):
            server.start()
        assert not server.folder.exists()
    finally:
        idle.stop()


# -- Dovecot CRAM-MD5 ---------------------------------------------------------------------------------


def test_dovecot_offers_and_accepts_cram_md5(mailboxes: Dovecot) -> None:
    with imaplib.IMAP4(mailboxes.host, mailboxes.imap_port, timeout=10) as imap:
        imap.starttls(mailboxes.pki.client_context())
        status, capabilities = imap.capability()
        assert status == "OK"
        assert "AUTH=CRAM-MD5" in capabilities[-1].decode().split()
        status, _ = imap.login_cram_md5("alice", "secret")
        assert status == "OK"
        imap.logout()
    assert "Login: user=<alice>, method=CRAM-MD5" in mailboxes.log_text


def test_dovecot_refuses_a_wrong_cram_md5_answer(mailboxes: Dovecot) -> None:
    context = mailboxes.pki.client_context()
    with (
        imaplib.IMAP4_SSL(mailboxes.host, mailboxes.imaps_port, ssl_context=context, timeout=10) as imap,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        imap.login_cram_md5("alice", "wrong")


def test_a_dovecot_that_requires_tls_for_login_leaves_cram_md5_out(test_pki: TestPki) -> None:
    # CRAM-MD5 is allowed before TLS (it is no plaintext mechanism): it would open the door
    # require_tls_login=True means to keep shut.
    with (
        Dovecot(pki=test_pki, require_tls_login=True, lmtp=False) as strict,
        imaplib.IMAP4(strict.host, strict.imap_port, timeout=10) as imap,
    ):
        assert "LOGINDISABLED" in imap.capabilities
        assert not any(capability.startswith("AUTH=") for capability in imap.capabilities), imap.capabilities


def test_lmtp_recipients_with_a_domain_do_not_log_in_to_imap(mailboxes: Dovecot) -> None:
    # LMTP strips the domain (bob@corp.example is bob); IMAP logins must not.
    context = mailboxes.pki.client_context()
    with (
        imaplib.IMAP4_SSL(mailboxes.host, mailboxes.imaps_port, ssl_context=context, timeout=10) as imap,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        imap.login("alice@corp.example", "secret")


def test_a_client_without_the_test_root_refuses_the_server(postfix: Postfix) -> None:
    # The system's trust store does not know the test root: proves the passing tests really verify.
    stranger = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=stranger, timeout=10)


def test_a_folder_the_postfix_user_cannot_reach_is_refused(mailboxes: Dovecot, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    with pytest.raises(ValueError, match="not reachable by the 'postfix' user"):
        Postfix(mailboxes, folder=tmp_path / "postfix")
