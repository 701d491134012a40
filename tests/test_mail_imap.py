"""The IMAP client against a real Dovecot: every protection mode, directly and through hub + connector."""

from __future__ import annotations

from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, NetworkError, TrustError
from postbridge.mail.common import TlsDowngrade
from postbridge.mail.imap import open_session
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Credentials, Protection, Proxy
from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

MESSAGE = b"From: a@corp.example\r\nSubject: imap test\r\nMessage-ID: <imap-1@corp.example>\r\n\r\nbody text\r\n"


def settings(dovecot: Dovecot, store: Path, port: int, protection: Protection, **extra: object) -> ChannelSettings:
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


@pytest.mark.parametrize(
    ("protection", "port_name"),
    [
        (Protection.STARTTLS_MANDATORY, "imap_port"),
        (Protection.STARTTLS_OPTIONAL, "imap_port"),
        (Protection.TLS, "imaps_port"),
    ],
)
@pytest.mark.parametrize("auth", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5])
def test_reads_mail_in_every_tls_mode(
    dovecot: Dovecot, keystore: Path, protection: Protection, port_name: str, auth: AuthMethod
) -> None:
    dovecot.deliver("alice", MESSAGE)
    channel = settings(dovecot, keystore, getattr(dovecot, port_name), protection, auth=auth)
    with open_session(channel) as session:
        assert session.tls and session.tls_version in ("TLSv1.2", "TLSv1.3")
        session.select("INBOX")
        uids = session.search("ALL")
        assert MESSAGE in [session.fetch(uid) for uid in uids]
        # BODY.PEEK[] leaves the message unread
        assert set(uids) <= set(session.search("UNSEEN")) | set(session.search("SEEN"))


def test_capabilities_are_read_again_after_starttls(dovecot: Dovecot, keystore: Path) -> None:
    with open_session(settings(dovecot, keystore, dovecot.imap_port, Protection.STARTTLS_MANDATORY)) as session:
        assert "STARTTLS" in session.capabilities_before_tls
        assert "STARTTLS" not in session.capabilities  # the post-TLS list, not the pre-TLS one


def test_mandatory_starttls_against_an_implicit_tls_port_explains_the_mismatch(
    dovecot: Dovecot, keystore: Path
) -> None:
    with pytest.raises(NetworkError) as caught:
        open_session(settings(dovecot, keystore, dovecot.imaps_port, Protection.STARTTLS_MANDATORY, timeout=2.0))
    assert "tcp-tls" in caught.value.hint or "'tls'" in caught.value.hint


def test_implicit_tls_against_a_plain_port_explains_the_mismatch(dovecot: Dovecot, keystore: Path) -> None:
    with pytest.raises(NetworkError) as caught:
        open_session(settings(dovecot, keystore, dovecot.imap_port, Protection.TLS, timeout=3.0))
    assert "starttls-mandatory" in caught.value.hint


def test_no_credentials_in_clear_text_over_the_internet(dovecot: Dovecot, keystore: Path) -> None:
    with pytest.raises(TlsDowngrade, match="without TLS"):
        open_session(settings(dovecot, keystore, dovecot.imap_port, Protection.OFF))


def test_unknown_ca_and_wrong_name_are_trust_errors(dovecot: Dovecot, keystore: Path, tmp_path: Path) -> None:
    import trustme

    other = TrustStore(tmp_path / "other")
    other.add(trustme.CA().cert_pem.bytes(), alias="someone-else")
    with pytest.raises(TrustError, match="not trusted") as unknown:
        open_session(settings(dovecot, keystore, dovecot.imaps_port, Protection.TLS, keystore=other.directory))
    assert "keystore" in unknown.value.hint
    with pytest.raises(TrustError) as wrong_name:
        open_session(settings(dovecot, keystore, dovecot.imaps_port, Protection.TLS, tls_server_name="other.example"))
    assert "tls_server_name" in wrong_name.value.hint


def test_wrong_password_is_an_authentication_error_without_the_password(dovecot: Dovecot, keystore: Path) -> None:
    with pytest.raises(AuthenticationError) as caught:
        open_session(
            settings(
                dovecot,
                keystore,
                dovecot.imap_port,
                Protection.STARTTLS_MANDATORY,
                credentials=Credentials("alice", "hunter2"),
            )
        )
    assert "hunter2" not in str(caught.value)


@pytest.mark.e2e
def test_through_hub_and_connector_both_tls_setups(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path, test_pki: TestPki
) -> None:
    dovecot.deliver("alice", MESSAGE)
    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)
    # STARTTLS end to end over a 'tcp' mapping; the virtual host is the server's real name
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    starttls = ChannelSettings(
        address=HostPort("mail.corp.example", 143),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("alice", "secret"),
        keystore=keystore,
    )
    with open_session(starttls) as session:
        session.select("INBOX")
        assert session.tls
        assert MESSAGE in [session.fetch(uid) for uid in session.search("ALL")]
    # implicit TLS done by the connector over a 'tcp-tls' mapping; plain IMAP inside the tunnel
    cli(connected.home, "connector", "truststore", "add", str(test_pki.root_pem))
    stack.map(connected, "imaps.corp.example:993", f"{dovecot.host}:{dovecot.imaps_port}", "--protocol", "tcp-tls",
              "--tls-server-name", "mail.corp.example")  # fmt: skip
    tcp_tls = ChannelSettings(
        address=HostPort("imaps.corp.example", 993),
        proxy=Proxy.ON_PREMISE,
        location_id="dc1",
        binding=binding,
        protection=Protection.OFF,
        credentials=Credentials("alice", "secret"),
    )
    with open_session(tcp_tls) as session:
        session.select("INBOX")
        assert not session.tls
        assert MESSAGE in [session.fetch(uid) for uid in session.search("ALL")]


def test_boolean_settings_are_parsed_not_truth_tested() -> None:
    from postbridge.errors import ConfigurationError
    from postbridge.mail.settings import channel_from_mapping

    base = {"address": "mail.corp.example:143"}
    assert channel_from_mapping({**base, "allow_cleartext_auth": "false"}, source="t").allow_cleartext_auth is False
    assert channel_from_mapping({**base, "allow_cleartext_auth": True}, source="t").allow_cleartext_auth is True
    with pytest.raises(ConfigurationError, match="is not true or false"):
        channel_from_mapping({**base, "use_system_trust": "maybe"}, source="t")
    with pytest.raises(ConfigurationError, match="not a number of seconds"):
        channel_from_mapping({**base, "timeout": "abc"}, source="t")


def test_line_breaks_in_credentials_never_reach_the_server(dovecot: Dovecot, keystore: Path) -> None:
    from postbridge.errors import ConfigurationError

    injected = Credentials("alice", "secret\r\na2 DELETE INBOX")
    with pytest.raises(ConfigurationError):
        open_session(
            settings(
                dovecot,
                keystore,
                dovecot.imap_port,
                Protection.STARTTLS_MANDATORY,
                auth=AuthMethod.LOGIN,
                credentials=injected,
            )
        )


@pytest.mark.e2e
def test_hub_refusals_are_explained_to_the_mail_adapter(stack: Stack, connected: Connector, keystore: Path) -> None:
    from postbridge.mail.transport import MailConnectError

    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)

    def channel(location: str, secret: str = "") -> ChannelSettings:
        used = Binding(socks=binding.socks, subaccount="acme", client_secret=secret) if secret else binding
        return ChannelSettings(
            address=HostPort("unmapped.corp.example", 143),
            proxy=Proxy.ON_PREMISE,
            location_id=location,
            binding=used,
            protection=Protection.STARTTLS_MANDATORY,
            credentials=Credentials("alice", "secret"),
            keystore=keystore,
        )

    with pytest.raises(MailConnectError) as unmapped:
        open_session(channel("dc1"))
    assert unmapped.value.socks_reply == 2
    assert "Connection not allowed by ruleset" in unmapped.value.message
    assert "postbridge connector mapping add unmapped.corp.example:143" in unmapped.value.hint
    with pytest.raises(MailConnectError) as elsewhere:
        open_session(channel("dc9"))
    assert elsewhere.value.socks_reply == 3 and "location_id" in elsewhere.value.hint
    with pytest.raises(MailConnectError) as refused:
        open_session(channel("dc1", secret="wrong"))
    assert refused.value.socks_reply == 5
