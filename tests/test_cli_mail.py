"""`postbridge mail poll` as a user runs it, against the real Dovecot."""

from __future__ import annotations

import email
import json
import uuid
from pathlib import Path

from postbridge.trust.truststore import TrustStore
from tests.harness import cli
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki


def test_poll_saves_messages_and_post_processes_them(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "keystore").add(test_pki.root_pem.read_bytes(), alias="corp-root")
    subject = f"cli poll {uuid.uuid4().hex}"
    dovecot.deliver("bob", f"From: a@corp.example\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
    config = tmp_path / "channel.toml"
    config.write_text(
        f'[sender]\naddress = "{dovecot.host}:{dovecot.imap_port}"\nprotection = "starttls-mandatory"\n'
        f'user = "bob"\ntls_server_name = "mail.corp.example"\n'
    )
    args = ["mail", "poll", "--config", str(config), "--password-stdin", "--post-processing", "mark-read"]
    saved = tmp_path / "out"
    first = cli(home, *args, "--save-dir", str(saved), "--json", stdin="secret\n")
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    mine = [row for row in rows if row["subject"] == subject]
    assert len(mine) == 1
    parsed = email.message_from_bytes(Path(mine[0]["file"]).read_bytes())
    assert parsed["Subject"] == subject
    second = cli(home, *args, stdin="secret\n")
    assert subject not in second.stdout  # marked read after the first hand-over
    title = " ".join(second.stdout.split())  # rich centres and wraps the title
    assert "auth plain) INBOX" in title and "None" not in title  # the table names the folder polled
    assert "secret" not in first.stderr + second.stderr + second.stdout


def test_poll_refuses_clear_text_and_names_the_fix(dovecot: Dovecot, tmp_path: Path) -> None:
    result = cli(
        tmp_path / "home", "mail", "poll", "--address", f"{dovecot.host}:{dovecot.imap_port}", "--protection", "off",
        "--user", "bob", "--password-stdin", check=False, stdin="secret\n",
    )  # fmt: skip
    assert result.returncode == 1
    assert "not sending credentials" in result.stderr and "allow_cleartext_auth" in result.stderr


def test_send_then_poll_over_pop3(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path) -> None:
    from tests.servers.postfix import Postfix

    home = tmp_path / "home"
    TrustStore(home / "keystore").add(test_pki.root_pem.read_bytes(), alias="corp-root")
    subject = f"cli send {uuid.uuid4().hex}"
    attachment = tmp_path / "report.txt"
    attachment.write_text("quarterly figures\n")
    with Postfix(dovecot, pki=test_pki) as postfix:
        sent = cli(
            home, "mail", "send", "--from", "alice@corp.example", "--to", "bob@corp.example", "--subject", subject,
            "--text", "hello bob", "--attach", str(attachment),
            "--address", f"{postfix.host}:{postfix.submission_port}", "--protection", "starttls-mandatory",
            "--user", "alice", "--password-stdin",
            "--tls-server-name", "mail.corp.example", stdin="secret\n",
        )  # fmt: skip
        assert "sent to bob@corp.example" in sent.stdout
        dovecot.wait_for_message("bob", subject)
    polled = cli(
        home, "mail", "poll", "--protocol", "pop3", "--address", f"{dovecot.host}:{dovecot.pop3s_port}",
        "--protection", "tls", "--user", "bob", "--password-stdin", "--tls-server-name", "mail.corp.example",
        "--json", "--save-dir", str(tmp_path / "out"), stdin="secret\n",
    )  # fmt: skip
    rows = [json.loads(line) for line in polled.stdout.splitlines()]
    [row] = [row for row in rows if row["subject"] == subject]
    parsed = email.message_from_bytes(Path(row["file"]).read_bytes())
    assert [part.get_filename() for part in parsed.walk() if part.get_filename()] == ["report.txt"]


def test_poll_settings_come_from_the_toml_file_and_its_keystore_is_used(
    dovecot: Dovecot, test_pki: TestPki, tmp_path: Path
) -> None:
    keystore = TrustStore(tmp_path / "my-keystore")  # not HOME/keystore: the file names it
    keystore.add(test_pki.root_pem.read_bytes(), alias="corp-root")
    folder = f"F{uuid.uuid4().hex[:8]}"
    subject = f"toml poll {uuid.uuid4().hex}"
    from postbridge.addresses import HostPort
    from postbridge.mail.imap import append, open_session
    from postbridge.mail.settings import ChannelSettings, Credentials, Protection

    channel = ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imaps_port), protection=Protection.TLS,
        credentials=Credentials("bob", "secret"), keystore=keystore.directory, tls_server_name="mail.corp.example",
    )  # fmt: skip
    with open_session(channel) as session:
        session.create_folder(folder)
        append(session, folder, f"From: a@corp.example\r\nSubject: {subject}\r\n\r\nx\r\n".encode())
    config = tmp_path / "poll.toml"
    config.write_text(
        f'[sender]\naddress = "{dovecot.host}:{dovecot.imaps_port}"\nprotection = "tls"\nuser = "bob"\n'
        f'tls_server_name = "mail.corp.example"\nkeystore = "{keystore.directory}"\nfolder = "{folder}"\n'
        f'post_processing = "delete"\nallow_cleartext_auth = "false"\n'
    )
    result = cli(
        tmp_path / "home", "mail", "poll", "--config", str(config), "--password-stdin", "--json", stdin="secret\n"
    )
    assert [json.loads(line)["subject"] for line in result.stdout.splitlines()] == [subject]
    with open_session(channel) as session:
        session.select(folder)
        assert session.search("ALL") == []  # post_processing = "delete" from the file was applied
    config.write_text(config.read_text() + 'flder = "typo"\n')
    typo = cli(
        tmp_path / "home", "mail", "poll", "--config", str(config), "--password-stdin", check=False, stdin="secret\n"
    )
    assert typo.returncode == 2 and "flder" in typo.stderr


def test_a_user_without_a_password_is_refused_before_connecting(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "mail", "poll", "--address", "127.0.0.1:1", "--user", "bob", check=False)
    assert result.returncode == 2
    assert "no password" in result.stderr and "--password-stdin" in result.stderr
