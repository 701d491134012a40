"""`postbridge test …`: the step-by-step connection test against the real Dovecot, directly and through the hub."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import trustme

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError
from postbridge.mail.probe import ProbeReport, Step, run_probe
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Credentials, Protection, Proxy
from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki


def channel(dovecot: Dovecot, store: Path, port: int, protection: Protection, **extra: object) -> ChannelSettings:
    values: dict[str, object] = {
        "address": HostPort(dovecot.host, port),
        "protection": protection,
        "credentials": Credentials("alice", "secret"),
        "keystore": store,
        "tls_server_name": "mail.corp.example",
        "timeout": 5.0,
    }
    values.update(extra)
    return ChannelSettings(**values)  # type: ignore[arg-type]


def names(report: ProbeReport) -> list[str]:
    return [step.name for step in report.steps]


def test_imap_starttls_every_step_passes_with_login_and_folder_counts(dovecot: Dovecot, keystore: Path) -> None:
    dovecot.deliver("alice", f"From: a@corp.example\r\nSubject: probe {uuid.uuid4().hex}\r\n\r\nhi\r\n".encode())
    settings = channel(dovecot, keystore, dovecot.imap_port, Protection.STARTTLS_MANDATORY)
    report = run_probe("imap", settings, check_auth=True, list_folders=True)
    assert report.ok, report.steps
    assert names(report) == [
        "connection", "greeting", "capabilities before TLS", "STARTTLS", "certificate chain", "capabilities after TLS",
        "authentication mechanisms", "login", "folders",
    ]  # fmt: skip
    steps = {step.name: step for step in report.steps}
    assert "STARTTLS" in steps["capabilities before TLS"].detail
    assert "TLSv1." in steps["STARTTLS"].detail and "issued by" in steps["STARTTLS"].detail
    assert "PLAIN" in steps["authentication mechanisms"].detail
    assert "alice" in steps["login"].detail
    inbox = next(folder for folder in report.folders if folder.name == "INBOX")
    assert inbox.total >= 1 and inbox.unread >= 1
    assert all(step.elapsed_ms >= 0 for step in report.steps)
    assert "secret" not in json.dumps(report.to_json())


def test_without_check_auth_no_login_is_tried(dovecot: Dovecot, keystore: Path) -> None:
    wrong = channel(
        dovecot, keystore, dovecot.imap_port, Protection.STARTTLS_MANDATORY, credentials=Credentials("alice", "nope")
    )
    assert run_probe("imap", wrong, check_auth=False, list_folders=False).ok
    failed = run_probe("imap", wrong, check_auth=True, list_folders=False)
    assert not failed.ok and failed.steps[-1].name == "login"
    assert "alice" in failed.steps[-1].cause and "nope" not in json.dumps(failed.to_json())


def test_pop3_implicit_tls_passes_and_counts_messages(dovecot: Dovecot, keystore: Path) -> None:
    settings = channel(dovecot, keystore, dovecot.pop3s_port, Protection.TLS)
    report = run_probe("pop3", settings, check_auth=True, list_folders=False)
    assert report.ok, report.steps
    assert names(report)[:4] == ["connection", "TLS handshake", "certificate chain", "greeting"]
    assert names(report)[-2:] == ["login", "message count"]
    assert report.message_count is not None and report.message_count >= 0


def test_implicit_tls_on_a_starttls_port_fails_at_the_tls_step_and_names_the_protection(
    dovecot: Dovecot, keystore: Path
) -> None:
    settings = channel(dovecot, keystore, dovecot.imap_port, Protection.TLS)
    report = run_probe("imap", settings, check_auth=True, list_folders=False)
    assert not report.ok
    failed = report.steps[-1]
    assert failed is report.failed and failed.name == "TLS handshake"
    assert failed.cause and "starttls-mandatory" in failed.fix
    assert names(report) == ["connection", "TLS handshake"]  # the run stops at the first failure


def test_unknown_ca_fails_at_starttls_with_the_keystore_fix(dovecot: Dovecot, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "other-keystore")
    store.add(trustme.CA().cert_pem.bytes(), alias="someone-else")
    settings = channel(dovecot, store.directory, dovecot.imap_port, Protection.STARTTLS_MANDATORY)
    report = run_probe("imap", settings, check_auth=False, list_folders=False)
    failed = report.failed
    assert failed is not None and failed.name == "STARTTLS"
    assert "not trusted" in failed.cause
    assert "postbridge keystore add" in failed.fix


def test_tcp_reads_the_greeting_and_tls_shows_the_handshake(dovecot: Dovecot, keystore: Path) -> None:
    tcp = run_probe("tcp", channel(dovecot, keystore, dovecot.imap_port, Protection.OFF, auth=AuthMethod.NONE,
                                   credentials=None), check_auth=False, list_folders=False)  # fmt: skip
    assert tcp.ok and tcp.steps[-1].detail.startswith("* OK")
    tls = run_probe("tls", channel(dovecot, keystore, dovecot.imaps_port, Protection.TLS), check_auth=False,
                    list_folders=False)  # fmt: skip
    assert tls.ok and names(tls) == ["connection", "TLS handshake", "certificate chain"]
    assert "TLSv1." in tls.steps[1].detail


def test_report_shape_and_unknown_kind() -> None:
    report = ProbeReport("imap", "x", (Step("connection", True, 1.0, "ok"), Step("greeting", False, 2.0, "failed",
                                                                              cause="c", fix="f")))  # fmt: skip
    assert not report.ok and report.failed is not None and report.failed.name == "greeting"
    assert json.loads(json.dumps(report.to_json()))["steps"][1]["fix"] == "f"
    assert not ProbeReport("imap", "x", ()).ok
    settings = ChannelSettings(address=HostPort("127.0.0.1", 1), auth=AuthMethod.NONE)
    with pytest.raises(ConfigurationError, match="'ftp'"):
        run_probe("ftp", settings)


def test_cli_prints_each_step_and_json_parses(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "keystore").add(test_pki.root_pem.read_bytes(), alias="corp-root")
    base = [
        "test", "imap", "--address", f"{dovecot.host}:{dovecot.imap_port}", "--protection", "starttls-mandatory",
        "--user", "alice", "--password-stdin", "--tls-server-name", "mail.corp.example", "--timeout", "5",
    ]  # fmt: skip
    shown = cli(home, *base, "--check-auth", "--list-folders", stdin="secret\n")
    assert "✓ STARTTLS" in shown.stdout and "INBOX" in shown.stdout and "✗" not in shown.stdout
    as_json = cli(home, *base, "--check-auth", "--json", stdin="secret\n")
    parsed = json.loads(as_json.stdout)
    assert parsed["ok"] is True and [s["name"] for s in parsed["steps"]][-1] == "login"
    wrong = cli(home, *base[:4], "--protection", "tls", *base[6:], "--json", check=False, stdin="secret\n")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["steps"][-1]["name"] == "TLS handshake"
    failed = cli(home, *base[:4], "--protection", "tls", *base[6:], check=False, stdin="secret\n")
    assert failed.returncode == 1 and "✗ TLS handshake" in failed.stdout
    assert "cause:" in failed.stdout and "fix:" in failed.stdout and "starttls-mandatory" in failed.stdout
    for result in (shown, as_json, wrong, failed):
        assert "secret" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_through_the_hub_unmapped_host_fails_at_the_connection_with_reply_0x02(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path
) -> None:
    binding = Binding(socks=HostPort("127.0.0.1", stack.socks_port), subaccount="acme", client_secret=stack.secret)

    def via_hub(virtual: str) -> ChannelSettings:
        return ChannelSettings(
            address=HostPort(*_split(virtual)),
            proxy=Proxy.ON_PREMISE,
            location_id="dc1",
            binding=binding,
            protection=Protection.STARTTLS_MANDATORY,
            credentials=Credentials("alice", "secret"),
            keystore=keystore,
            timeout=5.0,
        )

    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    for _ in range(3):  # tunneled sessions that end with LOGOUT must leave the tunnel up (it once did not)
        mapped = run_probe("imap", via_hub("mail.corp.example:143"), check_auth=True, list_folders=False)
        assert mapped.ok, mapped.steps
    assert "SOCKS5" in mapped.steps[0].detail and "0x00" in mapped.steps[0].detail
    assert "STARTTLS" in names(mapped) and names(mapped)[-1] == "login"
    unmapped = run_probe("imap", via_hub("unmapped.corp.example:143"), check_auth=True, list_folders=False)
    assert names(unmapped) == ["connection"]
    failed = unmapped.steps[0]
    assert not failed.ok and "0x02" in failed.cause and "Connection not allowed by ruleset" in failed.cause
    assert "postbridge connector mapping add unmapped.corp.example:143" in failed.fix
    assert stack.secret not in json.dumps(unmapped.to_json())


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def test_smtp_starttls_passes_and_off_stops_before_sending_the_password(
    dovecot: Dovecot, test_pki: TestPki, keystore: Path
) -> None:
    from tests.servers.postfix import Postfix

    with Postfix(dovecot, pki=test_pki) as postfix:
        good = run_probe(
            "smtp", channel(dovecot, keystore, postfix.submission_port, Protection.STARTTLS_MANDATORY), check_auth=True
        )
        clear = run_probe("smtp", channel(dovecot, keystore, postfix.submission_port, Protection.OFF), check_auth=True)
    assert good.ok, good.steps
    assert names(good) == [
        "connection", "greeting", "EHLO before TLS", "STARTTLS", "certificate chain", "EHLO after TLS",
        "authentication mechanisms", "login",
    ]  # fmt: skip
    assert "PLAIN" in good.steps[-2].detail
    assert clear.failed is not None and clear.failed.name == "login"
    assert "without TLS" in clear.failed.cause and "starttls-mandatory" in clear.failed.fix


def test_inbox_is_listed_first_however_many_folders_there_are(dovecot: Dovecot, keystore: Path) -> None:
    import uuid

    from postbridge.mail.imap import open_session

    settings = channel(dovecot, keystore, dovecot.imap_port, Protection.STARTTLS_MANDATORY)
    with open_session(settings) as session:
        for _ in range(12):  # more than the report shows by name
            session.create_folder(f"A{uuid.uuid4().hex[:8]}")
    report = run_probe("imap", settings, list_folders=True)
    assert report.folders[0].name == "INBOX"
    assert "INBOX" in report.steps[-1].detail


def test_smtp_envelope_check_names_each_address_and_sends_nothing(
    dovecot: Dovecot, test_pki: TestPki, keystore: Path
) -> None:
    from tests.servers.postfix import Postfix

    with Postfix(dovecot, pki=test_pki) as postfix:
        settings = channel(dovecot, keystore, postfix.submission_port, Protection.STARTTLS_MANDATORY)
        local = f"alice@{postfix.domain}"
        good = run_probe("smtp", settings, sender=f"alice@{postfix.domain}", recipients=(local,))
        mixed = run_probe("smtp", settings, sender=f"alice@{postfix.domain}",
                          recipients=(local, f"nobody-{uuid.uuid4().hex[:6]}@{postfix.domain}"))  # fmt: skip
        log = postfix.log_path.read_text(errors="replace")
    assert good.ok, good.steps
    assert names(good)[-2:] == ["login", "sender and recipients"]  # the check logs in first
    assert [(r.role, r.accepted) for r in good.envelope] == [("sender", True), ("recipient", True)]
    failed = mixed.failed
    assert failed is not None and failed.name == "sender and recipients"
    assert "550" in failed.cause and "nobody-" in failed.cause and "no such mailbox" in failed.fix
    assert [r.accepted for r in mixed.envelope] == [True, True, False]
    assert "message-id=" not in log  # nothing was queued: no DATA was ever sent
    with pytest.raises(ConfigurationError, match="--from and --to"):
        run_probe("imap", settings, sender="a@b.example", recipients=("c@d.example",))
    with pytest.raises(ConfigurationError, match="needs both"):
        run_probe("smtp", settings, sender="a@b.example")
