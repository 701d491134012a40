"""What the demo talks about and what it expects: the names of the story and the three classic errors.

Owns the subaccount, location ID, users and virtual hosts of the story and :data:`ERROR_CASES`: each mistake a
cloud application's configuration commonly holds, as the connection test settings that reproduce it and the words
its diagnosis must contain. Pure data: must not do I/O. A test may replace :data:`ERROR_CASES` to make a step fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from postbridge.addresses import HostPort
from postbridge.lab.server import DEFAULT_DOMAIN, DEFAULT_PASSWORDS, DEFAULT_SERVER_NAME
from postbridge.mail.settings import Protection

SUBACCOUNT = "demo"
LOCATION = "dc1"
SERVER_NAME = DEFAULT_SERVER_NAME

IMAP = HostPort(SERVER_NAME, 143)  # tcp -> the lab's IMAP port (STARTTLS end to end)
IMAPS = HostPort(SERVER_NAME, 993)  # tcp-tls -> the lab's IMAPS port (the connector does the TLS)
SUBMISSION = HostPort(SERVER_NAME, 587)  # tcp -> the lab's submission port (STARTTLS end to end)
DOWN = HostPort("mail-old.corp.example", 143)  # mapped to a port where nothing listens

READER = "alice"  # whose mailbox the flow drains
SENDER = "bob"  # who sends the demo's mails through the tunnel
PASSWORDS = DEFAULT_PASSWORDS
DOMAIN = DEFAULT_DOMAIN
MAIL_COUNT = 3


@dataclass(frozen=True)
class ErrorCase:
    """One classic mistake: the connection test's target and protection, and what its diagnosis must say.

    ``cause`` and ``fix`` are words the failing step's cause and fix must contain (case-insensitive);
    ``explanation`` says in plain words what went wrong.
    """

    title: str
    target: HostPort
    protection: Protection
    cause: str
    fix: str
    explanation: str
    audited: bool = False  # the connector's audit log holds an Access Denied record for it


ERROR_CASES: tuple[ErrorCase, ...] = (
    ErrorCase(
        "an unmapped virtual host (a typo in the port)",
        HostPort(SERVER_NAME, 1143),
        Protection.STARTTLS_MANDATORY,
        "Connection not allowed by ruleset",
        f"did you mean {IMAP}?",
        "the connector denies (and audits) everything it has no mapping for; the hub lists the location's mappings",
        audited=True,
    ),
    ErrorCase(
        "a mapped host that is down",
        DOWN,
        Protection.STARTTLS_MANDATORY,
        "Host unreachable",
        "connection refused",
        "the mapping exists but nothing answers at its internal address; the hub asks the connector to check it",
    ),
    ErrorCase(
        "a protection that does not fit the mapping",
        IMAPS,
        Protection.TLS,
        "greets in plain text",
        "use protection 'off'",
        "the tcp-tls mapping already does the TLS, so the application's own TLS handshake meets a plain greeting",
    ),
)
