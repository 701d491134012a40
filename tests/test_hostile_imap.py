"""Hostile IMAP servers against the IMAP client: our own port of the public EAST test cases.

Poddebniak et al., "Why TLS is better without STARTTLS" (USENIX Security 2021): STARTTLS stripping, STARTTLS
answered NO/BAD/BYE/garbage, PREAUTH, response injection before the handshake, pre-TLS capability tampering, ALERT
spoofing, referrals, and bad certificates. Every case runs in every protection mode it applies to and checks that
(a) the client raised a PostbridgeError, (b) the fake server never saw a credential or an authentication command
in clear text, and (c) nothing the attacker said before TLS was acted on.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, NetworkError, PostbridgeError, TrustError
from postbridge.mail.imap import open_session
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection
from tests.hostile.certs import SERVER_NAME, old_tls_client_context, root_keystore, server_contexts
from tests.hostile.servers import (
    Close,
    Expect,
    FakeServer,
    Responder,
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

PRE_TLS_CAPS = b"IMAP4rev1 STARTTLS LOGINDISABLED"
POST_TLS_CAPS = b"IMAP4rev1 AUTH=PLAIN UIDPLUS MOVE"
BAD_CERTIFICATES = ["self-signed", "unknown-root", "wrong-host", "expired", "missing-intermediate", "tls1.0-only"]


# -- fixtures and script pieces -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keystore(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> Path:
    """The client's keystore: the test root only (no intermediate)."""
    return root_keystore(test_pki, tmp_path_factory.mktemp("keystore"))


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> dict[str, ssl.SSLContext]:
    """Server TLS contexts: 'good' and every bad certificate case."""
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


def greeting(text: bytes = b"* OK [CAPABILITY IMAP4rev1] fake IMAP ready") -> list[Step]:
    return [Send(text + b"\r\n")]


def capability(caps: bytes, extra: bytes = b"") -> list[Step]:
    """Answer the client's CAPABILITY; ``extra`` are untagged lines sent before the answer."""
    return [Expect(b"CAPABILITY", tagged=True), Send(extra + b"* CAPABILITY " + caps + b"\r\n{tag} OK done\r\n")]


def starttls(context: ssl.SSLContext, answer: bytes = b"{tag} OK Begin TLS negotiation now\r\n") -> list[Step]:
    return [Expect(b"STARTTLS", tagged=True), Send(answer), StartTls(context)]


def login_plain(answer: bytes = b"{tag} OK logged in\r\n") -> list[Step]:
    return [Expect(b"AUTHENTICATE PLAIN", tagged=True), Send(b"+ \r\n"), Expect(b""), Send(answer)]


def secure_opening(
    mode: Protection, context: ssl.SSLContext, *, pre_caps: bytes = PRE_TLS_CAPS, post_caps: bytes = POST_TLS_CAPS
) -> list[Step]:
    """Greeting and capabilities up to the point where the client speaks inside TLS."""
    if mode is Protection.TLS:
        return [StartTls(context), *greeting(), *capability(post_caps)]
    return [*greeting(), *capability(pre_caps), *starttls(context), *capability(post_caps)]


def responder(caps: bytes = POST_TLS_CAPS) -> Responder:
    """After the script: answer CAPABILITY and LOGOUT, invite an AUTHENTICATE to send its secret (so that a leak
    shows), and hang up on anything else."""

    def answer(line: bytes) -> bytes | None:
        tag, _, rest = line.partition(b" ")
        command = rest.split(b" ", 1)[0].upper()
        if command == b"CAPABILITY":
            return b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n"
        if command == b"AUTHENTICATE":
            return b"+ \r\n"
        if command == b"LOGOUT":
            return b"* BYE see you\r\n" + tag + b" OK done\r\n"
        return None

    return answer


lure = responder()


def no_leaks(server: FakeServer) -> list[Transcript]:
    return assert_no_leaks(server, PASSWORD)


# -- 1. STARTTLS stripping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5, AuthMethod.XOAUTH2])
@pytest.mark.parametrize(
    "caps",
    [b"IMAP4rev1 AUTH=PLAIN LOGIN-REFERRALS", b"IMAP4rev1 X-STARTTLS STARTTLSX AUTH=PLAIN", b"IMAP4rev1"],
    ids=["no-starttls", "look-alikes", "bare"],
)
def test_stripped_starttls_sends_no_credentials(
    mode: Protection, auth: AuthMethod, caps: bytes, keystore: Path
) -> None:
    with FakeServer([*greeting(), *capability(caps)], after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore, auth=auth))
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert b"STARTTLS" not in transcript.cleartext_commands()


# -- 2. STARTTLS refused or answered with nonsense ----------------------------------------------------------------

STARTTLS_ANSWERS = {
    "NO": b"{tag} NO STARTTLS is not available right now\r\n",
    "BAD": b"{tag} BAD unknown command\r\n",
    "BYE": b"* BYE server shutting down\r\n",
    "garbage": b"\x16\x03\x01\x00 not an IMAP answer\r\n",
    "foreign-tag": b"ZZZZ1 OK Begin TLS negotiation now\r\n",
    "NO-with-continuation": b"+ go ahead\r\n{tag} NO not now\r\n",
}


def failed_starttls(answer: str) -> list[Step]:
    return [*greeting(), *capability(PRE_TLS_CAPS), Expect(b"STARTTLS", tagged=True), Send(STARTTLS_ANSWERS[answer])]


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("answer", list(STARTTLS_ANSWERS), ids=list(STARTTLS_ANSWERS))
def test_failed_starttls_fails_closed(mode: Protection, answer: str, keystore: Path) -> None:
    with FakeServer(failed_starttls(answer), after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.completed
    assert not set(transcript.commands_after(b"STARTTLS")) - {b"LOGOUT"}, "the client went on after STARTTLS"


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("answer", [b"", b"* OK Begin TLS negotiation now\r\n"], ids=["hang-up", "untagged-OK"])
def test_starttls_answered_by_hanging_up_fails_closed(mode: Protection, answer: bytes, keystore: Path) -> None:
    script = [*greeting(), *capability(PRE_TLS_CAPS), Expect(b"STARTTLS", tagged=True), Send(answer), Close()]
    with FakeServer(script) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.completed and not transcript.tls_established


# -- 3. PREAUTH ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("caps", [b"IMAP4rev1", b"IMAP4rev1 STARTTLS"], ids=["plain", "starttls-offered"])
def test_preauth_greeting_is_refused(mode: Protection, caps: bytes, keystore: Path) -> None:
    script = [*greeting(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as alice"), *capability(caps)]
    with FakeServer(script, after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.completed
    # no mailbox was touched in clear: at most a LOGOUT followed the capability query
    assert set(transcript.commands_after(b"CAPABILITY")) <= {b"LOGOUT"}


# -- 4. response injection between the STARTTLS answer and the handshake ------------------------------------------

INJECTIONS = {
    "capability": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN X-EVIL\r\n",
    "capability-with-tagged-ok": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN X-EVIL\r\n{next_tag} OK CAPABILITY done\r\n",
    "fake-login-ok": b"{next_tag} OK [CAPABILITY IMAP4rev1 X-EVIL] CAPABILITY done\r\n",
    "alert": b"* OK [ALERT] INJECTED your account is locked, call +1 555 0100\r\n",
}


def injected(injection: str, context: ssl.SSLContext, *, delayed: bool = False) -> list[Step]:
    """The STARTTLS answer followed by injected bytes (in the same segment, or 50 ms later), then real TLS."""
    ok = b"{tag} OK Begin TLS negotiation now\r\n"
    extra = INJECTIONS[injection]
    sends = [Send(ok), Send(extra, delay=0.05)] if delayed else [Send(ok + extra)]
    return [
        *greeting(),
        *capability(PRE_TLS_CAPS),
        Expect(b"STARTTLS", tagged=True),
        *sends,
        StartTls(context),
        *capability(POST_TLS_CAPS),
        *login_plain(),
    ]


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("delayed", [False, True], ids=["same-segment", "separate-segment"])
@pytest.mark.parametrize("injection", list(INJECTIONS), ids=list(INJECTIONS))
def test_injected_bytes_before_the_handshake_abort(
    mode: Protection, delayed: bool, injection: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    with FakeServer(injected(injection, contexts["good"], delayed=delayed), after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    # nothing of it was acted on: no TLS session came about, so no login and no command inside it either
    assert not transcript.tls_established
    assert transcript.after_tls == b""
    assert not set(transcript.commands_after(b"STARTTLS")) - {b"LOGOUT"}


def test_starttls_answer_sent_before_the_command_aborts(keystore: Path, contexts: dict[str, ssl.SSLContext]) -> None:
    """An attacker answers STARTTLS before the client asks (the OK waits in the client's buffer); the real answer
    then arrives where the TLS handshake should begin."""
    script = [
        *greeting(),
        *capability(PRE_TLS_CAPS + b"\r\n{next_tag} OK Begin TLS negotiation now"),
        Expect(b"STARTTLS", tagged=True),
        Send(b"{tag} OK Begin TLS negotiation now\r\n"),
        StartTls(contexts["good"]),
        *capability(POST_TLS_CAPS),
        *login_plain(),
    ]
    with FakeServer(script, after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, Protection.STARTTLS_MANDATORY, keystore))
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established
    assert transcript.after_tls == b""


FAIL_CLOSED = [f"answer-{name}" for name in STARTTLS_ANSWERS] + [f"injection-{name}" for name in INJECTIONS]


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("case", FAIL_CLOSED)
def test_nothing_is_sent_after_a_failed_or_tampered_starttls(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    """Failing closed means hanging up: not even a LOGOUT. A LOGOUT makes imaplib read the rest of the stream,
    so it parses the injected lines and takes an injected '{next_tag} OK' as the answer to the LOGOUT."""
    kind, _, name = case.partition("-")
    script = failed_starttls(name) if kind == "answer" else injected(name, contexts["good"])
    with FakeServer(script, after_script=lure) as server:
        with pytest.raises(PostbridgeError):
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert transcript.commands_after(b"STARTTLS") == [], "the client did not hang up at once"


# -- 5. pre-TLS capability tampering ------------------------------------------------------------------------------

TAMPERING = {
    # attacker adds a fake extension and LOGINDISABLED; the real list after TLS offers AUTH=PLAIN
    "fake-extension": (b"IMAP4rev1 STARTTLS AUTH=PLAIN LOGINDISABLED X-EVIL", b"{tag} OK Begin TLS\r\n", b""),
    # attacker claims AUTH=PLAIN; the real server does not offer it, so LOGIN must be used
    "fake-auth-plain": (b"IMAP4rev1 STARTTLS AUTH=PLAIN", b"{tag} OK Begin TLS\r\n", b"IMAP4rev1 UIDPLUS"),
    # capabilities smuggled into the STARTTLS answer's response code
    "response-code": (
        PRE_TLS_CAPS,
        b"{tag} OK [CAPABILITY IMAP4rev1 AUTH=PLAIN X-EVIL] Begin TLS\r\n",
        b"IMAP4rev1 UIDPLUS MOVE",
    ),
    # an untagged CAPABILITY sent with the STARTTLS answer; the real server has no AUTH=PLAIN
    "untagged-with-answer": (
        PRE_TLS_CAPS,
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN X-EVIL\r\n{tag} OK Begin TLS\r\n",
        b"IMAP4rev1 UIDPLUS",
    ),
}


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("case", list(TAMPERING), ids=list(TAMPERING))
def test_only_the_capabilities_read_over_tls_count(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    pre_caps, starttls_answer, post_caps = TAMPERING[case]
    post_caps = post_caps or POST_TLS_CAPS
    login: list[Step] = (
        login_plain() if b"AUTH=PLAIN" in post_caps else [Expect(b"LOGIN", tagged=True), Send(b"{tag} OK hi\r\n")]
    )
    script = [
        *greeting(),
        *capability(pre_caps),
        *starttls(contexts["good"], starttls_answer),
        *capability(post_caps),
        *login,
    ]
    with FakeServer(script, after_script=responder(post_caps)) as server:
        with open_session(channel(server, mode, keystore)) as session:
            assert session.capabilities == tuple(post_caps.decode().upper().split())
            assert "X-EVIL" not in session.capabilities
        (transcript,) = no_leaks(server)
    assert transcript.completed, transcript.script_error
    assert transcript.cleartext_commands() == [b"CAPABILITY", b"STARTTLS"]


# -- 6. ALERT spoofing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("alert_over_tls", [False, True], ids=["pre-tls-only", "control-alert-over-tls"])
def test_pre_tls_alerts_do_not_survive_into_the_session(
    mode: Protection, alert_over_tls: bool, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    # imaplib keeps an ALERT as untagged_responses['ALERT'] (with the data inside the brackets, if any)
    post_tls_alert = b"* OK [ALERT POST-TLS] maintenance tonight\r\n" if alert_over_tls else b""
    script = [
        *greeting(b"* OK [ALERT] PRE-TLS-1 your password expired, renew it at http://evil.example/"),
        *capability(PRE_TLS_CAPS, extra=b"* OK [ALERT PRE-TLS-2] mailbox full\r\n"),
        *starttls(contexts["good"], b"* OK [ALERT PRE-TLS-3] hi\r\n{tag} OK [ALERT PRE-TLS-4] Begin TLS\r\n"),
        *capability(POST_TLS_CAPS, extra=post_tls_alert),
        *login_plain(),
    ]
    with FakeServer(script, after_script=lure) as server:
        with open_session(channel(server, mode, keystore)) as session:
            responses = session.imap.untagged_responses
            assert "PRE-TLS" not in repr(responses)
            # the control shows that this check does see an ALERT that was really said
            assert ("ALERT" in responses) is alert_over_tls
            assert ("POST-TLS" in repr(responses)) is alert_over_tls
        (transcript,) = no_leaks(server)
    assert transcript.completed, transcript.script_error


# -- 7. referrals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", STARTTLS_MODES)
@pytest.mark.parametrize("offer_starttls", [True, False], ids=["starttls-refused", "starttls-stripped"])
def test_pre_tls_referrals_are_not_followed(mode: Protection, offer_starttls: bool, keystore: Path) -> None:
    with FakeServer(greeting(b"* OK fake trap")) as trap:
        referral = f"[REFERRAL imap://{USER}@127.0.0.1:{trap.port}/]".encode()
        caps = PRE_TLS_CAPS if offer_starttls else b"IMAP4rev1 LOGIN-REFERRALS"
        script: list[Step] = [*greeting(b"* OK " + referral + b" use the other server"), *capability(caps)]
        if offer_starttls:
            script += [Expect(b"STARTTLS", tagged=True), Send(b"{tag} NO " + referral + b" try there\r\n")]
        with FakeServer(script, after_script=lure) as server:
            with pytest.raises(PostbridgeError):
                open_session(channel(server, mode, keystore))
            no_leaks(server)
        assert trap.wait() == [], "the client followed a referral to another host"


@pytest.mark.parametrize("mode", STARTTLS_MODES)
def test_pre_tls_referral_is_forgotten_after_tls(
    mode: Protection, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    with FakeServer(greeting(b"* OK fake trap")) as trap:
        referral = f"[REFERRAL imap://{USER}@127.0.0.1:{trap.port}/]".encode()
        script = [
            *greeting(b"* OK " + referral + b" PRE-TLS-REFERRAL"),
            *capability(PRE_TLS_CAPS, extra=b"* NO " + referral + b" PRE-TLS-REFERRAL\r\n"),
            *starttls(contexts["good"]),
            *capability(POST_TLS_CAPS),
            *login_plain(),
        ]
        with FakeServer(script, after_script=lure) as server:
            with open_session(channel(server, mode, keystore)) as session:
                assert "REFERRAL" not in session.imap.untagged_responses
                assert "PRE-TLS-REFERRAL" not in repr(session.imap.untagged_responses)
            (transcript,) = no_leaks(server)
        assert transcript.completed, transcript.script_error
        assert trap.wait() == []


@pytest.mark.parametrize("mode", TLS_MODES)
def test_login_referral_is_not_followed(mode: Protection, keystore: Path, contexts: dict[str, ssl.SSLContext]) -> None:
    with FakeServer(greeting(b"* OK fake trap")) as trap:
        referral = f"[REFERRAL imap://{USER}@127.0.0.1:{trap.port}/INBOX]".encode()
        script = [
            *secure_opening(mode, contexts["good"]),
            *login_plain(b"{tag} NO " + referral + b" your mailbox moved there\r\n"),
        ]
        with FakeServer(script, after_script=lure) as server:
            with pytest.raises(AuthenticationError):
                open_session(channel(server, mode, keystore))
            no_leaks(server)
        assert trap.wait() == [], "the client followed a login referral to another host"


# -- 8. certificates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_good_certificate_is_accepted(mode: Protection, keystore: Path, contexts: dict[str, ssl.SSLContext]) -> None:
    """The control for the certificate cases: the same script with the good chain logs in."""
    with FakeServer([*secure_opening(mode, contexts["good"]), *login_plain()], after_script=lure) as server:
        with open_session(channel(server, mode, keystore)) as session:
            assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
            assert session.capabilities == tuple(POST_TLS_CAPS.decode().upper().split())
        (transcript,) = no_leaks(server)
    assert transcript.completed and transcript.tls_established


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_bad_certificate_is_refused(
    mode: Protection, case: str, keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    expected: type[PostbridgeError] = NetworkError if case == "tls1.0-only" else TrustError
    with FakeServer([*secure_opening(mode, contexts[case]), *login_plain()], after_script=lure) as server:
        with pytest.raises(expected) as caught:
            open_session(channel(server, mode, keystore))
        (transcript,) = no_leaks(server)
    assert not transcript.tls_established, transcript
    assert transcript.after_tls == b""
    assert transcript.tls_error, "the server saw no failed handshake"
    if case == "tls1.0-only":
        assert "TLS 1.2" in caught.value.hint, caught.value


def test_tls10_server_really_speaks_only_tls10(contexts: dict[str, ssl.SSLContext]) -> None:
    """Makes the TLS 1.0 case meaningful: the local OpenSSL does offer TLS 1.0 server-side (and nothing newer)."""
    with FakeServer([StartTls(contexts["tls1.0-only"]), Send(b"* OK hi\r\n")]) as server:
        with (
            socket.create_connection((server.host, server.port), timeout=3) as raw,
            old_tls_client_context().wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            assert tls.version() == "TLSv1"
            assert tls.recv(100) == b"* OK hi\r\n"
        server.wait()


# -- the fake server itself ---------------------------------------------------------------------------------------


def test_leak_detector_sees_a_clear_text_login(keystore: Path) -> None:
    """The checks above can fail: allow_cleartext_auth on a stripped server does send the password in clear."""
    script: Sequence[Step] = [
        *greeting(),
        *capability(b"IMAP4rev1 AUTH=PLAIN"),
        *login_plain(),
    ]
    with FakeServer(script, after_script=lure) as server:
        with open_session(
            channel(server, Protection.STARTTLS_OPTIONAL, keystore, allow_cleartext_auth=True)
        ) as session:
            assert not session.tls
        (transcript,) = server.wait()
    leaks = cleartext_leaks(transcript, PASSWORD)
    assert any("AUTHENTICATE" in leak for leak in leaks)
    assert any("secret crossed in clear" in leak for leak in leaks)


def test_the_clear_text_greeting_is_discarded_with_the_rest_of_the_pre_tls_state(
    keystore: Path, contexts: dict[str, ssl.SSLContext]
) -> None:
    """An attacker's greeting text (a fake warning, say) must not outlive STARTTLS."""
    from postbridge.mail.imap import ImapSession

    steps = [
        Send(b"* OK ATTACKER SAYS: call +1-555-0100\r\n"),
        Expect(b"CAPABILITY", tagged=True),
        Send(b"* CAPABILITY IMAP4rev1 STARTTLS\r\n{tag} OK done\r\n"),
        Expect(b"STARTTLS", tagged=True),
        Send(b"{tag} OK go\r\n"),
        StartTls(contexts["good"]),
    ]

    def after(line: bytes) -> bytes | None:
        tag = line.split(b" ", 1)[0]
        if b"CAPABILITY" in line.upper():
            return b"* CAPABILITY " + POST_TLS_CAPS + b"\r\n" + tag + b" OK done\r\n"
        if b"LOGIN" in line.upper() or b"AUTHENTICATE" in line.upper():
            return tag + b" OK logged in\r\n"
        return None

    with FakeServer(steps, after_script=after) as server:
        session = ImapSession(channel(server, Protection.STARTTLS_MANDATORY, keystore, auth=AuthMethod.NONE))
        try:
            with contextlib.suppress(PostbridgeError):
                session.connect()  # auth 'none' on a server that wants a login: refused after TLS
            imap = session._imap
            assert imap is not None and session.tls
            assert b"ATTACKER" not in (imap.welcome or b"")
        finally:
            session.abort()
