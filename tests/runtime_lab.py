"""A flows file, a mailbox full of numbered messages and a `postbridge run` process, for the runtime's e2e tests.

Owns: filling a fresh IMAP folder of the real Dovecot with N messages (unique Message-ID and subject), writing a flows
file that drains it into a directory target (directly or through a real hub and connector), starting and killing
`postbridge run` as a child process, and reading back what reached the target and the mailbox.
Must not: reach into the runtime's internals: it looks at the target folder, the mailbox and the store only.
"""

from __future__ import annotations

import email
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from postbridge.addresses import HostPort
from postbridge.mail.imap import append, open_session
from postbridge.mail.settings import ChannelSettings, Credentials, Protection
from tests.harness import ENV, Stack, cli
from tests.servers.dovecot import Dovecot

SERVER_NAME = "mail.corp.example"


def direct_channel(dovecot: Dovecot, keystore: Path) -> ChannelSettings:
    return ChannelSettings(
        address=HostPort(dovecot.host, dovecot.imap_port), protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("alice", "secret"), keystore=keystore, tls_server_name=SERVER_NAME, timeout=10,
    )  # fmt: skip


def fill_folder(dovecot: Dovecot, keystore: Path, count: int, *, tag: str = "") -> tuple[str, list[str]]:
    """A new folder of alice's with ``count`` messages; returns its name and the Message-IDs in order."""
    folder = f"rt{tag}{uuid.uuid4().hex[:10]}"
    ids = [f"<{folder}.{number}@test.example>" for number in range(count)]
    with open_session(direct_channel(dovecot, keystore)) as session:
        session.create_folder(folder)
        for number, message_id in enumerate(ids):
            raw = (
                f"From: sender{number}@corp.example\r\nTo: alice@corp.example\r\nSubject: {folder} #{number}\r\n"
                f"Message-ID: {message_id}\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nbody {number}\r\n"
            ).encode()
            append(session, folder, raw)
    return folder, ids


def folder_count(dovecot: Dovecot, keystore: Path, folder: str, criteria: str = "ALL") -> int:
    with open_session(direct_channel(dovecot, keystore)) as session:
        session.select(folder)
        return len(session.search(criteria))


def binding_file(stack: Stack, path: Path) -> Path:
    api = stack.api_url.removeprefix("https://")
    shown = cli(stack.cloud_home, "cloud", "binding", "acme", "--secret", stack.secret,
                "--socks", f"127.0.0.1:{stack.socks_port}", "--api", api)  # fmt: skip
    path.write_text(shown.stdout)
    return path


def write_flows(
    path: Path,
    *,
    folder: str,
    out: Path,
    keystore: Path,
    state: str,
    address: str,
    binding: Path | None = None,
    interval: float = 0.2,
    lease: float = 3.0,
    target: str = "",
    extra_flow: str = "",
) -> Path:
    via = f'proxy = "on-premise"\nlocation_id = "dc1"\nbinding = "{binding}"\n' if binding else ""
    target = target or f'kind = "directory"\npath = "{out}"\n'
    path.write_text(
        f"""[runtime]
state = "{state}"
metrics = ""
lease_seconds = {lease}

[[flow]]
name = "drain"
protocol = "imap"
interval = {interval}
stale_after = 60
{extra_flow}
[flow.sender]
address = "{address}"
{via}protection = "starttls-mandatory"
tls_server_name = "{SERVER_NAME}"
keystore = "{keystore}"
user = "alice"
password = "secret"
folder = "{folder}"
post_processing = "archive"
archive_folder = "{folder}-done"
max_messages_per_poll = 100
timeout = 10

[flow.retry]
max_attempts = 50
initial = 0.2
maximum = 1

[flow.target]
{target}"""
    )
    return path


def start_runtime(home: Path, flows: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "postbridge", "--home", str(home), "run", str(flows), *extra],
            stdout=handle, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip


@dataclass(frozen=True)
class Delivered:
    """What a directory target holds: Message-ID -> idempotency keys it arrived under, and delivery counts."""

    keys_by_message_id: dict[str, set[str]]
    deliveries: dict[str, int]  # idempotency key -> number of deliveries (duplicates > 1)

    @property
    def message_ids(self) -> set[str]:
        return set(self.keys_by_message_id)


def delivered(out: Path) -> Delivered:
    by_id: dict[str, set[str]] = {}
    deliveries: dict[str, int] = {}
    if out.is_dir():
        for eml in out.glob("*.eml"):
            message = email.message_from_bytes(eml.read_bytes())
            by_id.setdefault(str(message["Message-ID"]), set()).add(eml.stem)
            meta = eml.with_suffix(".json")
            if meta.exists():
                deliveries[eml.stem] = int(json.loads(meta.read_text()).get("deliveries", 1))
    return Delivered(by_id, deliveries)


def wait_until(check: object, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
