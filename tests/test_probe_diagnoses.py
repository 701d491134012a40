"""The connection test's diagnoses, each produced by a real situation: real Dovecot, real hub and connector
processes, real TLS servers presenting each bad certificate, and the named checks that explain a failed step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme

from postbridge.addresses import HostPort
from postbridge.mail.probe import ProbeReport, run_probe
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Credentials, Protection, Proxy
from postbridge.trust.pki import load_certificates
from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.hostile.certs import SERVER_NAME, bad_certificates, good_certificate, root_keystore
from tests.servers import LOOPBACK
from tests.servers.dovecot import Dovecot
from tests.servers.imaps import imaps_server
from tests.servers.pki import TestPki


def tls_channel(port: int, keystore: Path, **extra: object) -> ChannelSettings:
    values: dict[str, object] = {
        "address": HostPort(LOOPBACK, port),
        "protection": Protection.TLS,
        "auth": AuthMethod.NONE,
        "keystore": keystore,
        "tls_server_name": SERVER_NAME,
        "timeout": 3.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def names(report: ProbeReport) -> list[str]:
    return [step.name for step in report.steps]


# -- certificate chain: every certificate, trusted or not and why ---------------------------------------------------


def test_a_trusted_chain_is_shown_certificate_by_certificate(test_pki: TestPki, tmp_path: Path) -> None:
    keystore = root_keystore(test_pki, tmp_path / "keystore")
    with imaps_server(good_certificate(test_pki).context(tmp_path / "certs")) as port:
        report = run_probe("tls", tls_channel(port, keystore))
    assert report.ok, report.steps
    assert names(report) == ["connection", "TLS handshake", "certificate chain"]
    assert report.chain is not None and report.chain.trusted
    assert [c.role for c in report.chain.certificates] == ["server", "intermediate", "root"]
    assert report.chain.certificates[-1].source == "keystore 'test-root'"
    assert "trusted through keystore 'test-root'" in report.steps[-1].detail
    parsed = json.loads(json.dumps(report.to_json()))
    assert parsed["chain"]["certificates"][0]["sha256"] == report.chain.certificates[0].info.fingerprint


@pytest.mark.parametrize(
    ("case", "problem", "cause_words", "fix_words"),
    [
        ("missing-intermediate", "issuer-missing", "unable to get local issuer", "intermediate CA"),
        ("unknown-root", "issuer-missing", "unable to get local issuer", "PKIX"),
        ("self-signed", "unknown-ca", "self-signed", "--add-to-keystore"),
        ("expired", "expired", "expired", "renew"),
        ("wrong-host", "name-mismatch", "mismatch", "tls_server_name"),
    ],
)
def test_each_untrusted_chain_fails_the_handshake_and_is_fetched_again_to_explain_it(
    test_pki: TestPki, tmp_path: Path, case: str, problem: str, cause_words: str, fix_words: str
) -> None:
    keystore = root_keystore(test_pki, tmp_path / "keystore")
    with imaps_server(bad_certificates(test_pki)[case].context(tmp_path / "certs")) as port:
        report = run_probe("imap", tls_channel(port, keystore))
    failed = report.failed
    assert failed is not None and failed.name == "TLS handshake", report.steps
    assert names(report) == ["connection", "TLS handshake"]
    assert cause_words in failed.cause.lower() or cause_words in failed.cause
    assert report.chain is not None and report.chain.problem == problem
    assert any("fetched again without verification" in line for line in failed.evidence)
    assert report.chain.cause in failed.evidence
    assert fix_words in failed.fix + report.chain.cause


def test_an_old_tls_version_is_named_with_its_fix(test_pki: TestPki, tmp_path: Path) -> None:
    keystore = root_keystore(test_pki, tmp_path / "keystore")
    with imaps_server(bad_certificates(test_pki)["tls1.0-only"].context(tmp_path / "certs")) as port:
        report = run_probe("tls", tls_channel(port, keystore))
    failed = report.failed
    assert failed is not None and failed.name == "TLS handshake"
    assert "old TLS version" in failed.fix and "TLS 1.2" in failed.fix
    assert report.chain is None  # no chain was fetched: the version, not the trust, failed


def test_unknown_ca_over_starttls_at_the_real_dovecot_shows_the_chain(dovecot: Dovecot, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "other-keystore")
    store.add(trustme.CA().cert_pem.bytes(), alias="someone-else")
    settings = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imap_port), protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("alice", "secret"), keystore=store.directory, tls_server_name=SERVER_NAME, timeout=5,
    )  # fmt: skip
    report = run_probe("imap", settings, check_auth=True)
    assert report.failed is not None and report.failed.name == "STARTTLS"
    assert report.chain is not None and report.chain.problem == "issuer-missing"
    assert [c.sent for c in report.chain.certificates] == [True, True]  # Dovecot sends leaf + intermediate
    assert [c.role for c in report.chain.anchor_candidates()] == ["intermediate"]
    assert "secret" not in json.dumps(report.to_json())


def test_cli_downloads_the_chain_and_adds_the_root_after_confirmation(test_pki: TestPki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    self_signed = bad_certificates(test_pki)["self-signed"]
    with imaps_server(self_signed.context(tmp_path / "certs")) as port:
        base = ["test", "tls", "--address", f"{LOOPBACK}:{port}", "--protection", "tls", "--auth", "none",
                "--tls-server-name", SERVER_NAME, "--timeout", "3"]  # fmt: skip
        chain_file = tmp_path / "chain.pem"
        first = cli(home, *base, "--download-chain", str(chain_file), check=False)
        assert first.returncode == 1 and "certificate chain" in first.stdout and "self-signed" in first.stdout
        assert load_certificates(chain_file.read_bytes()) == load_certificates(self_signed.chain_pem)
        declined = cli(home, *base, "--add-to-keystore", check=False, stdin="n\n")
        assert declined.returncode == 1 and "nothing added" in declined.stdout
        assert "SHA-256" in declined.stdout and "Compare the fingerprint" in declined.stdout
        assert not TrustStore(home / "keystore").list()
        accepted = cli(home, *base, "--add-to-keystore", "--yes", check=False)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "added" in accepted.stdout and "running the test again" in accepted.stdout
    assert accepted.stdout.rstrip().endswith("steps passed")
    assert len(TrustStore(home / "keystore").list()) == 1


def test_add_to_keystore_refuses_when_adding_would_not_help(test_pki: TestPki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "keystore").add(test_pki.root_pem.read_bytes(), alias="test-root")
    with imaps_server(bad_certificates(test_pki)["wrong-host"].context(tmp_path / "certs")) as port:
        result = cli(home, "test", "tls", "--address", f"{LOOPBACK}:{port}", "--protection", "tls", "--auth", "none",
                     "--tls-server-name", SERVER_NAME, "--timeout", "3", "--add-to-keystore", "--yes",
                     check=False)  # fmt: skip
    assert result.returncode == 2
    assert "would not help" in result.stdout + result.stderr
    assert len(TrustStore(home / "keystore").list()) == 1


# -- the TLS mode does not fit the port: "connection dropped by server" ---------------------------------------------


@pytest.mark.parametrize(
    ("port", "protection", "step", "cause", "evidence", "fix"),
    [
        ("imaps", Protection.STARTTLS_MANDATORY, "greeting", "expects implicit TLS",
         "answered a TLS handshake (TLSv1.", "protection 'tls'"),
        ("imap", Protection.TLS, "TLS handshake", "greets in plain text", "plain greeting '* OK", "starttls-mandatory"),
    ],
)  # fmt: skip
def test_a_tls_mode_that_does_not_fit_the_port_is_recognised(
    dovecot: Dovecot, keystore: Path, port: str, protection: Protection, step: str, cause: str, evidence: str, fix: str
) -> None:
    settings = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imaps_port if port == "imaps" else dovecot.imap_port),
        protection=protection, credentials=Credentials("alice", "secret"), keystore=keystore,
        tls_server_name=SERVER_NAME, timeout=2,
    )  # fmt: skip
    failed = run_probe("imap", settings).failed
    assert failed is not None and failed.name == step
    assert cause in failed.cause
    assert any(evidence in line for line in failed.evidence), failed.evidence
    assert fix in failed.fix


def test_clear_text_warning_only_when_credentials_would_cross_a_network_in_clear(
    dovecot: Dovecot, keystore: Path
) -> None:
    settings = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imap_port), protection=Protection.OFF, auth=AuthMethod.NONE,
        keystore=keystore, timeout=3,
    )  # fmt: skip
    report = run_probe("imap", settings)
    assert report.ok and "clear text" in report.steps[0].warning
    assert not run_probe("tls", tls_channel(dovecot.imaps_port, keystore)).steps[0].warning


# -- through the hub: the hub and the connector explain refusals and mismatches -------------------------------------


def hub_binding(stack: Stack) -> Binding:
    api = stack.api_url.removeprefix("https://").rstrip("/")
    shown = cli(stack.cloud_home, "cloud", "binding", "acme", "--secret", stack.secret,
                "--socks", f"{LOOPBACK}:{stack.socks_port}", "--api", api)  # fmt: skip
    return Binding.from_json(json.loads(shown.stdout), source="test")


def via_hub(stack: Stack, virtual: str, protection: Protection, keystore: Path, **extra: object) -> ChannelSettings:
    host, _, port = virtual.rpartition(":")
    values: dict[str, object] = {
        "address": HostPort(host, int(port)), "proxy": Proxy.ON_PREMISE, "location_id": "dc1",
        "binding": hub_binding(stack), "protection": protection, "credentials": Credentials("alice", "secret"),
        "keystore": keystore, "tls_server_name": SERVER_NAME, "timeout": 3.0,
    }  # fmt: skip
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


@pytest.mark.e2e
def test_hub_refusals_are_explained_by_the_hub(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path
) -> None:
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    stack.map(connected, "down.corp.example:143", f"{LOOPBACK}:1")
    unmapped = run_probe("imap", via_hub(stack, "mail.corp.example:144", Protection.STARTTLS_MANDATORY, keystore))
    failed = unmapped.failed
    assert failed is not None and "0x02" in failed.cause
    assert any("mail.corp.example:143" in line for line in failed.evidence)
    assert "postbridge connector mapping add mail.corp.example:144" in failed.fix
    typo = run_probe("imap", via_hub(stack, "mail.corp.example:143", Protection.STARTTLS_MANDATORY, keystore,
                                     location_id="dc2"))  # fmt: skip
    assert typo.failed is not None and "0x03" in typo.failed.cause
    assert any("dc1" in line for line in typo.failed.evidence)
    down = run_probe("imap", via_hub(stack, "down.corp.example:143", Protection.STARTTLS_MANDATORY, keystore))
    assert down.failed is not None and "0x04" in down.failed.cause
    assert any("refused" in line.lower() for line in down.failed.evidence), down.failed.evidence
    for report in (unmapped, typo, down):
        assert stack.secret not in json.dumps(report.to_json())


@pytest.mark.e2e
def test_tcp_tls_mapping_whose_backend_is_not_trusted_is_explained(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign-root.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    cli(connected.home, "connector", "truststore", "add", str(foreign), "--alias", "someone-else")
    stack.map(connected, "imaps.corp.example:993", f"{dovecot.host}:{dovecot.imaps_port}", "--protocol", "tcp-tls",
              "--tls-server-name", SERVER_NAME)  # fmt: skip
    report = run_probe("imap", via_hub(stack, "imaps.corp.example:993", Protection.OFF, keystore))
    failed = report.failed
    assert failed is not None and "0x01" in failed.cause
    assert any("certificate" in line.lower() for line in failed.evidence), failed.evidence
    assert "postbridge connector truststore add" in failed.fix


@pytest.mark.e2e
def test_mapping_and_protection_mismatches_through_the_connector(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path
) -> None:
    cli(connected.home, "connector", "truststore", "add", str(dovecot.pki.root_pem), "--alias", "corp-root")
    stack.map(connected, "imaps.corp.example:993", f"{dovecot.host}:{dovecot.imaps_port}", "--protocol", "tcp-tls",
              "--tls-server-name", SERVER_NAME)  # fmt: skip
    stack.map(connected, "raw993.corp.example:993", f"{dovecot.host}:{dovecot.imaps_port}")
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")

    good = run_probe("imap", via_hub(stack, "imaps.corp.example:993", Protection.OFF, keystore), check_auth=True)
    assert good.ok, good.steps
    assert not any(step.warning for step in good.steps)  # off over tcp-tls: encrypted the whole way

    # TLS sent to a port that (through the connector's TLS) greets in plain text
    double = run_probe("imap", via_hub(stack, "imaps.corp.example:993", Protection.TLS, keystore))
    assert double.failed is not None and double.failed.name == "TLS handshake"
    assert any("as 'tcp-tls'" in line for line in double.failed.evidence)
    assert "use protection 'off'" in double.failed.fix

    # STARTTLS required, but the connector's TLS is already in place: no STARTTLS offered
    starttls = run_probe("imap", via_hub(stack, "imaps.corp.example:993", Protection.STARTTLS_MANDATORY, keystore))
    assert starttls.failed is not None and starttls.failed.name == "STARTTLS"
    assert "use protection 'off'" in starttls.failed.fix

    # plain IMAP sent over a 'tcp' mapping to the implicit-TLS port: nothing comes back
    plain = run_probe("imap", via_hub(stack, "raw993.corp.example:993", Protection.STARTTLS_MANDATORY, keystore,
                                      timeout=2.0))  # fmt: skip
    assert plain.failed is not None and plain.failed.name == "greeting"
    assert "expects implicit TLS" in plain.failed.cause
    assert "--protocol tcp-tls" in plain.failed.fix

    # off over a plain 'tcp' mapping: a warning that credentials cross the internal network in clear
    clear = run_probe("imap", via_hub(stack, "mail.corp.example:143", Protection.OFF, keystore, auth=AuthMethod.NONE,
                                      credentials=None))  # fmt: skip
    assert clear.ok and "internal network" in clear.steps[0].warning


def test_fingerprints_are_printed_as_text_not_as_emoji_codes() -> None:
    from dataclasses import replace
    from datetime import UTC, datetime

    from postbridge.cli.common import console
    from postbridge.cli.probe import render_chain
    from postbridge.trust.pki import CertificateInfo
    from postbridge.trust.server_chain import ChainReport, PresentedCertificate

    now = datetime.now(UTC)
    info = CertificateInfo("CN=x", "CN=y", "01", now, now.replace(year=now.year + 1), [], "50:CD:D6:67", False, False)
    cert = PresentedCertificate("server", info, "sent by the server", True, True, "ok", "")
    with console.capture() as captured:
        render_chain(ChainReport((cert, replace(cert, role="root")), "", "", ""))
    assert "50:CD:D6:67" in captured.get()


@pytest.mark.parametrize("width", [80, 120])
def test_the_chain_table_fits_the_terminal_and_keeps_every_verdict(width: int) -> None:
    import io
    from datetime import UTC, datetime

    from rich.console import Console

    from postbridge.cli.probe import render_chain
    from postbridge.trust.pki import CertificateInfo
    from postbridge.trust.server_chain import ChainReport, PresentedCertificate

    now = datetime.now(UTC)
    sans = ["DNS:mail.corp.example", "DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    fingerprint = ":".join(["AB"] * 32)
    leaf = CertificateInfo(
        "CN=mail.corp.example", "O=postbridge lab,CN=postbridge lab intermediate CA", "01", now,
        now.replace(year=now.year + 1), sans, fingerprint, False, False,
    )  # fmt: skip
    why = "its issuer 'O=postbridge lab,CN=postbridge lab root CA' was not sent and is not in the keystore"
    cert = PresentedCertificate("intermediate", leaf, "sent by the server, keystore 'lab-intermediate'", True, False,
                                why, "")  # fmt: skip
    out = io.StringIO()
    render_chain(ChainReport((cert,), "", "", ""), Console(file=out, width=width))
    output = out.getvalue()
    assert max(len(line) for line in output.splitlines()) <= width  # nothing cropped at the edge
    for words in ("✗", "issuer", "keystore", "AB:AB:AB", f"{leaf.not_after:%Y-%m-%d}", "lab-intermediate"):
        assert words in output, (words, output)


# -- time-outs at each step, and a login that cannot work -----------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "failing_step", "words"),
    [
        ("silent", "TLS handshake", "did not finish within 2 s"),
        ("no-greeting", "greeting", "did not answer while waiting for the greeting within 2 s"),
        ("no-login-answer", "login", "did not answer during login within 2 s"),
        ("no-common-mechanism", "login", "no common authentication mechanism"),
    ],
)
def test_timeouts_and_mechanisms_are_named_per_step(
    test_pki: TestPki, tmp_path: Path, script: str, failing_step: str, words: str
) -> None:
    from tests.hostile.servers import FakeServer, Send, StartTls

    context = good_certificate(test_pki).context(tmp_path / "certs")
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n"
    steps = {
        "silent": [],
        "no-greeting": [StartTls(context)],
        "no-login-answer": [StartTls(context), Send(greeting)],
        "no-common-mechanism": [
            StartTls(context),
            Send(b"* OK [CAPABILITY IMAP4rev1 AUTH=GSSAPI LOGINDISABLED] x\r\n"),
        ],
    }[script]
    caps = b"IMAP4rev1 AUTH=GSSAPI LOGINDISABLED" if script == "no-common-mechanism" else b"IMAP4rev1 AUTH=PLAIN"

    def answer(line: bytes) -> bytes:  # CAPABILITY is answered, anything else (the login) never
        tag, _, command = line.partition(b" ")
        return b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n" if command.upper().startswith(b"CAPA") else b""

    keystore = root_keystore(test_pki, tmp_path / "keystore")
    with FakeServer(steps, after_script=answer, timeout=4) as server:
        settings = tls_channel(server.port, keystore, auth=AuthMethod.PLAIN, credentials=Credentials("u", "pw"),
                               timeout=2.0)  # fmt: skip
        report = run_probe("imap", settings, check_auth=True)
    failed = report.failed
    assert failed is not None and failed.name == failing_step, report.steps
    assert words in failed.cause
    assert failed.fix
    if script == "no-login-answer":
        assert "raise the channel's timeout" in failed.fix  # not a TLS mismatch: the greeting came
    if script == "no-common-mechanism":
        assert "GSSAPI" in failed.cause and "mechanism the server offers" in failed.fix
        steps_by_name = {step.name: step for step in report.steps}
        assert "GSSAPI" in steps_by_name["authentication mechanisms"].detail
