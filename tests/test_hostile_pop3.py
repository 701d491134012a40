"""Hostile POP3 servers against the POP3 client: the POP3 analogues of the EAST test cases.

STLS stripping, STLS answered -ERR or nonsense, response injection before the handshake, pre-TLS CAPA tampering,
and bad certificates, in every protection mode each applies to. POP3 has no PREAUTH, no ALERT and no referrals
(those are IMAP's). Each case checks (a) a PostbridgeError, (b) no credential and no USER/PASS/AUTH/APOP in clear
text, (c) nothing the attacker said before TLS was acted on.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import NetworkError, PostbridgeError, TrustError
from postbridge.mail.pop3 import open_pop3
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection
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

STARTTLS_MODES = [Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL]
TLS_MODES = [*STARTTLS_MODES, Protection.TLS]

PRE_TLS_CAPA = (b"USER", b"SASL PLAIN", b"STLS", b"UIDL")
POST_TLS_CAPA = (b"USER", b"SASL PLAIN", b"UIDL")
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


def capa_answer(capa: tuple[bytes, ...]) -> bytes:
    return b"+OK capability list follows\r\n" + b"".join(line + b"\r\n" for line in capa) + b".\r\n"


def greeting() -> list[Step]:
    return [Send(b"+OK fake POP3 ready <1896.697170952@fake.example>\r\n")]


def capa(capa: tuple[bytes, ...]) -> list[Step]:
    return [Expect(b"CAPA"), Send(capa_answer(capa))]


def stls(context: ssl.SSLContext, answer: bytes = b"+OK Begin TLS negotiation\r\n") -> list[Step]:
    return [Expect(b"STLS"), Send(answer), StartTls(context)]


def login_plain() -> list[Step]:
    return [Expect(b"AUTH PLAIN"), Send(b"+OK maildrop locked and ready\r\n")]


def login_user_pass() -> list[Step]:
    return [Expect(b"USER"), Send(b"+OK\r\n"), Expect(b"PASS"), Send(b"+OK maildrop locked and ready\r\n")]


def secure_opening(mode: Protection, context: ssl.SSLContext) -> list[Step]:
    if mode is Protection.TLS:
        return [StartTls(context), *greeting(), *capa(POST_TLS_CAPA)]
    return [*greeting(), *capa(PRE_TLS_CAPA), *stls(context), *capa(POST_TLS_CAPA)]


def lure(line: bytes) -> bytes | None:
    """After the script: lure USER into PASS and AUTH into its response (so a leak shows); answer CAPA and
    QUIT; hang up on anything else."""
    command = line.split(b" ", 1)[0].upper()
    if command == b"USER":
        return b"+OK send PASS\r\n"
    if command == b"AUTH" and len(line.split()) == 2:
        return b"+ \r\n"
    if command == b"CAPA":
        return capa_answer(POST_TLS_CAPA)
    if command == b"QUIT":
        return b"+OK bye\r\n"
    return None


def no_leaks(server: FakeServer) -> list[Transcript]:
    return assert_no_leaks(server, PASSWORD)


# -- 1. STLS stripping ---------------------------------------------------------------------------------------------

STRIPPED: dict[str, list[Step]] = {
    "no-stls": capa((b"USER", b"SASL PLAIN LOGIN", b"UIDL")),
    "look-alikes": capa((b"USER", b"X-STLS", b"STLSX", b"SASL STLS PLAIN")),
    "no-capa": [Expect(b"CAPA"), Send(b"-ERR unknown command\r\n")],  # an RFC 1939-only server
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5, AuthMethod.XOAUTH2])
@pytest.mark.parametrize("case", list(STRIPPED))
def test_stripped_stls_sends_no_credentials(mode: Protection, auth: AuthMethod, case: str, keystore: Path) -> None:
    with FakeServer([*greeting(), *STRIPPED[case]], after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_pop3(channel(server, mode, keystore, auth=auth))
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert b"STLS" not in transcript.cleartext_commands()


# -- 2. STLS refused or answered with nonsense ---------------------------------------------------------------------

STLS_ANSWERS = {
    "ERR": b"-ERR TLS not available right now\r\n",
    "ERR-with-code": b"-ERR [SYS/TEMP] try again later\r\n",
    "garbage": b"\x16\x03\x01\x00 not a POP3 answer\r\n",
    "continuation": b"+ go ahead\r\n",
}


def failed_stls(answer: str) -> list[Step]:
    return [*greeting(), *capa(PRE_TLS_CAPA), Expect(b"STLS"), Send(STLS_ANSWERS[answer])]


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("answer", list(STLS_ANSWERS))
def test_failed_stls_fails_closed(mode: Protection, answer: str, keystore: Path) -> None:
    with FakeServer(failed_stls(answer), after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_pop3(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert transcript.commands_after(b"STLS") == [], "the client went on talking after STLS failed"


@pytest.mark.parametrize("mode", STARTTLS_MODES)
def test_stls_answered_by_hanging_up_fails_closed(mode: Protection, keystore: Path) -> None:
    with FakeServer([*greeting(), *capa(PRE_TLS_CAPA), Expect(b"STLS"), Close()]) as server:
        with pytest.raises(PostbridgeError):
            open_pop3(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.completed and not transcript.tls_established


# -- 3. response injection between the STLS answer and the handshake -----------------------------------------------

INJECTIONS = {
    "capa": b"+OK capability list follows\r\nSASL PLAIN X-EVIL\r\nUSER\r\n.\r\n",
    "login-ok": b"+OK maildrop locked and ready\r\n",
    "err": b"-ERR [AUTH] your password expired, renew it at http://evil.example/\r\n",
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("delayed", [False, True], ids=["same-segment", "separate-segment"])
@pytest.mark.parametrize("injection", list(INJECTIONS))
def test_injected_bytes_before_the_handshake_abort(
    mode: Protection, delayed: bool, injection: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    ok = b"+OK Begin TLS negotiation\r\n"
    extra = INJECTIONS[injection]
    sends = [Send(ok), Send(extra, delay=0.05)] if delayed else [Send(ok + extra)]
    script = [
        *greeting(),
        *capa(PRE_TLS_CAPA),
        Expect(b"STLS"),
        *sends,
        StartTls(contexts["good"]),
        *capa(POST_TLS_CAPA),
        *login_plain(),
    ]
    with FakeServer(script, after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_pop3(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established
    assert transcript.after_tls == b""
    assert transcript.commands_after(b"STLS") == []


# -- 4. pre-TLS CAPA tampering -------------------------------------------------------------------------------------

TAMPERING = {
    # the attacker offers SASL PLAIN and a fake extension; the real server has only USER/PASS
    "fake-sasl": ((b"USER", b"SASL PLAIN X-EVIL", b"STLS", b"X-EVIL"), (b"USER", b"UIDL")),
    # the attacker hides SASL (to push the client to USER/PASS); the real server offers SASL PLAIN
    "hidden-sasl": ((b"STLS",), (b"SASL PLAIN", b"UIDL")),
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("case", list(TAMPERING))
def test_only_the_capa_read_over_tls_counts(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    pre, post = TAMPERING[case]
    login = login_plain() if b"SASL PLAIN" in post else login_user_pass()
    script = [*greeting(), *capa(pre), *stls(contexts["good"]), *capa(post), *login]
    with FakeServer(script, after_script=lure) as server:
        with open_pop3(channel(server, mode, keystore)) as session:
            expected = {line.split()[0].decode(): [w.decode() for w in line.split()[1:]] for line in post}
            assert session.capabilities == expected
            assert "X-EVIL" not in session.capabilities
        (transcript,) = no_leaks(server)
    assert transcript.completed, transcript.script_error
    assert transcript.cleartext_commands() == [b"CAPA", b"STLS"]


# -- 5. certificates -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_good_certificate_is_accepted(mode: Protection, keystore: Path, contexts: dict[str, ssl.SSLContext]) -> None:
    with FakeServer([*secure_opening(mode, contexts["good"]), *login_plain()], after_script=lure) as server:
        with open_pop3(channel(server, mode, keystore)) as session:
            assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
        (transcript,) = no_leaks(server)
    assert transcript.completed and transcript.tls_established


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_bad_certificate_is_refused(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    expected: type[PostbridgeError] = NetworkError if case == "tls1.0-only" else TrustError
    with FakeServer([*secure_opening(mode, contexts[case]), *login_plain()], after_script=lure) as server:
        with pytest.raises(expected):
            open_pop3(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established
    assert transcript.after_tls == b""
    assert transcript.tls_error, "the server saw no failed handshake"


# -- the checks can fail -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN])
def test_leak_detector_sees_a_clear_text_login(auth: AuthMethod, keystore: Path) -> None:
    """allow_cleartext_auth on a stripped server does send the password in clear, and the checks see it."""
    login = login_plain() if auth is AuthMethod.PLAIN else login_user_pass()
    script = [*greeting(), *capa((b"USER", b"SASL PLAIN")), *login]
    with FakeServer(script, after_script=lure) as server:
        settings = channel(server, Protection.STARTTLS_OPTIONAL, keystore, auth=auth, allow_cleartext_auth=True)
        with open_pop3(settings) as session:
            assert not session.tls
        (transcript,) = server.wait()
    leaks = cleartext_leaks(transcript, PASSWORD)
    assert any("secret crossed in clear" in leak for leak in leaks)
    assert any(("AUTH" if auth is AuthMethod.PLAIN else "PASS") in leak for leak in leaks)
