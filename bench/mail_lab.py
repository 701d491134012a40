"""The mail benchmark's laboratory: the message set, the servers' users and channels, and hub + connector.

Owns: the deterministic message set (about 10 KB each, the same on every run), filling a Dovecot user's maildir
and letting Dovecot index it, counting what is left in INBOX and Archive afterwards, the channel settings of the
direct and the tunnelled route, CPU time of Dovecot's whole process tree, and starting a real hub and connector
with a ``tcp`` mapping to Dovecot's STARTTLS port. Must not: time anything, or listen or connect anywhere but
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import random
import re
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from tests.harness import ENV, Process, Stack
from tests.servers import LOOPBACK
from tests.servers.dovecot import Dovecot
from tests.servers.postfix import Postfix

from bench.baselines import descendants
from bench.mail_clients import ARCHIVE
from bench.measure import cpu_seconds
from postbridge.addresses import HostPort
from postbridge.mail.settings import Binding, ChannelSettings, Credentials, Protection, Proxy

SERVER_NAME = "mail.corp.example"  # the name on the test certificate, and the virtual host of the mapping
VIRTUAL = f"{SERVER_NAME}:143"
PASSWORD = "secret"
MESSAGE_SIZE = 10_000


# -- the message set --------------------------------------------------------------------------------------------

_WORDS = [
    *("invoice", "order", "shipment", "customer", "account", "payment", "delivery", "contract", "supplier"),
    *("warehouse", "quantity", "price", "reference", "number", "attached", "please", "confirm", "receipt"),
    *("regards", "schedule", "update", "status", "pending", "approved"),
]


def _line_pool(count: int = 256) -> list[str]:
    rng = random.Random(2026)
    pool = []
    for _ in range(count):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 70:
            words.append(rng.choice(_WORDS))
        pool.append(" ".join(words))
    return pool


_POOL = _line_pool()


def body_text(index: int, size: int = MESSAGE_SIZE) -> str:
    """About ``size`` bytes of plain text lines, different for every index, the same on every run."""
    rng = random.Random(index)
    lines = rng.choices(_POOL, k=size // 72)
    return "\r\n".join(lines) + "\r\n"


def imap_message(index: int) -> bytes:
    head = (
        f"From: Supplier {index % 97} <supplier{index % 97}@corp.example>\r\n"
        "To: Orders <orders@corp.example>\r\n"
        f"Subject: benchmark message {index}\r\n"
        f"Date: {formatdate(1_700_000_000 + index * 60)}\r\n"
        f"Message-ID: <bench-{index}@corp.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return head.encode() + body_text(index).encode()


def expected_digests(count: int) -> tuple[Counter[str], float]:
    """The sha256 of every message of the set, and their mean size."""
    digests: Counter[str] = Counter()
    total = 0
    for index in range(count):
        raw = imap_message(index)
        digests[hashlib.sha256(raw).hexdigest()] += 1
        total += len(raw)
    return digests, total / max(1, count)


# -- servers and channels ---------------------------------------------------------------------------------------


@dataclass
class Lab:
    folder: Path
    dovecot: Dovecot
    keystore: Path
    root_pem: Path
    stack: Stack | None = None
    postfix: Postfix | None = None

    def client_context(self) -> ssl.SSLContext:
        """What the naive client uses: verifying, trusting the test root only."""
        return ssl.create_default_context(cafile=str(self.root_pem))

    def direct_channel(self, user: str) -> ChannelSettings:
        return ChannelSettings(
            address=HostPort(self.dovecot.host, self.dovecot.imap_port),
            protection=Protection.STARTTLS_MANDATORY,
            credentials=Credentials(user, PASSWORD),
            keystore=self.keystore,
            tls_server_name=SERVER_NAME,
        )

    def tunnel_channel(self, user: str) -> ChannelSettings:
        assert self.stack is not None
        binding = Binding(socks=HostPort(LOOPBACK, self.stack.socks_port), subaccount="acme",
                          client_secret=self.stack.secret)  # fmt: skip
        return ChannelSettings(
            address=HostPort(SERVER_NAME, 143),
            proxy=Proxy.ON_PREMISE,
            location_id="dc1",
            binding=binding,
            protection=Protection.STARTTLS_MANDATORY,
            credentials=Credentials(user, PASSWORD),
            keystore=self.keystore,
        )

    def relay_pids(self) -> list[int]:
        stack = self.stack
        if stack is None or stack.hub is None:
            return []
        return [stack.hub.popen.pid] + [c.process.popen.pid for c in stack.connectors if c.process]

    def dovecot_cpu(self) -> float:
        """CPU seconds of Dovecot's whole process tree so far (live processes and reaped children)."""
        master = int((self.dovecot.folder / "run" / "master.pid").read_text().split()[0])
        return cpu_seconds(descendants(master))


@contextlib.contextmanager
def hub_and_connector(folder: Path, dovecot: Dovecot, log_level: str) -> Iterator[Stack]:
    """A real hub and connector (separate processes) with a ``tcp`` mapping to Dovecot's STARTTLS port."""

    class BenchStack(Stack):
        """The harness logs at debug (for tests); run at the level an operator would use instead."""

        def _spawn(self, name: str, home: Path, *args: str) -> Process:
            log_path = self.root / f"{name}.log"
            command = [sys.executable, "-m", "postbridge", "--home", str(home), "--log-level", log_level, *args]
            with log_path.open("a") as handle:
                popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=ENV)
            return Process(name, popen, log_path)

    stack = BenchStack(folder).init()
    try:
        stack.start_hub()
        connector = stack.enroll("dc1")
        stack.map(connector, VIRTUAL, f"{dovecot.host}:{dovecot.imap_port}")
        stack.start_connector(connector)
        yield stack
    finally:
        stack.stop()


# -- one IMAP drain -----------------------------------------------------------------------------------------------


def _admin(lab: Lab, user: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(lab.dovecot.host, lab.dovecot.imap_port, timeout=60)
    imap.starttls(ssl_context=lab.client_context())
    imap.login(user, PASSWORD)
    return imap


def fill(lab: Lab, user: str, count: int) -> float:
    """Deliver the message set into the user's INBOX, let Dovecot index it (SELECT), create Archive; returns the
    seconds it took. Raises RuntimeError when the INBOX does not hold exactly ``count`` messages then."""
    started = time.monotonic()
    for index in range(count):
        lab.dovecot.deliver(user, imap_message(index))
    imap = _admin(lab, user)
    try:
        typ, data = imap.select("INBOX")
        if typ != "OK" or int(data[0] or 0) != count:
            raise RuntimeError(f"{user}'s INBOX holds {data!r} messages after delivering {count}")
        imap.create(ARCHIVE)
    finally:
        imap.logout()
    return time.monotonic() - started


def mailbox_counts(lab: Lab, user: str) -> tuple[int, int]:
    """(messages in INBOX, messages in Archive)."""
    imap = _admin(lab, user)
    try:
        counts = []
        for folder in ("INBOX", ARCHIVE):
            typ, data = imap.status(folder, "(MESSAGES)")
            found = re.search(rb"MESSAGES (\d+)", data[0] if typ == "OK" and isinstance(data[0], bytes) else b"")
            counts.append(int(found.group(1)) if found else -1)
        return counts[0], counts[1]
    finally:
        imap.logout()


def wait_delivered(lab: Lab, user: str, expected: int, limit: float) -> tuple[int, float]:
    """Wait until ``expected`` messages are in the user's maildir or ``limit`` s passed: (count, seconds waited)."""
    maildir, start = lab.dovecot.maildir(user), time.monotonic()
    while True:
        arrived = sum(1 for sub in ("new", "cur") if (maildir / sub).exists() for _ in (maildir / sub).iterdir())
        waited = time.monotonic() - start
        if arrived >= expected or waited > limit:
            return arrived, waited
        time.sleep(0.2)
