"""The lab's own PKI: a root CA, an intermediate CA below it, and the mail server's certificate from the intermediate.

Owns: making the three certificates (so that a client must build the chain root -> intermediate -> server, the way
a company CA is usually set up), writing them as PEM files into the lab folder (``root.pem`` and
``intermediate.pem`` for clients, ``server-chain.pem`` and ``server-key.pem`` for the servers), and the server-side
``ssl`` context all lab services share. Keys come from :mod:`postbridge.trust.pki`, and so does the server
certificate; only the CA pair is made here, because :func:`pki.create_ca` makes a CA that may sign end-entity
certificates only (path length 0) and cannot have an intermediate below it.

Must not: be used for anything but the lab (the CAs live 90 days and their keys are not kept), or write outside
the folder it is given.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postbridge.errors import ConfigurationError
from postbridge.home import atomic_write, private_dir
from postbridge.trust import pki

LIFETIME_DAYS = 90  # beyond the 30-day expiry warning, so a fresh lab shows no warning
ROOT_NAME = "postbridge lab root CA"
INTERMEDIATE_NAME = "postbridge lab intermediate CA"


@dataclass(frozen=True)
class LabPki:
    """Where the lab's certificates are, and the fingerprints a person compares before trusting them."""

    root_pem: Path
    intermediate_pem: Path
    chain_pem: Path  # server certificate followed by the intermediate: what the servers present
    key_pem: Path  # the server certificate's key (mode 0600)
    root_fingerprint: str
    intermediate_fingerprint: str

    def server_context(self) -> ssl.SSLContext:
        """The TLS context of every lab service (TLS 1.2 minimum, no client certificates).

        Raises ConfigurationError when the files cannot be loaded (removed or changed while the lab starts).
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(certfile=str(self.chain_pem), keyfile=str(self.key_pem))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"the lab server certificate in '{self.chain_pem.parent}' cannot be loaded: {exc}",
                hint="start the lab again with a folder nothing else writes to",
            ) from exc
        return context


def make_lab_pki(folder: Path, server_names: list[str]) -> LabPki:
    """Create root -> intermediate -> server certificate for ``server_names`` and write them into ``folder``.

    Raises ConfigurationError for a server name that cannot go into a certificate, HomeError when the folder cannot
    be written.
    """
    private_dir(folder)
    root_key, root = _certificate_authority(ROOT_NAME, issuer=None, path_length=1)
    intermediate_key, intermediate = _certificate_authority(INTERMEDIATE_NAME, issuer=(root_key, root), path_length=0)
    server_key, server = pki.issue_server_certificate(intermediate_key, intermediate, server_names, days=LIFETIME_DAYS)
    result = LabPki(
        root_pem=folder / "root.pem",
        intermediate_pem=folder / "intermediate.pem",
        chain_pem=folder / "server-chain.pem",
        key_pem=folder / "server-key.pem",
        root_fingerprint=pki.fingerprint(root),
        intermediate_fingerprint=pki.fingerprint(intermediate),
    )
    atomic_write(result.root_pem, pki.cert_pem(root), mode=0o644)
    atomic_write(result.intermediate_pem, pki.cert_pem(intermediate), mode=0o644)
    atomic_write(result.chain_pem, pki.cert_pem(server) + pki.cert_pem(intermediate), mode=0o644)
    atomic_write(result.key_pem, pki.key_pem(server_key), mode=0o600)
    return result


def _certificate_authority(
    common_name: str,
    *,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    path_length: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA certificate signed by ``issuer`` (self-signed when None) that may have ``path_length`` CAs below it."""
    key = pki.generate_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "postbridge lab"),
        ]
    )
    signing_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    subject_key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    authority_key_id = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id)
        if issuer is None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key())
    )
    now = datetime.now(UTC)
    not_after = now + timedelta(days=LIFETIME_DAYS)
    if issuer is not None:
        not_after = min(not_after, issuer[1].not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - pki.CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(subject_key_id, critical=False)
        .add_extension(authority_key_id, critical=False)
    )
    return key, builder.sign(signing_key, hashes.SHA256())
