"""Certificates a hostile (or badly run) mail server presents, as server TLS contexts for the fake servers.

Owns: making, from the test PKI (root -> intermediate -> leaf), the server side of every certificate case the
client must refuse - a self-signed leaf, a chain under an unknown root, a leaf for another host, an expired leaf,
a leaf sent without its intermediate, and a server that speaks only TLS 1.0 - plus the good chain as the control,
and the client keystore that goes with them (the root only).
Must not: touch anything outside the folder it is given, or be used outside tests.
"""

from __future__ import annotations

import ipaddress
import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postbridge.trust.truststore import TrustStore
from tests.servers.pki import LEAF_NAMES, TestPki

#: The name the client checks (its tls_server_name); every good certificate carries it.
SERVER_NAME = "mail.corp.example"


@dataclass(frozen=True)
class ServerCertificate:
    """What a server presents: ``chain_pem`` (leaf first, then what it sends of the chain) and its key."""

    name: str
    chain_pem: bytes
    key_pem: bytes
    tls10_only: bool = False

    def context(self, folder: Path) -> ssl.SSLContext:
        """A server context presenting this chain (TLS 1.0 only when ``tls10_only``). Raises OSError, SSLError."""
        folder.mkdir(parents=True, exist_ok=True)
        chain, key = folder / f"{self.name}.chain.pem", folder / f"{self.name}.key.pem"
        chain.write_bytes(self.chain_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=str(chain), keyfile=str(key))
        if self.tls10_only:
            with warnings.catch_warnings():  # Python deprecates TLS 1.0, which is the point of this case
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0's SHA-1 signatures above 0
        return context


def old_tls_client_context() -> ssl.SSLContext:
    """A client that accepts TLS 1.0 and any certificate: proves the TLS 1.0-only server really speaks TLS 1.0."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def server_contexts(pki: TestPki, folder: Path) -> dict[str, ssl.SSLContext]:
    """Server contexts by name: "good" and every case of :func:`bad_certificates`."""
    certificates = {"good": good_certificate(pki), **bad_certificates(pki)}
    return {name: certificate.context(folder) for name, certificate in certificates.items()}


def root_keystore(pki: TestPki, folder: Path) -> Path:
    """A client keystore (trust store folder) holding only ``pki``'s root, not the intermediate."""
    store = TrustStore(folder)
    store.add(pki.root_pem.read_bytes(), alias="test-root")
    return store.directory


def _from_leaf(
    name: str, leaf: trustme.LeafCert, *, with_chain: bool = True, tls10_only: bool = False
) -> ServerCertificate:
    blobs = leaf.cert_chain_pems if with_chain else leaf.cert_chain_pems[:1]
    return ServerCertificate(
        name, b"".join(blob.bytes() for blob in blobs), leaf.private_key_pem.bytes(), tls10_only=tls10_only
    )


def _self_signed(names: tuple[str, ...]) -> ServerCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServerCertificate("self-signed", certificate.public_bytes(serialization.Encoding.PEM), key_pem)


def good_certificate(pki: TestPki) -> ServerCertificate:
    """The control: the test PKI's leaf with its intermediate (a client trusting the root accepts it)."""
    return _from_leaf("good", pki.leaf)


def bad_certificates(pki: TestPki) -> dict[str, ServerCertificate]:
    """Every certificate case a client that trusts only ``pki``'s root must refuse, by name."""
    now = datetime.now(UTC)
    stranger = trustme.CA(organization_name="not the test root").create_child_ca()
    return {
        "self-signed": _self_signed(LEAF_NAMES),
        "unknown-root": _from_leaf("unknown-root", stranger.issue_cert(*LEAF_NAMES)),
        "wrong-host": _from_leaf("wrong-host", pki.intermediate_ca.issue_cert("other.example", "127.0.0.9")),
        "expired": _from_leaf(
            "expired",
            pki.intermediate_ca.issue_cert(
                *LEAF_NAMES, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
            ),
        ),
        "missing-intermediate": _from_leaf("missing-intermediate", pki.leaf, with_chain=False),
        "tls1.0-only": _from_leaf("tls1.0-only", pki.leaf, tls10_only=True),
    }
