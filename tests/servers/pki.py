"""Throwaway three-level PKI for tests: root CA -> intermediate CA -> leaf for the test mail server.

Owns: creating the certificates with trustme and writing them as PEM files into one folder, the way a mail
server (leaf + intermediate chain, key) and a client (root only) each need them.
Must not: touch anything outside the folder it is given, or be used outside tests.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

#: Names the leaf certificate is valid for: the virtual host used across the tests, and loopback
#: (127.0.0.2 is where a Dovecot with require_tls_login=True listens).
LEAF_NAMES = ("mail.corp.example", "localhost", "127.0.0.1", "127.0.0.2")


@dataclass(frozen=True)
class TestPki:
    """Paths of the PEM files of one throwaway PKI, and the trustme objects for issuing more."""

    __test__ = False  # not a pytest test class, despite the name

    folder: Path
    root_pem: Path  # the root CA certificate: what a client trusts
    intermediate_pem: Path  # the intermediate CA certificate alone
    leaf_pem: Path  # the leaf certificate alone
    chain_pem: Path  # leaf + intermediate: what a server presents (Dovecot ssl_cert)
    key_pem: Path  # the leaf's private key (unencrypted)
    root_ca: trustme.CA
    intermediate_ca: trustme.CA
    leaf: trustme.LeafCert

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this PKI's root (hostname checking on)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.load_verify_locations(cafile=str(self.root_pem))
        return context

    def server_context(self) -> ssl.SSLContext:
        """A server context presenting the leaf and the intermediate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile=str(self.chain_pem), keyfile=str(self.key_pem))
        return context


def make_test_pki(folder: Path, names: tuple[str, ...] = LEAF_NAMES) -> TestPki:
    """Create a root, an intermediate and a leaf for `names`, and write their PEM files into `folder`.

    Raises OSError when the folder cannot be created or written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    root_ca = trustme.CA(organization_name="postbridge test root")
    intermediate_ca = root_ca.create_child_ca()
    leaf = intermediate_ca.issue_cert(*names)

    root_pem = folder / "root.pem"
    intermediate_pem = folder / "intermediate.pem"
    leaf_pem = folder / "leaf.pem"
    chain_pem = folder / "chain.pem"
    key_pem = folder / "key.pem"

    root_ca.cert_pem.write_to_path(str(root_pem))
    intermediate_ca.cert_pem.write_to_path(str(intermediate_pem))
    leaf_blob, *chain_blobs = leaf.cert_chain_pems
    leaf_blob.write_to_path(str(leaf_pem))
    chain_pem.write_bytes(b"".join(blob.bytes() for blob in (leaf_blob, *chain_blobs)))
    leaf.private_key_pem.write_to_path(str(key_pem))
    key_pem.chmod(0o600)
    return TestPki(
        folder=folder,
        root_pem=root_pem,
        intermediate_pem=intermediate_pem,
        leaf_pem=leaf_pem,
        chain_pem=chain_pem,
        key_pem=key_pem,
        root_ca=root_ca,
        intermediate_ca=intermediate_ca,
        leaf=leaf,
    )
