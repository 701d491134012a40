"""The hub API client and the diagnosis of SOCKS5 refusals, against the real hub and connector processes.

Each refusal is first produced for real (the SOCKS5 reply byte is asserted), then explained by the hub. Every text
the client returns or raises is checked for the client secret and for an access token (a JWT starts ``eyJ``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, ConfigurationError, NetworkError, PostbridgeTimeout, TrustError
from postbridge.mail.hub_api import HubApi, NoConnectorError
from postbridge.mail.hub_diagnosis import HubDiagnosis, diagnose_refusal, mapping_of
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Protection, Proxy
from tests.harness import Connector, Stack, cli, socks_connect
from tests.servers import LOOPBACK, free_port
from tests.servers.dovecot import Dovecot

OTHER_CA = trustme.CA().cert_pem.bytes().decode()


def binding_of(stack: Stack) -> Binding:
    printed = cli(
        stack.cloud_home,
        "cloud",
        "binding",
        stack.subaccount,
        "--secret",
        stack.secret,
        "--socks",
        f"{LOOPBACK}:{stack.socks_port}",
        "--api",
        f"{LOOPBACK}:{stack.ports['api']}",
    ).stdout
    return Binding.from_json(json.loads(printed), source="cloud binding")


def channel(binding: Binding, address: str, location: str = "dc1", **extra: object) -> ChannelSettings:
    host, _, port = address.rpartition(":")
    values: dict[str, object] = {
        "address": HostPort(host, int(port)),
        "proxy": Proxy.ON_PREMISE,
        "location_id": location,
        "binding": binding,
        "auth": AuthMethod.NONE,
        "timeout": 10.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def refusal(stack: Stack, address: str, location: str = "dc1") -> int:
    """The SOCKS5 reply the hub really gives for ``address`` at ``location``."""
    host, _, port = address.rpartition(":")
    reply, sock = socks_connect(stack.socks_port, host, int(port), f"{stack.subaccount}/{location}", stack.secret)
    sock.close()
    return reply


def assert_clean(*texts: str, secrets: tuple[str, ...] = ()) -> None:
    for text in texts:
        assert "eyJ" not in text, text  # no JWT (access token)
        for secret in secrets:
            assert secret not in text, text


def diagnosis_text(diagnosis: HubDiagnosis) -> str:
    return "\n".join((*diagnosis.evidence, diagnosis.fix))


# --- without processes --------------------------------------------------------------------------------------


def unreachable_binding() -> Binding:
    return Binding(
        socks=HostPort(LOOPBACK, free_port()),
        subaccount="acme",
        client_secret="s3cret-value-not-to-show",
        ca_certificate=OTHER_CA,
        token_url=f"https://{LOOPBACK}:{free_port()}/oauth/token",
    )


def test_binding_without_token_url_or_with_a_foreign_one_is_a_configuration_error() -> None:
    binding = unreachable_binding()
    with pytest.raises(ConfigurationError, match="no token_service_url") as caught:
        HubApi(dataclasses.replace(binding, token_url=""))
    assert "postbridge cloud binding" in caught.value.hint
    for url in ("http://127.0.0.1:1/oauth/token", "https://127.0.0.1:1/token", "https://u:pw@127.0.0.1:1/oauth/token"):
        with pytest.raises(ConfigurationError, match="is not the hub's") as caught:
            HubApi(dataclasses.replace(binding, token_url=url))
        assert "pw" not in str(caught.value)
    with pytest.raises(TrustError, match="ca_certificate"):
        HubApi(dataclasses.replace(binding, ca_certificate="not a certificate"))


def test_unreachable_api_is_a_network_error_and_one_evidence_line() -> None:
    binding = unreachable_binding()
    with HubApi(binding) as api, pytest.raises(NetworkError, match="cannot reach the hub's API") as caught:
        api.connectors()
    assert "Connection refused" in caught.value.message and caught.value.hint
    for reply in (0x01, 0x02, 0x03, 0x04):
        diagnosis = diagnose_refusal(channel(binding, "mail.corp.example:143"), reply)
        [line] = diagnosis.evidence
        assert line.startswith("could not ask the hub: cannot reach the hub's API") and diagnosis.fix == ""
        assert_clean(line, secrets=(binding.client_secret,))
    assert mapping_of(channel(binding, "mail.corp.example:143")) is None


def test_silent_api_is_a_timeout() -> None:
    with socket.create_server((LOOPBACK, 0)) as silent:  # accepts (in the backlog) and never answers TLS
        port = silent.getsockname()[1]
        binding = dataclasses.replace(unreachable_binding(), token_url=f"https://{LOOPBACK}:{port}/oauth/token")
        with HubApi(binding, timeout=0.3) as api, pytest.raises(PostbridgeTimeout, match="did not answer"):
            api.mappings("dc1")


def test_other_reply_codes_ask_nothing() -> None:
    settings = channel(unreachable_binding(), "mail.corp.example:143")
    for reply in (0x00, 0x05, 0x07, 0x08, 0xFF):
        assert diagnose_refusal(settings, reply) == HubDiagnosis(())  # asking would have given "could not ask"


# --- against the real hub and connector ---------------------------------------------------------------------


@pytest.mark.e2e
def test_connectors_mappings_and_check_of_a_reachable_mapping(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    stack.map(connected, "svc.corp.example:25", f"{LOOPBACK}:{line_server}")
    binding = binding_of(stack)
    with HubApi(binding) as api:
        requests: list[str] = []
        api._client.event_hooks["request"].append(lambda request: requests.append(request.url.path))
        [listed] = api.connectors()
        assert (listed["connector_id"], listed["location"]) == (connected.identity["connector_id"], "dc1")
        [mapping] = api.mappings("dc1")
        assert (mapping["virtual"], mapping["internal"], mapping["protocol"]) == (
            "svc.corp.example:25",
            f"{LOOPBACK}:{line_server}",
            "tcp",
        )
        answer = api.check("dc1", HostPort("svc.corp.example", 25))
        assert answer["reachable"] is True and answer["protocol_seen"] == "SMTP"
        assert answer["summary"].startswith(f"reachable (SMTP greeting from {LOOPBACK}:{line_server}")
        unmapped = api.check("dc1", HostPort("other.corp.example", 25))
        assert unmapped["mapped"] is False and "other.corp.example:25" in unmapped["error"]
        assert requests.count("/oauth/token") == 1  # the token is fetched once and reused
        with pytest.raises(NoConnectorError, match="no connector is connected at location 'dc2'") as caught:
            api.mappings("dc2")
        assert caught.value.location == "dc2" and "postbridge connector run" in caught.value.hint
        with pytest.raises(NoConnectorError, match="the default location"):
            api.check("", HostPort("svc.corp.example", 25))
        passing = diagnose_refusal(channel(binding, "svc.corp.example:25"), 0x04, api=api)
        assert passing.evidence[-1] == "the internal server answers now: the refusal may have been passing"
        assert passing.fix.startswith("try again")
        assert len(api.connectors()) == 1  # a given client is used, not closed
        assert requests.count("/oauth/token") == 1
    found = mapping_of(channel(binding, "SVC.corp.example:25"))
    assert found is not None and found["internal"] == f"{LOOPBACK}:{line_server}"
    assert mapping_of(channel(binding, "svc.corp.example:26")) is None
    assert mapping_of(channel(binding, "svc.corp.example:25", location="dc2")) is None


@pytest.mark.e2e
def test_0x02_lists_the_mappings_and_gives_the_add_command(
    stack: Stack, connected: Connector, line_server: int
) -> None:
    stack.map(connected, "mail.corp.example:143", f"{LOOPBACK}:{line_server}")
    stack.map(connected, "smtp.corp.example:25", f"{LOOPBACK}:{line_server}")
    binding = binding_of(stack)
    assert refusal(stack, "mail.corp.example:144") == 0x02
    typo = diagnose_refusal(channel(binding, "mail.corp.example:144"), 0x02)
    assert typo.evidence[:3] == (
        "mappings the hub knows for location 'dc1':",
        f"  mail.corp.example:143 -> {LOOPBACK}:{line_server} (tcp)",
        f"  smtp.corp.example:25 -> {LOOPBACK}:{line_server} (tcp)",
    )
    assert any(line.startswith("did you mean mail.corp.example:143?") for line in typo.evidence)
    assert "postbridge connector mapping add mail.corp.example:144 --to HOST:PORT" in typo.fix
    other = diagnose_refusal(channel(binding, "imap.corp.example:993", protection=Protection.OFF), 0x02)
    assert not any("did you mean" in line for line in other.evidence)
    assert "postbridge connector mapping add imap.corp.example:993 --to HOST:PORT --protocol tcp-tls" in other.fix
    host_typo = diagnose_refusal(channel(binding, "smtp.corp.exampel:25"), 0x02)
    assert "did you mean smtp.corp.example:25?" in diagnosis_text(host_typo)
    assert_clean(*(diagnosis_text(d) for d in (typo, other, host_typo)), secrets=(stack.secret,))


@pytest.mark.e2e
def test_0x02_with_no_mapping_at_all(stack: Stack, connected: Connector) -> None:
    assert refusal(stack, "mail.corp.example:143") == 0x02
    diagnosis = diagnose_refusal(channel(binding_of(stack), "mail.corp.example:143"), 0x02)
    assert diagnosis.evidence == ("the hub knows no mapping for location 'dc1'",)
    assert "postbridge connector mapping add mail.corp.example:143 --to HOST:PORT" in diagnosis.fix


@pytest.mark.e2e
def test_0x03_location_typo_names_the_connected_location(stack: Stack, connected: Connector) -> None:
    assert refusal(stack, "mail.corp.example:143", location="dc2") == 0x03
    diagnosis = diagnose_refusal(channel(binding_of(stack), "mail.corp.example:143", location="dc2"), 0x03)
    assert diagnosis.evidence == (
        "connectors connected for subaccount 'acme':",
        f"  location 'dc1': {connected.identity['connector_id']}",
        "did you mean 'dc1'?",
    )
    assert "'dc1'" in diagnosis.fix
    far = diagnose_refusal(channel(binding_of(stack), "mail.corp.example:143", location="berlin"), 0x03)
    assert not any("did you mean" in line for line in far.evidence)
    assert "postbridge cloud enroll acme --location berlin" in far.fix


@pytest.mark.e2e
def test_0x03_without_any_connector(stack: Stack) -> None:
    assert refusal(stack, "mail.corp.example:143") == 0x03
    diagnosis = diagnose_refusal(channel(binding_of(stack), "mail.corp.example:143"), 0x03)
    assert diagnosis == HubDiagnosis(
        ("no connector is connected for subaccount 'acme'",), "start the connector: postbridge connector run"
    )


@pytest.mark.e2e
def test_0x04_names_the_refused_internal_connection(stack: Stack, connected: Connector) -> None:
    closed = free_port()
    stack.map(connected, "down.corp.example:143", f"{LOOPBACK}:{closed}")
    assert refusal(stack, "down.corp.example:143") == 0x04
    diagnosis = diagnose_refusal(channel(binding_of(stack), "down.corp.example:143"), 0x04)
    assert diagnosis.evidence == (
        f"the connector's check of down.corp.example:143 -> {LOOPBACK}:{closed} (tcp): "
        f"not reachable: connection refused by {LOOPBACK}:{closed}",
    )
    assert f"start the mail server at {LOOPBACK}:{closed}" in diagnosis.fix
    assert "postbridge connector mapping add down.corp.example:143 --to HOST:PORT" in diagnosis.fix
    assert_clean(diagnosis_text(diagnosis), secrets=(stack.secret,))


@pytest.mark.e2e
def test_0x01_tcp_tls_mapping_to_an_untrusted_server_says_add_its_ca(
    stack: Stack, connected: Connector, dovecot: Dovecot, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign-root.pem"
    foreign.write_text(OTHER_CA)
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
    binding = binding_of(stack)
    assert refusal(stack, "imaps.corp.example:993") == 0x01
    diagnosis = diagnose_refusal(channel(binding, "imaps.corp.example:993", protection=Protection.OFF), 0x01)
    [evidence] = diagnosis.evidence
    assert evidence.startswith(
        f"the connector's check of imaps.corp.example:993 -> {dovecot.host}:{dovecot.imaps_port} (tcp-tls): "
        "not reachable: TLS handshake"
    )
    assert "certificate verify failed" in evidence
    assert "postbridge connector truststore add FILE" in diagnosis.fix
    found = mapping_of(channel(binding, "imaps.corp.example:993"))
    assert found is not None and found["protocol"] == "tcp-tls"


@pytest.mark.e2e
def test_0x01_certificate_without_the_mapped_name_says_set_the_tls_server_name(
    stack: Stack, connected: Connector, dovecot: Dovecot
) -> None:
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem))
    internal = f"{dovecot.host}:{dovecot.imaps_port}"
    stack.map(connected, "imaps.corp.example:993", internal, "--protocol", "tcp-tls", "--tls-server-name", "other.name")
    assert refusal(stack, "imaps.corp.example:993") == 0x01
    diagnosis = diagnose_refusal(channel(binding_of(stack), "imaps.corp.example:993", protection=Protection.OFF), 0x01)
    assert "host name mismatch: the certificate does not carry the name 'other.name'" in diagnosis.evidence[0]
    assert diagnosis.fix.startswith("postbridge connector mapping remove imaps.corp.example:993, then ")
    assert f"mapping add imaps.corp.example:993 --to {internal} --protocol tcp-tls --tls-server-name NAME" in (
        diagnosis.fix
    )


@pytest.mark.e2e
def test_wrong_secret_is_an_authentication_error_and_an_evidence_line(stack: Stack, connected: Connector) -> None:
    wrong = dataclasses.replace(binding_of(stack), client_secret="wrong-secret-0123456789")
    with HubApi(wrong) as api, pytest.raises(AuthenticationError, match="refused the binding's client id 'acme'") as c:
        api.connectors()
    assert "postbridge cloud binding" in c.value.hint
    diagnosis = diagnose_refusal(channel(wrong, "mail.corp.example:143"), 0x02)
    [line] = diagnosis.evidence
    assert line.startswith("could not ask the hub: the hub refused the binding's client id 'acme'")
    assert mapping_of(channel(wrong, "mail.corp.example:143")) is None
    assert_clean(str(c.value), line, secrets=(stack.secret, wrong.client_secret))


@pytest.mark.e2e
def test_binding_with_another_ca_is_a_trust_error(stack: Stack) -> None:
    other = dataclasses.replace(binding_of(stack), ca_certificate=OTHER_CA)
    with HubApi(other) as api, pytest.raises(TrustError, match="is not trusted") as caught:
        api.connectors()
    assert "not this hub's CA" in caught.value.hint
    [line] = diagnose_refusal(channel(other, "mail.corp.example:143"), 0x03).evidence
    assert line.startswith("could not ask the hub: the certificate of the hub's API")
    assert_clean(str(caught.value), line, secrets=(stack.secret,))


@pytest.fixture
def localhost_only_hub(tmp_path: Path) -> Iterator[Stack]:
    """A hub whose server certificate names 'localhost' only (not 127.0.0.1)."""
    stack = Stack(tmp_path).init()
    cli(stack.cloud_home, "cloud", "init", "--hostname", "localhost")  # keeps the CA, re-issues the certificate
    stack.start_hub()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.e2e
def test_host_name_is_checked_against_the_hub_certificate(localhost_only_hub: Stack) -> None:
    binding = binding_of(localhost_only_hub)  # token URL https://127.0.0.1:PORT/oauth/token
    with (
        HubApi(binding) as api,
        pytest.raises(TrustError, match=re.escape("does not carry the name '127.0.0.1'")) as caught,
    ):
        api.connectors()
    assert "--hostname 127.0.0.1" in caught.value.hint
    by_name = dataclasses.replace(binding, token_url=binding.token_url.replace(LOOPBACK, "localhost"))
    with HubApi(by_name) as api:
        assert api.connectors() == []


def test_proxy_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server((LOOPBACK, 0)) as proxy:  # a proxy that would be connected to if it were used
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://{LOOPBACK}:{proxy.getsockname()[1]}")
        with HubApi(unreachable_binding(), timeout=1.0) as api, pytest.raises(NetworkError) as caught:
            api.connectors()
        assert not isinstance(caught.value, PostbridgeTimeout)
        assert "Connection refused" in caught.value.message  # the API's own port, directly
        proxy.settimeout(0.2)
        with pytest.raises(TimeoutError):
            proxy.accept()


class _Mappings:
    """A hub API that knows only these mappings (the 0x02 diagnosis asks for nothing else)."""

    def __init__(self, *virtuals: str) -> None:
        self.virtuals = virtuals

    def mappings(self, location: str) -> list[dict[str, Any]]:
        return [{"virtual": v, "internal": f"{LOOPBACK}:1", "protocol": "tcp"} for v in self.virtuals]


@pytest.mark.parametrize(
    ("wanted", "said"),
    [
        ("mail.corp.example:1143", "did you mean mail.corp.example:143? the hub knows 'mail.corp.example' at port 143"),
        ("mail.corp.example:995", "did you mean mail.corp.example:993?"),
        ("mail.corp.example:25", "the hub knows 'mail.corp.example' at port(s) 143, 587, 993, not 25"),
    ],
)
def test_0x02_suggests_the_port_that_looks_like_the_wanted_one(wanted: str, said: str) -> None:
    api = _Mappings("mail.corp.example:143", "mail.corp.example:587", "mail.corp.example:993")
    diagnosis = diagnose_refusal(channel(unreachable_binding(), wanted), 0x02, api=api)  # type: ignore[arg-type]
    suggestions = [line for line in diagnosis.evidence if "did you mean" in line or "at port(s)" in line]
    assert len(suggestions) == 1 and suggestions[0].startswith(said), diagnosis.evidence
