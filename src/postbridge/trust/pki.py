"""Keys, the enrollment CA, certificates and connector identities (everything X.509 that postbridge makes).

This module owns: generating P-256 keys, self-signed CAs (the hub's enrollment CA), server certificates for
the hub, CSRs and the connector client certificates issued from them, the ``ConnectorIdentity`` bound into a
connector certificate as a SAN URI, loading certificates and keys from bytes, fingerprints, and a plain
description of a certificate for listings.

It must not touch files, sockets or ``ssl`` contexts: callers (trust stores, the hub, the connector) decide
where bytes come from and go to. Every ``cryptography`` error is translated here into :class:`TrustError`
(untrusted or unreadable material) or :class:`ConfigurationError` (a bad name or option typed by a user).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postbridge.addresses import valid_host
from postbridge.errors import ConfigurationError, TrustError

URI_PREFIX = "urn:postbridge:connector:"
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long in the past, so that a peer whose clock is slightly behind accepts them."""

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----")
_FINGERPRINT_PREFIX = re.compile(r"^sha-?256(?:\s+fingerprint)?\s*[=:]?\s*", re.IGNORECASE)
_HEX64 = re.compile(r"^[0-9A-Fa-f]{64}$")


def validate_name(value: str, what: str, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is 1-64 characters of ``[A-Za-z0-9._-]`` (or empty when allowed).

    Raises ConfigurationError quoting the value; ``what`` names the setting ("subaccount", "location ID").
    """
    if value == "" and allow_empty:
        return value
    if not _NAME.match(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ConfigurationError(
            f"{what} '{shown}' is not valid: it must be 1 to 64 characters of letters, digits, '.', '_', '-'",
            hint=f"choose a {what} such as 'dc1' or 'mail-eu.prod'",
        )
    return value


@dataclass(frozen=True)
class ConnectorIdentity:
    """Who a connector is: its subaccount, its location ID ("" = default location) and its own id.

    The identity is written into the connector's client certificate as the SAN URI :meth:`to_uri`, and the
    hub reads it back from the verified peer certificate. Construction raises ConfigurationError for invalid
    names.
    """

    subaccount: str
    location: str
    connector_id: str

    def __post_init__(self) -> None:
        validate_name(self.subaccount, "subaccount")
        validate_name(self.location, "location ID", allow_empty=True)
        validate_name(self.connector_id, "connector id")

    def to_uri(self) -> str:
        parts = (self.subaccount, self.location, self.connector_id)
        return URI_PREFIX + ":".join(quote(part, safe="") for part in parts)

    @classmethod
    def from_uri(cls, uri: str) -> ConnectorIdentity:
        """Parse a URI made by :meth:`to_uri`; raise TrustError for anything else, non-canonical too."""
        if not uri.startswith(URI_PREFIX):
            raise TrustError(f"'{uri}' is not a postbridge connector identity (it must start with '{URI_PREFIX}')")
        parts = uri[len(URI_PREFIX) :].split(":")
        if len(parts) != 3:
            raise TrustError(
                f"connector identity '{uri}' has {len(parts)} parts after the prefix instead of 3 "
                "(subaccount, location ID, connector id)"
            )
        try:
            identity = cls(*(unquote(part, errors="strict") for part in parts))
        except (ConfigurationError, UnicodeDecodeError) as exc:
            raise TrustError(f"connector identity '{uri}' is not valid: {exc}") from exc
        if identity.to_uri() != uri:
            raise TrustError(f"connector identity '{uri}' is not in canonical form ('{identity.to_uri()}')")
        return identity

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> ConnectorIdentity:
        """Read the identity from the certificate's SAN URI; raise TrustError unless there is exactly one."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            uris: list[str] = []
        except ValueError as exc:
            raise TrustError(f"certificate '{_subject(cert)}' has extensions that cannot be parsed") from exc
        else:
            uris = [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]
        return cls._from_uris(uris, f"certificate '{_subject(cert)}'")

    @classmethod
    def from_peercert(cls, peercert: dict[str, Any] | None) -> ConnectorIdentity:
        """Read the identity from ``ssl.SSLSocket.getpeercert()``; raise TrustError when it names none.

        An empty dict (what ``getpeercert()`` returns when the certificate was not verified) names none.
        """
        entries = (peercert or {}).get("subjectAltName", ())
        uris = [value for kind, value in entries if kind == "URI"]
        return cls._from_uris(uris, "the peer's certificate")

    @classmethod
    def _from_uris(cls, uris: list[str], where: str) -> ConnectorIdentity:
        ours = [uri for uri in uris if uri.startswith(URI_PREFIX)]
        if len(ours) != 1:
            found = "no" if not ours else f"{len(ours)}"
            raise TrustError(
                f"{where} holds {found} postbridge connector identities (SAN URI '{URI_PREFIX}...') instead of one",
                hint="use the certificate issued at enrollment ('postbridge connector enroll')",
            )
        return cls.from_uri(ours[0])


@dataclass(frozen=True)
class CertificateInfo:
    """What a person needs to recognise a certificate in a listing."""

    subject: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    sans: list[str]
    fingerprint: str
    is_ca: bool
    self_signed: bool

    def expires_within(self, days: float, now: datetime | None = None) -> bool:
        """True when the certificate is expired or expires within ``days`` days from ``now``."""
        moment = now or datetime.now(UTC)
        return self.not_after <= moment + timedelta(days=days)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(common_name: str, *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA that may sign end-entity certificates only (path length 0).

    Raises ConfigurationError for an empty or too long common name or a non-positive lifetime.
    """
    key = generate_key()
    name = x509.Name([_common_name(common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _validity(x509.CertificateBuilder(), days, None)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return key, builder.sign(key, _hash_for(key))


def issue_server_certificate(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    *,
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a TLS server certificate for ``hostnames`` (DNS names and IP literals), signed by the CA.

    Raises ConfigurationError for an empty list or an invalid host name, TrustError when the CA key and
    certificate do not belong together or the certificate is not a CA.
    """
    sans: list[x509.GeneralName] = []
    for raw in hostnames:
        general_name = _general_name(raw)
        if general_name not in sans:
            sans.append(general_name)
    if not sans:
        raise ConfigurationError(
            "a server certificate needs at least one host name", hint="give the names clients use to connect"
        )
    _check_issuer(ca_key, ca_cert)
    key = generate_key()
    first = str(hostnames[0]).strip().lower()
    subject = x509.Name([_common_name(first)]) if len(first) <= 64 else x509.Name([])
    builder = (
        _validity(x509.CertificateBuilder(), days, ca_cert)
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return key, _sign_leaf(builder, key.public_key(), ca_key, ca_cert)


def build_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str) -> bytes:
    """A PEM certificate signing request for ``key`` with subject CN ``common_name``."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([_common_name(common_name)]))
    return builder.sign(key, _hash_for(key)).public_bytes(serialization.Encoding.PEM)


def issue_connector_certificate(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    csr_pem: bytes,
    identity: ConnectorIdentity,
    *,
    days: int = 30,
) -> x509.Certificate:
    """A TLS client certificate for the key in ``csr_pem``, bound to ``identity`` (SAN URI), signed by the CA.

    The subject in the CSR is ignored: the identity decides it. Raises TrustError when the CSR cannot be
    parsed, its signature is wrong (tampered, or not made with the matching key) or its key type is too weak.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem) if b"-----BEGIN" in csr_pem else x509.load_der_x509_csr(csr_pem)
        signature_valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustError(
            "the certificate signing request cannot be parsed", hint="send the PEM CSR made by the connector"
        ) from exc
    if not signature_valid:
        raise TrustError(
            "the certificate signing request has a wrong signature (altered, or signed with another key)",
            hint="create a new CSR with the connector's own key",
        )
    _check_public_key(public_key)
    _check_issuer(ca_key, ca_cert)
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, identity.connector_id),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.subaccount),
    ]
    if identity.location:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.location))
    builder = (
        _validity(x509.CertificateBuilder(), days, ca_cert)
        .subject_name(x509.Name(attributes))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.to_uri())]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return _sign_leaf(builder, public_key, ca_key, ca_cert)


def load_certificates(data: bytes, *, source: str = "input") -> list[x509.Certificate]:
    """All certificates in ``data`` (PEM, one or many, or a single DER certificate).

    Raises TrustError naming ``source`` when it holds no certificate or a certificate cannot be parsed.
    """
    hint = "give a certificate file in PEM ('-----BEGIN CERTIFICATE-----') or DER form"
    if b"-----BEGIN" in data:
        if not _PEM_CERTIFICATE.search(data):
            raise TrustError(
                f"'{source}' holds no certificate in PEM or DER form (its PEM blocks are keys, requests or "
                "other kinds)",
                hint=hint,
            )
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise TrustError(f"'{source}' holds a PEM certificate that cannot be parsed", hint=hint) from exc
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise TrustError(f"'{source}' holds no certificate in PEM or DER form", hint=hint) from exc


def load_private_key(data: bytes, *, source: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key in ``data``; raises TrustError naming ``source`` otherwise."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise TrustError(
            f"the private key in '{source}' is encrypted with a password",
            hint="store it unencrypted in a file only its user can read (mode 0600), "
            "for example with 'openssl pkey -in KEY -out PLAIN'",
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustError(
            f"'{source}' holds no usable private key in PEM form",
            hint="give the PEM key ('-----BEGIN PRIVATE KEY-----') that belongs to the certificate",
        ) from exc


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKeyTypes) -> bytes:
    """The key as unencrypted PKCS#8 PEM (store it with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as upper-case hex pairs joined by ':' (as ``openssl x509 -fingerprint`` shows)."""
    return _colon_hex(cert.fingerprint(hashes.SHA256()).hex())


def parse_fingerprint(text: str) -> str:
    """Normalise a SHA-256 fingerprint typed by a user (any case, with or without ':'; an ``openssl``-style
    ``SHA256 Fingerprint=`` prefix is accepted) to the form :func:`fingerprint` returns.

    Raises ConfigurationError quoting the text.
    """
    stripped = _FINGERPRINT_PREFIX.sub("", text.strip())
    compact = re.sub(r"[\s:]", "", stripped)
    if not _HEX64.match(compact):
        raise ConfigurationError(
            f"'{text}' is not a SHA-256 fingerprint",
            hint="give 64 hex digits, with or without ':' between pairs, as 'postbridge connector truststore "
            "list' shows them",
        )
    return _colon_hex(compact)


def describe(cert: x509.Certificate) -> CertificateInfo:
    """A plain description of ``cert``; raises TrustError when its extensions cannot be parsed."""
    try:
        extensions = cert.extensions
    except ValueError as exc:
        raise TrustError(f"certificate '{_subject(cert)}' has extensions that cannot be parsed") from exc
    sans: list[str] = []
    is_ca = False
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            sans = [_format_general_name(name) for name in extension.value]
        elif isinstance(extension.value, x509.BasicConstraints):
            is_ca = extension.value.ca
    return CertificateInfo(
        subject=_subject(cert),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "X"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sans=sans,
        fingerprint=fingerprint(cert),
        is_ca=is_ca,
        self_signed=_is_self_signed(cert),
    )


def remaining_lifetime_fraction(cert: x509.Certificate, now: datetime | None = None) -> float:
    """The part of the certificate's lifetime still ahead: 1.0 when new, 0.0 when expired (for renewal)."""
    moment = now or datetime.now(UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    total = (end - start).total_seconds()
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, (end - moment).total_seconds() / total))


# --- helpers ---------------------------------------------------------------------------------------------


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _colon_hex(hex_digits: str) -> str:
    upper = hex_digits.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def _common_name(value: str) -> x509.NameAttribute[str]:
    if not 1 <= len(value) <= 64:
        raise ConfigurationError(
            f"common name '{value}' must be 1 to 64 characters long, not {len(value)}",
            hint="choose a shorter name",
        )
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _general_name(raw: str) -> x509.GeneralName:
    host = str(raw).strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    bare = host[2:] if host.startswith("*.") else host
    if not bare or not valid_host(bare):
        raise ConfigurationError(
            f"host name '{raw}' cannot go into a server certificate: it is neither a DNS name nor an IP",
            hint="give names like 'hub.example.com', '*.example.com', '127.0.0.1' or '::1'",
        )
    return x509.DNSName(host.lower())


def _key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _validity(builder: x509.CertificateBuilder, days: int, ca_cert: x509.Certificate | None) -> x509.CertificateBuilder:
    if days < 1:
        raise ConfigurationError(f"a certificate lifetime of {days} days is too short", hint="give 1 day or more")
    now = datetime.now(UTC)
    not_after = now + timedelta(days=days)
    if ca_cert is not None:
        if ca_cert.not_valid_after_utc <= now:
            raise TrustError(
                f"the CA certificate '{_subject(ca_cert)}' expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}",
                hint="create a new CA and enroll the connectors again",
            )
        not_after = min(not_after, ca_cert.not_valid_after_utc)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)


def _check_issuer(ca_key: CertificateIssuerPrivateKeyTypes, ca_cert: x509.Certificate) -> None:
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*raw) != ca_cert.public_key().public_bytes(*raw):
        raise TrustError(
            f"the CA key does not belong to the CA certificate '{_subject(ca_cert)}'",
            hint="restore the CA key and certificate as a pair",
        )
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if not is_ca:
        raise TrustError(f"certificate '{_subject(ca_cert)}' is not a CA and cannot sign certificates")


def _check_public_key(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size >= 256:
        return
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    raise TrustError(
        f"the certificate signing request holds a {type(public_key).__name__} key, which is not accepted",
        hint="use an EC key of 256 bits or more (the connector makes P-256), RSA of 2048 bits or more, or Ed25519",
    )


def _sign_leaf(
    builder: x509.CertificateBuilder,
    public_key: CertificatePublicKeyTypes,
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        builder.issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(ca_key, _hash_for(ca_key))


def _format_general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}"
    return str(name)


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
