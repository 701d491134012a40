"""What the demo talks about and what it expects: the names of the story and the four classic errors.

Owns the subaccount, location ID and virtual hosts of the story, :data:`ERROR_CASES` (each error a cloud application
meets, with the SOCKS5 reply it must get and the plain-words diagnosis) and :data:`REPLY_WORDS` (what Java and curl
print for each reply). Pure data: must not do I/O. A test may replace :data:`ERROR_CASES` to make a step fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from postbridge.addresses import HostPort
from postbridge.demo.onprem import SERVER_NAME

SUBACCOUNT = "demo"
LOCATION = "dc1"
IMAP = HostPort(SERVER_NAME, 143)
IMAPS = HostPort(SERVER_NAME, 993)
DOWN = HostPort("down.corp.example", 143)


@dataclass(frozen=True)
class ErrorCase:
    """One classic error a cloud application meets: whom it asks for what, and the reply it must get."""

    title: str
    location: str
    target: HostPort
    expected_reply: int
    diagnosis: str
    wrong_secret: bool = False
    show_audit: bool = False


ERROR_CASES: tuple[ErrorCase, ...] = (
    ErrorCase(
        "an unmapped virtual host",
        LOCATION,
        HostPort(SERVER_NAME, 25),
        0x02,
        "the connector has no mapping for this virtual host:port; everything unmapped is denied and audited",
        show_audit=True,
    ),
    ErrorCase(
        "a wrong location ID",
        "dc9",
        IMAP,
        0x03,
        "no connector of subaccount 'demo' is connected at location 'dc9', so the hub has no tunnel to use",
    ),
    ErrorCase(
        "a mapped host that is down",
        LOCATION,
        DOWN,
        0x04,
        "the mapping exists, but the connector could not connect to its internal address (nothing listens)",
    ),
    ErrorCase(
        "a wrong secret",
        LOCATION,
        IMAP,
        0x05,
        "the subaccount's client secret is wrong, so the hub refuses before it routes anything",
        wrong_secret=True,
    ),
)


# The words Java's SocksSocketImpl and curl print for each SOCKS5 reply (the design's reply table).
REPLY_WORDS: dict[int, str] = {
    0x00: "succeeded",
    0x01: "General failure",
    0x02: "Connection not allowed by ruleset",
    0x03: "Network unreachable",
    0x04: "Host unreachable",
    0x05: "Connection refused",
    0x06: "TTL expired",
    0x07: "Command not supported",
    0x08: "Address type not supported",
}
