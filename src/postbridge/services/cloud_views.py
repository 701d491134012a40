"""What the cloud cockpit's pages and JSON API show and take: the values that
:class:`~postbridge.services.cloud.CloudService` returns (subaccounts, tokens, certificates, keystore entries, flows,
messages) and the connection test request it parses from a form or JSON.

Owns the shapes and the parsing of a connection test request (unknown fields and bad values are InvalidInput naming
them). Must not do I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postbridge.errors import ConfigurationError
from postbridge.mail.probe import KINDS, ProbeReport
from postbridge.mail.settings import AuthMethod, Protection, Proxy, parse_bool, parse_enum
from postbridge.runtime.store import Attempt, MessageRecord
from postbridge.services import InvalidInput, invalid
from postbridge.trust.truststore import TrustEntry

TEST_TIMEOUT = 10.0  # seconds per step of a cockpit connection test


def ago(moment: float | None, now: float | None = None) -> str:
    """How long ago ``moment`` (epoch seconds) was, as the cockpit and ``flows status`` say it: "never",
    "42 s ago", "7 min ago", "3.5 h ago"."""
    if moment is None:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - moment)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass(frozen=True)
class NewSubaccount:
    """A subaccount just created; ``client_secret`` is shown this once and stored only as a digest."""

    subaccount: str
    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True)
class NewToken:
    """An enrollment token just created; ``token`` is shown this once and stored only as a digest."""

    token_id: str
    token: str = field(repr=False)
    subaccount: str = ""
    location: str = ""
    expires_at: float = 0.0


@dataclass(frozen=True)
class TokenView:
    token_id: str
    subaccount: str
    location: str
    expires_at: float
    used: bool
    revoked: bool
    status: str  # "unused", "used", "expired" or "revoked"


@dataclass(frozen=True)
class CertificateView:
    serial: str  # hex, as certificates.json keys it
    subaccount: str
    location: str
    connector_id: str
    not_after: str
    issued: str
    revoked: bool
    revoked_at: str
    connected: bool  # a tunnel with this certificate is up right now


@dataclass(frozen=True)
class SubaccountView:
    name: str
    created: str
    connectors: tuple[dict[str, Any], ...] = ()  # the registry's description, with the connector's mappings


@dataclass(frozen=True)
class KeystoreEntry:
    alias: str
    subject: str
    issuer: str
    not_before: str
    not_after: str
    fingerprint: str
    is_ca: bool
    self_signed: bool
    expired: bool

    @classmethod
    def of(cls, entry: TrustEntry) -> KeystoreEntry:
        info = entry.info
        return cls(
            entry.alias, info.subject, info.issuer, info.not_before.isoformat(), info.not_after.isoformat(),
            info.fingerprint, info.is_ca, info.self_signed, info.expires_within(0),
        )  # fmt: skip


@dataclass(frozen=True)
class ConnectionTestRequest:
    """The channel settings of ``postbridge test``, as the cockpit's form and API take them. No password field:
    a login uses a credential NAME from the hub's credential store."""

    kind: str = "imap"
    address: str = ""
    proxy: str = "internet"
    location_id: str = ""
    subaccount: str = ""  # on-premise: test through this hub with its own binding for this subaccount
    protection: str = "starttls-mandatory"
    auth: str = ""  # "" = plain for a password credential, xoauth2 for an OAuth2 one, none without a credential
    credential: str = ""
    tls_server_name: str = ""
    check_auth: bool = False
    timeout: float = TEST_TIMEOUT

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ConnectionTestRequest:
        """From form fields or JSON; raises ConfigurationError quoting an unknown field or a bad value."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - allowed - {"csrf_token", "fingerprint", "confirm"})
        if unknown:
            raise InvalidInput(
                f"unknown connection test field(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(allowed))}"
            )

        def text(name: str, default: str) -> str:
            value = data.get(name, default)
            return default if value is None else str(value).strip()

        kind = text("kind", "imap").lower()
        if kind not in KINDS:
            raise InvalidInput(f"test kind '{kind}' is not one of: {', '.join(KINDS)}")
        auth = text("auth", "").lower()
        try:
            proxy = parse_enum(Proxy, text("proxy", "internet") or "internet", "proxy")
            protection = parse_enum(Protection, text("protection", "") or "starttls-mandatory", "protection")
            if auth:
                parse_enum(AuthMethod, auth, "auth")
            check_auth = parse_bool(data.get("check_auth", False), "check_auth")
        except ConfigurationError as exc:
            raise invalid(exc) from exc
        try:
            timeout = float(data.get("timeout") or TEST_TIMEOUT)
        except (TypeError, ValueError):
            raise InvalidInput(f"timeout '{data.get('timeout')}' is not a number of seconds") from None
        if not 0 < timeout <= 120:
            raise InvalidInput(f"timeout {timeout:g} is not between 0 and 120 seconds", hint="e.g. 10")
        return cls(
            kind=kind, address=text("address", ""), proxy=proxy.value, location_id=text("location_id", ""),
            subaccount=text("subaccount", ""), protection=protection.value, auth=auth,
            credential=text("credential", ""), tls_server_name=text("tls_server_name", ""),
            check_auth=check_auth, timeout=timeout,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class AnchorAdded:
    """What 'add to keystore' stored, and the connection test run again afterwards."""

    added: tuple[KeystoreEntry, ...]
    report: ProbeReport


@dataclass(frozen=True)
class FlowView:
    name: str
    enabled: bool
    status: str  # "healthy", "stale" (no successful poll within stale_after), "failing" (last poll failed), "disabled"
    owner: str
    last_poll: float | None
    last_success: float | None
    last_error: str
    consecutive_failures: int
    stale_after: float
    backlog: int  # messages waiting for another attempt (status retrying)
    counts: dict[str, int]


@dataclass(frozen=True)
class MessageDetail:
    record: MessageRecord
    attempts: tuple[Attempt, ...]
