"""Mail through the tunnel for the demo: a few messages sent over SMTP, and the flow that polls them back.

Owns the demo's messages (each carries a ``Message-ID`` made here, so the story can find exactly these messages in
the flow's target), the flows file the demo writes into the cloud home (one IMAP flow through the connector into a
directory target; the cockpit shows it, and ``postbridge run`` could run it as it is), and reading the target folder
back. The blocking mail clients run in a worker thread of the caller (``asyncio.to_thread``).

Must not: print, or talk to anything but the demo's hub (all mail goes through the SOCKS5 proxy and the tunnel).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from postbridge.demo.cases import DOMAIN, IMAP, LOCATION, MAIL_COUNT, READER, SENDER, SUBMISSION
from postbridge.demo.stage import BINDING_NAME, Stage
from postbridge.home import atomic_write
from postbridge.mail.common import MailProtocolError
from postbridge.mail.compose import OutgoingMail, build_message
from postbridge.mail.settings import Protection
from postbridge.mail.smtp import open_smtp

FLOW = "alice-inbox"
TARGET_FOLDER = "inbox"  # in the cloud home: <idempotency key>.eml and .json per message
ARCHIVE = "Archive"
POLL_INTERVAL = 5  # seconds, while the demo keeps running

FLOWS_TEXT = f"""\
# Written by 'postbridge demo': one flow that drains {READER}'s INBOX on the lab server through the hub's SOCKS5
# proxy and the connector (virtual host {IMAP}, STARTTLS end to end, verified against ./keystore) into the folder
# ./{TARGET_FOLDER}. Each message is marked read and moved to '{ARCHIVE}' only after the target stored it.
# Check it with: postbridge --home CLOUD_HOME flows check flows.toml

[runtime]
state = "sqlite"            # CLOUD_HOME/runtime.db
metrics = ""                # no /metrics endpoint in the demo

[[flow]]
name = "{FLOW}"
protocol = "imap"
mode = "poll"
interval = {POLL_INTERVAL}

[flow.sender]
address = "{IMAP}"
proxy = "on-premise"
location_id = "{LOCATION}"
binding = "{BINDING_NAME}"
protection = "starttls-mandatory"
keystore = "keystore"
credential = "{READER}"
folder = "INBOX"
selection = "unread"
post_processing = "archive-and-mark-read"
archive_folder = "{ARCHIVE}"

[flow.target]
kind = "directory"
path = "{TARGET_FOLDER}"
"""


@dataclass(frozen=True)
class SentMail:
    message_id: str
    subject: str


@dataclass(frozen=True)
class StoredMail:
    file: str
    message_id: str
    subject: str
    size: int


def demo_mails(count: int = MAIL_COUNT) -> list[OutgoingMail]:
    """``count`` small messages from the sender to the reader, each with a Message-ID unique to this run."""
    run = secrets.token_hex(4)
    mails = []
    for number in range(1, count + 1):
        mail = build_message(
            sender=f"{SENDER}@{DOMAIN}",
            to=[f"{READER}@{DOMAIN}"],
            subject=f"Order {4710 + number}: delivery note {number} of {count}",
            text=f"Hello {READER},\n\nthe delivery note for order {4710 + number} is attached in spirit.\n\n{SENDER}\n",
            headers=[("Message-ID", f"<order-{4710 + number}.{run}@{DOMAIN}>")],
        )
        mails.append(mail)
    return mails


def send_through_tunnel(stage: Stage, mails: list[OutgoingMail]) -> list[SentMail]:
    """Send ``mails`` in one SMTP session to the submission virtual host (STARTTLS, login as the sender).

    Raises what the SMTP client raises (TrustError, AuthenticationError, NetworkError, SmtpReplyError, ...), and
    MailProtocolError naming the recipients the server refused.
    """
    settings = stage.channel(SUBMISSION, Protection.STARTTLS_MANDATORY, credential=SENDER)
    sent = []
    with open_smtp(settings) as session:
        for mail in mails:
            refused = session.send_mail(mail)
            if refused:
                listed = ", ".join(f"{who}: {code} {reason}" for who, (code, reason) in refused.items())
                raise MailProtocolError(f"the lab server refused {listed}")
            headers = mail.message
            sent.append(SentMail(str(headers["Message-ID"]).strip(), str(headers["Subject"])))
        session.quit()
    return sent


def write_flows(stage: Stage) -> Path:
    """Write the demo's flows file into the cloud home (replacing an earlier one) and return its path."""
    atomic_write(stage.flows_path, FLOWS_TEXT.encode(), mode=0o644)
    return stage.flows_path


def stored_mails(stage: Stage) -> list[StoredMail]:
    """The messages in the flow's target folder, by file name."""
    folder = stage.cloud_home / TARGET_FOLDER
    if not folder.is_dir():
        return []
    parser = BytesHeaderParser(policy=default_policy)
    found = []
    for path in sorted(folder.glob("*.eml")):
        data = path.read_bytes()
        headers = parser.parsebytes(data)
        message_id = str(headers["Message-ID"] or "").strip()
        found.append(StoredMail(path.name, message_id, str(headers["Subject"] or ""), len(data)))
    return found
