"""How the command line shows trusted certificates: one listing for ``postbridge keystore list`` and
``postbridge connector truststore list``, the full description of one certificate, and its chain.

Owns: the table of a store listing (alias, subject, issuer, validity, SANs, SHA-256, CA, expiry warning, optionally
the chain check; its ``--json`` rows and the expiry rule come from :mod:`postbridge.trust.listing`), the details of
one certificate (serial, key, both fingerprints, basic constraints, key usage, ...) and the chain table. Must not
change a store or decide trust by itself: the verdict on a chain comes from :mod:`postbridge.trust.chains`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from rich.console import Console
from rich.table import Table
from rich.text import Text

from postbridge.cli.common import print_json
from postbridge.trust.chains import ChainResult, ChainStatus
from postbridge.trust.listing import ca_label, chain_json, check_chains, days_left, entry_json, expiry_warning
from postbridge.trust.truststore import TrustEntry, TrustStore

__all__ = [  # the listing's data helpers live in trust/listing.py; the commands reach them through this module
    "ca_label",
    "certificate_details",
    "chain_json",
    "check_chains",
    "days_left",
    "entry_json",
    "expiry_warning",
    "list_store",
    "print_details",
    "short_fingerprint",
    "short_sans",
]

_Extension = TypeVar("_Extension", bound=x509.ExtensionType)

_KEY_USAGE_NAMES = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)


def short_fingerprint(value: str) -> str:
    return value[:23] + "…"


def short_sans(sans: list[str], limit: int = 2) -> str:
    if len(sans) <= limit:
        return ", ".join(sans)
    return ", ".join(sans[:limit]) + f" +{len(sans) - limit}"


def list_store(store: TrustStore, console: Console, *, json_output: bool, check: bool, title: str = "") -> bool:
    """Print the store as a table (or JSON); with ``check`` also the chain of every entry.

    Returns False when ``check`` found a chain that does not build (an anchor without its root is fine).
    Raises TrustError when the store holds an unreadable file.
    """
    now = datetime.now(UTC)
    certificates = store.certificates()
    chains = check_chains(certificates, now) if check else {}
    if json_output:
        print_json([entry_json(entry, now, chains.get(entry.alias)) for entry, _ in certificates])
        return all(result.ok for result in chains.values())
    table = Table(title=title or None, title_justify="left")
    for column in ("alias", "subject", "issuer", "valid", "SANs", "SHA-256", "CA", "warning"):
        table.add_column(column, no_wrap=column in ("alias", "valid", "SHA-256"))
    if check:
        table.add_column("chain")
    for entry, _ in certificates:
        info = entry.info
        warning = expiry_warning(info, now)
        row: list[str | Text] = [
            entry.alias,
            info.subject,
            "(itself)" if info.self_signed else info.issuer,
            f"{info.not_before:%Y-%m-%d} → {info.not_after:%Y-%m-%d}",
            short_sans(info.sans),
            short_fingerprint(info.fingerprint),
            ca_label(info),
            Text(warning, style="red" if info.not_after <= now else "yellow"),
        ]
        if check:
            row.append(_chain_cell(chains[entry.alias]))
        table.add_row(*row)
    console.print(table)
    if not certificates:
        console.print(f"(empty — add certificates with '{store.command} add FILE')", highlight=False)
    return all(result.ok for result in chains.values())


def certificate_details(entry: TrustEntry, cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    """Everything ``show`` tells about one certificate (JSON-ready)."""
    value = entry_json(entry, now)
    key_type, key_size = _key_description(cert)
    constraints = _extension(cert, x509.BasicConstraints)
    usage = _extension(cert, x509.KeyUsage)
    extended = _extension(cert, x509.ExtendedKeyUsage)
    subject_key = _extension(cert, x509.SubjectKeyIdentifier)
    authority_key = _extension(cert, x509.AuthorityKeyIdentifier)
    value.update(
        {
            "version": cert.version.name,
            "signature_algorithm": cert.signature_algorithm_oid._name,
            "key_type": key_type,
            "key_size": key_size,
            "sha1_fingerprint": _colon_hex(cert.fingerprint(hashes.SHA1()).hex()),  # SHA-1: for display only
            "basic_constraints": None
            if constraints is None
            else {"ca": constraints.ca, "path_length": constraints.path_length},
            "key_usage": None if usage is None else _key_usage_names(usage),
            "extended_key_usage": None if extended is None else [oid._name for oid in extended],
            "subject_key_id": None if subject_key is None else _colon_hex(subject_key.digest.hex()),
            "authority_key_id": None
            if authority_key is None or authority_key.key_identifier is None
            else _colon_hex(authority_key.key_identifier.hex()),
        }
    )
    return value


def print_details(details: dict[str, Any], chain: ChainResult, console: Console) -> None:
    """The human form of :func:`certificate_details` followed by the chain table."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    constraints = details["basic_constraints"]
    if constraints is None:
        constraints_text = "(absent)"
    elif constraints["ca"]:
        limit = constraints["path_length"]
        constraints_text = "CA" + (f", path length {limit}" if limit is not None else ", no path length limit")
    else:
        constraints_text = "not a CA"
    left = details["days_left"]
    key = details["key_type"] + (f" {details['key_size']} bits" if details["key_size"] else "")
    rows = [
        ("alias", details["alias"]),
        ("subject", details["subject"]),
        ("issuer", details["issuer"]),
        ("serial", details["serial"]),
        ("valid from", details["not_before"]),
        ("valid until", details["not_after"] + (f" ({left} days left)" if left > 0 else " (expired)")),
        ("SANs", ", ".join(details["sans"]) or "(none)"),
        ("key", key),
        ("signature", details["signature_algorithm"]),
        ("SHA-256", details["fingerprint"]),
        ("SHA-1", details["sha1_fingerprint"]),
        ("basic constraints", constraints_text),
        ("key usage", _join(details["key_usage"])),
        ("extended key usage", _join(details["extended_key_usage"])),
        ("subject key id", details["subject_key_id"] or "(absent)"),
        ("authority key id", details["authority_key_id"] or "(absent)"),
        ("CA", details["ca"]),
    ]
    for name, text in rows:
        grid.add_row(name, Text(str(text)))
    if details["warning"]:
        grid.add_row("warning", Text(details["warning"], style="red"))
    console.print(grid)
    console.print()
    console.print(Text.assemble(("chain: ", "bold"), _chain_cell(chain)))
    table = Table("#", "subject", "role", "alias", "valid until", "problem")
    for index, link in enumerate(chain.links):
        problems = "; ".join(issue.message for issue in link.issues)
        table.add_row(
            str(index),
            link.subject,
            link.role,
            link.alias or "(not stored)",
            f"{link.certificate.not_valid_after_utc:%Y-%m-%d}",
            Text(problems or "ok", style="red" if problems else "green"),
        )
    console.print(table)


def _chain_cell(result: ChainResult) -> Text:
    style = {ChainStatus.ROOT: "green", ChainStatus.ANCHOR: "yellow"}.get(result.status, "red")
    return Text(result.summary, style=style)


def _join(values: list[str] | None) -> str:
    return "(absent)" if values is None else ", ".join(values) or "(empty)"


def _colon_hex(hex_digits: str) -> str:
    upper = hex_digits.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def _extension(cert: x509.Certificate, kind: type[_Extension]) -> _Extension | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_usage_names(usage: x509.KeyUsage) -> list[str]:
    names = [name for attribute, name in _KEY_USAGE_NAMES if getattr(usage, attribute)]
    if usage.key_agreement:  # these two are only defined together with keyAgreement
        only = (("encipher_only", "encipherOnly"), ("decipher_only", "decipherOnly"))
        names += [name for attribute, name in only if getattr(usage, attribute)]
    return names


def _key_description(cert: x509.Certificate) -> tuple[str, int | None]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unsupported key type", None
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__, None
