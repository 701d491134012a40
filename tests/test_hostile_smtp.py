"""Hostile SMTP servers against the SMTP client: the SMTP analogues of the EAST test cases.

STARTTLS stripping (also by refusing EHLO, which leaves no extensions at all), STARTTLS answered with a refusal
or nonsense, response injection before the handshake, pre-TLS EHLO tampering, and bad certificates, in every
protection mode each applies to. SMTP has no PREAUTH, ALERT or referral. Each case checks (a) a PostbridgeError,
(b) no credential and no AUTH command in clear text, (c) nothing the attacker said before TLS was acted on; and a
message sent over a good session crosses only inside TLS.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import NetworkError, PostbridgeError, TrustError
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection
from postbridge.mail.smtp import open_smtp
from tests.hostile.certs import SERVER_NAME, root_keystore, server_contexts
from tests.hostile.servers import (
    Close,
    Expect,
    FakeServer,
    Send,
    StartTls,
    Step,
    Transcript,
    assert_no_leaks,
    cleartext_leaks,
)
from tests.servers.pki import TestPki

USER = "alice"
PASSWORD = "Hostile-S3cret-Passw0rd"
BODY_MARKER = b"confidential-body-7f3a"
MESSAGE = b"From: a@corp.example\r\nTo: b@corp.example\r\nSubject: hi\r\n\r\n" + BODY_MARKER + b"\r\n"

STARTTLS_MODES = [Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL]
TLS_MODES = [*STARTTLS_MODES, Protection.TLS]

PRE_TLS_EHLO = (b"STARTTLS", b"PIPELINING", b"8BITMIME")
POST_TLS_EHLO = (b"AUTH PLAIN LOGIN", b"PIPELINING", b"8BITMIME")
BAD_CERTIFICATES = ["self-signed", "unknown-root", "wrong-host", "expired", "missing-intermediate", "tls1.0-only"]


@pytest.fixture(scope="module")
def keystore(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> Path:
    return root_keystore(test_pki, tmp_path_factory.mktemp("keystore"))


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> dict[str, ssl.SSLContext]:
    return server_contexts(test_pki, tmp_path_factory.mktemp("certs"))


def channel(server: FakeServer, protection: Protection, keystore: Path, **extra: object) -> ChannelSettings:
    values: dict[str, object] = {
        "address": HostPort(server.host, server.port),
        "protection": protection,
        "auth": AuthMethod.PLAIN,
        "credentials": Credentials(USER, PASSWORD),
        "keystore": keystore,
        "tls_server_name": SERVER_NAME,
        "timeout": 3.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def ehlo_answer(extensions: tuple[bytes, ...]) -> bytes:
    lines = [b"fake.example greets you", *extensions]
    return b"".join(b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n" for i, line in enumerate(lines))


def greeting() -> list[Step]:
    return [Send(b"220 fake.example ESMTP ready\r\n")]


def ehlo(extensions: tuple[bytes, ...]) -> list[Step]:
    return [Expect(b"EHLO"), Send(ehlo_answer(extensions))]


def starttls(context: ssl.SSLContext, answer: bytes = b"220 2.0.0 Ready to start TLS\r\n") -> list[Step]:
    return [Expect(b"STARTTLS"), Send(answer), StartTls(context)]


def login_plain() -> list[Step]:
    return [Expect(b"AUTH PLAIN"), Send(b"235 2.7.0 Authentication successful\r\n")]


def login_login() -> list[Step]:
    return [
        Expect(b"AUTH LOGIN"),
        Send(b"334 VXNlcm5hbWU6\r\n"),
        Expect(b""),
        Send(b"334 UGFzc3dvcmQ6\r\n"),
        Expect(b""),
        Send(b"235 2.7.0 Authentication successful\r\n"),
    ]


def secure_opening(mode: Protection, context: ssl.SSLContext) -> list[Step]:
    if mode is Protection.TLS:
        return [StartTls(context), *greeting(), *ehlo(POST_TLS_EHLO)]
    return [*greeting(), *ehlo(PRE_TLS_EHLO), *starttls(context), *ehlo(POST_TLS_EHLO)]


class Lure:
    """After the script: a willing SMTP server - it asks AUTH for user and password (so a leak shows), takes
    MAIL/RCPT/DATA and the message, answers QUIT, and hangs up on anything else."""

    def __init__(self) -> None:
        self.challenges = 0
        self.in_data = False

    def __call__(self, line: bytes) -> bytes | None:
        if self.in_data:
            self.in_data = line != b"."
            return b"" if self.in_data else b"250 2.0.0 queued\r\n"
        if self.challenges:
            self.challenges -= 1
            return b"334 UGFzc3dvcmQ6\r\n" if self.challenges else b"535 5.7.8 no\r\n"
        words = line.upper().split()
        command = words[0] if words else b""
        if command == b"AUTH" and len(words) == 2:
            self.challenges = 2
            return b"334 VXNlcm5hbWU6\r\n"
        if command in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 2.1.0 ok\r\n"
        if command == b"DATA":
            self.in_data = True
            return b"354 go ahead\r\n"
        if command == b"QUIT":
            return b"221 2.0.0 bye\r\n"
        return None


def no_leaks(server: FakeServer) -> list[Transcript]:
    return assert_no_leaks(server, PASSWORD)


# -- 1. STARTTLS stripping -----------------------------------------------------------------------------------------

STRIPPED: dict[str, list[Step]] = {
    "no-starttls": ehlo((b"AUTH PLAIN LOGIN", b"8BITMIME")),
    "look-alikes": ehlo((b"X-STARTTLS", b"STARTTLSX", b"AUTH=PLAIN LOGIN")),
    # EHLO refused: the client falls back to HELO and sees no extension at all
    "helo-only": [Expect(b"EHLO"), Send(b"502 5.5.1 EHLO not implemented\r\n"), Expect(b"HELO"), Send(b"250 hi\r\n")],
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5, AuthMethod.XOAUTH2])
@pytest.mark.parametrize("case", list(STRIPPED))
def test_stripped_starttls_sends_no_credentials(mode: Protection, auth: AuthMethod, case: str, keystore: Path) -> None:
    with FakeServer([*greeting(), *STRIPPED[case]], after_script=Lure()) as server:
        with pytest.raises(PostbridgeError):
            open_smtp(channel(server, mode, keystore, auth=auth), local_hostname="client.example")
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert b"STARTTLS" not in transcript.cleartext_commands()


# -- 2. STARTTLS refused or answered with nonsense -----------------------------------------------------------------

STARTTLS_ANSWERS = {
    "454": b"454 4.7.0 TLS not available due to temporary reason\r\n",
    "501": b"501 5.5.4 syntax error\r\n",
    "421": b"421 4.3.2 service shutting down\r\n",
    "garbage": b"\x16\x03\x01\x00 not an SMTP reply\r\n",
    "250": b"250 2.0.0 ok\r\n",
    "multi-line-refusal": b"454-4.7.0 TLS\r\n454 4.7.0 not today\r\n",
}


def failed_starttls(answer: str) -> list[Step]:
    return [*greeting(), *ehlo(PRE_TLS_EHLO), Expect(b"STARTTLS"), Send(STARTTLS_ANSWERS[answer])]


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("answer", list(STARTTLS_ANSWERS))
def test_failed_starttls_fails_closed(mode: Protection, answer: str, keystore: Path) -> None:
    with FakeServer(failed_starttls(answer), after_script=Lure()) as server:
        with pytest.raises(PostbridgeError):
            open_smtp(channel(server, mode, keystore), local_hostname="client.example")
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert transcript.commands_after(b"STARTTLS") == [], "the client went on talking after STARTTLS failed"


@pytest.mark.parametrize("mode", STARTTLS_MODES)
def test_starttls_answered_by_hanging_up_fails_closed(mode: Protection, keystore: Path) -> None:
    with FakeServer([*greeting(), *ehlo(PRE_TLS_EHLO), Expect(b"STARTTLS"), Close()]) as server:
        with pytest.raises(PostbridgeError):
            open_smtp(channel(server, mode, keystore), local_hostname="client.example")
        (transcript,) = no_leaks(server)
    assert transcript.completed and not transcript.tls_established


# -- 3. response injection between the 220 and the handshake -------------------------------------------------------

INJECTIONS = {
    "ehlo-answer": ehlo_answer((b"AUTH PLAIN LOGIN X-EVIL", b"X-EVIL")),
    "auth-ok": b"235 2.7.0 Authentication successful\r\n",
    "mail-ok": b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n",
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("delayed", [False, True], ids=["same-segment", "separate-segment"])
@pytest.mark.parametrize("injection", list(INJECTIONS))
def test_injected_bytes_before_the_handshake_abort(
    mode: Protection, delayed: bool, injection: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    ok = b"220 2.0.0 Ready to start TLS\r\n"
    extra = INJECTIONS[injection]
    sends = [Send(ok), Send(extra, delay=0.05)] if delayed else [Send(ok + extra)]
    script = [
        *greeting(),
        *ehlo(PRE_TLS_EHLO),
        Expect(b"STARTTLS"),
        *sends,
        StartTls(contexts["good"]),
        *ehlo(POST_TLS_EHLO),
        *login_plain(),
    ]
    with FakeServer(script, after_script=Lure()) as server:
        with pytest.raises(PostbridgeError):
            open_smtp(channel(server, mode, keystore), local_hostname="client.example")
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established
    assert transcript.after_tls == b""
    assert transcript.commands_after(b"STARTTLS") == []


# -- 4. pre-TLS EHLO tampering -------------------------------------------------------------------------------------

TAMPERING = {
    # the attacker offers AUTH PLAIN and a fake extension; the real server offers only LOGIN
    "fake-auth": ((b"STARTTLS", b"AUTH PLAIN X-EVIL", b"X-EVIL"), (b"AUTH LOGIN", b"8BITMIME")),
    # the attacker hides AUTH (a client that believed it would give up); the real server offers PLAIN
    "hidden-auth": ((b"STARTTLS",), (b"AUTH PLAIN", b"8BITMIME")),
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("case", list(TAMPERING))
def test_only_the_ehlo_read_over_tls_counts(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    pre, post = TAMPERING[case]
    login = login_plain() if b"AUTH PLAIN" in post else login_login()
    script = [*greeting(), *ehlo(pre), *starttls(contexts["good"]), *ehlo(post), *login]
    with FakeServer(script, after_script=Lure()) as server:
        with open_smtp(channel(server, mode, keystore), local_hostname="client.example") as session:
            features = session.features
            assert set(features) == {"auth", "8bitmime"}
            assert features["auth"].split() == post[0].decode().split()[1:]
        (transcript,) = no_leaks(server)
    assert transcript.completed, transcript.script_error
    assert transcript.cleartext_commands() == [b"EHLO", b"STARTTLS"]


# -- 5. certificates -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_good_certificate_is_accepted_and_mail_crosses_only_inside_tls(
    mode: Protection, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    with FakeServer([*secure_opening(mode, contexts["good"]), *login_plain()], after_script=Lure()) as server:
        with open_smtp(channel(server, mode, keystore), local_hostname="client.example") as session:
            assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
            assert session.send(MESSAGE, sender="a@corp.example", recipients=["b@corp.example"]) == {}
        (transcript,) = no_leaks(server)
    assert transcript.completed and transcript.tls_established
    assert BODY_MARKER in transcript.after_tls
    assert BODY_MARKER not in transcript.cleartext


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_bad_certificate_is_refused(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    expected: type[PostbridgeError] = NetworkError if case == "tls1.0-only" else TrustError
    with FakeServer([*secure_opening(mode, contexts[case]), *login_plain()], after_script=Lure()) as server:
        with pytest.raises(expected):
            open_smtp(channel(server, mode, keystore), local_hostname="client.example")
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established
    assert transcript.after_tls == b""
    assert transcript.tls_error, "the server saw no failed handshake"


# -- the checks can fail -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN])
def test_leak_detector_sees_a_clear_text_login(auth: AuthMethod, keystore: Path) -> None:
    """allow_cleartext_auth on a stripped server does send the password in clear, and the checks see it."""
    login = login_plain() if auth is AuthMethod.PLAIN else login_login()
    script = [*greeting(), *ehlo((b"AUTH PLAIN LOGIN",) if auth is AuthMethod.PLAIN else (b"AUTH LOGIN",)), *login]
    with FakeServer(script, after_script=Lure()) as server:
        settings = channel(server, Protection.STARTTLS_OPTIONAL, keystore, auth=auth, allow_cleartext_auth=True)
        with open_smtp(settings, local_hostname="client.example") as session:
            assert not session.tls
        (transcript,) = server.wait()
    leaks = cleartext_leaks(transcript, PASSWORD)
    assert any("secret crossed in clear" in leak for leak in leaks)
    assert any("AUTH" in leak for leak in leaks)
