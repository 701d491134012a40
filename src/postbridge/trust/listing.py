"""What a listing of trusted certificates says, as data: the CA label, days left, the expiry warning, the chain of
every entry and the JSON of one row.

Shared by the CLI's listings (``postbridge keystore list``, ``postbridge connector truststore list``, through
:mod:`postbridge.cli.certs_view`, which draws them) and the web UIs' service layer. Must not print or change a store;
the verdict on a chain comes from :mod:`postbridge.trust.chains`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from cryptography import x509

from postbridge.trust.chains import ChainResult, build_chain
from postbridge.trust.pki import CertificateInfo
from postbridge.trust.truststore import TrustEntry

EXPIRY_WARNING_DAYS = 30
"""Certificates that expire within this many days (or have expired) get a warning."""


def ca_label(info: CertificateInfo) -> str:
    """'root CA', 'CA' (an intermediate), 'self-signed' (a self-signed server certificate) or 'no'."""
    if info.is_ca:
        return "root CA" if info.self_signed else "CA"
    return "self-signed" if info.self_signed else "no"


def days_left(info: CertificateInfo, now: datetime) -> int:
    """Days until expiry, a started day counting as one (0 or less once expired)."""
    return math.ceil((info.not_after - now).total_seconds() / 86400)


def expiry_warning(info: CertificateInfo, now: datetime) -> str:
    """'' while the certificate has more than :data:`EXPIRY_WARNING_DAYS` left, else what to worry about."""
    if info.not_after <= now:
        return f"expired on {info.not_after:%Y-%m-%d}"
    if info.expires_within(EXPIRY_WARNING_DAYS, now):
        left = days_left(info, now)
        return f"expires in {left} day{'s' if left != 1 else ''} ({info.not_after:%Y-%m-%d})"
    return ""


def check_chains(certificates: list[tuple[TrustEntry, x509.Certificate]], now: datetime) -> dict[str, ChainResult]:
    """The chain of every entry, built through the same store; keyed by alias."""
    store = {entry.alias: cert for entry, cert in certificates}
    return {entry.alias: build_chain(cert, store, now=now) for entry, cert in certificates}


def chain_json(result: ChainResult) -> dict[str, Any]:
    return {
        "status": result.status.value,
        "ok": result.ok,
        "summary": result.summary,
        "links": [
            {
                "subject": link.subject,
                "issuer": link.issuer,
                "fingerprint": link.fingerprint,
                "alias": link.alias,
                "role": link.role,
                "not_after": link.certificate.not_valid_after_utc.isoformat(),
                "problems": [{"problem": issue.problem.value, "message": issue.message} for issue in link.issues],
            }
            for link in result.links
        ],
    }


def entry_json(entry: TrustEntry, now: datetime, chain: ChainResult | None = None) -> dict[str, Any]:
    """One listing row as JSON (the full fingerprint; ``warning`` is null when there is nothing to say)."""
    info = entry.info
    value: dict[str, Any] = {
        "alias": entry.alias,
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "days_left": days_left(info, now),
        "sans": list(info.sans),
        "fingerprint": info.fingerprint,
        "is_ca": info.is_ca,
        "self_signed": info.self_signed,
        "ca": ca_label(info),
        "warning": expiry_warning(info, now) or None,
    }
    if chain is not None:
        value["chain"] = chain_json(chain)
    return value
