"""Tests for postbridge.trust.truststore: adding, listing, removing, and the TLS client context of the store.

TLS tests do real handshakes over 127.0.0.1; trustme provides a foreign CA.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from postbridge.errors import ConfigurationError, TrustError
from postbridge.home import atomic_write
from postbridge.trust.pki import (
    cert_pem,
    create_ca,
    fingerprint,
    generate_key,
    issue_server_certificate,
    key_pem,
)
from postbridge.trust.truststore import TrustStore

# --- helpers ---------------------------------------------------------------------------------------------


def self_signed(
    common_name: str, *, ca: bool, days: int = 365, start_days: int = -1, hosts: tuple[str, ...] = ()
) -> tuple[Any, x509.Certificate]:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start_days))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host) for host in hosts]), critical=False
        )
    return key, builder.sign(key, hashes.SHA256())


def serve_once(configure: Callable[[ssl.SSLContext], None], client: ssl.SSLContext, hostname: str) -> Any:
    """One real handshake over 127.0.0.1; returns b'hello' on success or the client's exception."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure(server)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def run() -> None:
        try:
            connection, _ = listener.accept()
            connection.settimeout(10)
            with server.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=run, name="tls-test-server")
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname()[:2], timeout=10) as raw,
            client.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            return tls.recv(5)
    except (ssl.SSLError, OSError) as exc:
        return exc
    finally:
        thread.join(15)
        listener.close()


def pem_files(key: Any, cert: x509.Certificate, tmp_path: Path) -> Callable[[ssl.SSLContext], None]:
    cert_file = tmp_path / f"leaf-{cert.serial_number}.pem"
    key_file = tmp_path / f"leaf-{cert.serial_number}.key"
    cert_file.write_bytes(cert_pem(cert))
    key_file.write_bytes(key_pem(key))
    return lambda context: context.load_cert_chain(cert_file, key_file)


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "trust")


@pytest.fixture(scope="module")
def corp_ca() -> tuple[Any, x509.Certificate]:
    return create_ca("Corp Root CA")


@pytest.fixture(scope="module")
def other_ca() -> tuple[Any, x509.Certificate]:
    return create_ca("Other Root CA")


def files(store: TrustStore) -> list[str]:
    return sorted(os.listdir(store.directory)) if store.directory.exists() else []


# --- adding ----------------------------------------------------------------------------------------------


def test_add_pem_derives_alias_and_writes_private_files(store: TrustStore, corp_ca: Any) -> None:
    entries = store.add(cert_pem(corp_ca[1]), source="corp.pem")
    assert [entry.alias for entry in entries] == ["corp-root-ca"]
    assert entries[0].info.fingerprint == fingerprint(corp_ca[1])
    assert files(store) == ["corp-root-ca.pem"]
    assert stat.S_IMODE(os.stat(store.directory / "corp-root-ca.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert store.list() == entries


def test_add_der_with_alias(store: TrustStore, corp_ca: Any) -> None:
    der = corp_ca[1].public_bytes(serialization.Encoding.DER)
    entries = store.add(der, alias="mail-ca")
    assert [entry.alias for entry in entries] == ["mail-ca"]
    assert (store.directory / "mail-ca.pem").read_bytes() == cert_pem(corp_ca[1])


def test_add_bundle_stores_each_certificate(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    bundle = cert_pem(corp_ca[1]) + cert_pem(other_ca[1])
    entries = store.add(bundle, alias="bundle")
    assert [entry.alias for entry in entries] == ["bundle", "bundle-2"]
    assert [entry.info.subject for entry in store.list()] == ["CN=Corp Root CA", "CN=Other Root CA"]


def test_default_aliases_are_unique_and_fall_back_to_fingerprint(store: TrustStore) -> None:
    _, first = self_signed("Root CA", ca=True)
    _, second = self_signed("Root CA", ca=True)
    foreign = trustme.CA()  # its subject has no common name
    store.add(cert_pem(first))
    entries = store.add(cert_pem(second) + foreign.cert_pem.bytes())
    foreign_cert = x509.load_pem_x509_certificate(foreign.cert_pem.bytes())
    expected = fingerprint(foreign_cert).replace(":", "")[:16].lower()
    assert [entry.alias for entry in entries] == ["root-ca-2", expected]
    assert [entry.alias for entry in store.list()] == sorted(["root-ca", "root-ca-2", expected])


def test_duplicate_is_refused_naming_the_existing_alias(store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="first")
    with pytest.raises(ConfigurationError, match="already in the trust store as 'first'"):
        store.add(corp_ca[1].public_bytes(serialization.Encoding.DER), alias="second")
    with pytest.raises(ConfigurationError, match="appears twice"):
        store.add(cert_pem(self_signed("x", ca=True)[1]) * 2)
    assert files(store) == ["first.pem"]


def test_existing_alias_is_refused(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="mail-ca")
    with pytest.raises(ConfigurationError, match="alias 'mail-ca' is already used"):
        store.add(cert_pem(other_ca[1]), alias="mail-ca")
    assert files(store) == ["mail-ca.pem"]


@pytest.mark.parametrize("alias", ["", "../evil", ".hidden", "has space", "a/b", "x" * 65, "ü"])
def test_bad_alias_is_refused(store: TrustStore, corp_ca: Any, alias: str) -> None:
    with pytest.raises(ConfigurationError, match="is not valid"):
        store.add(cert_pem(corp_ca[1]), alias=alias)
    assert files(store) == []


def test_bundle_alias_suffix_must_fit(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    with pytest.raises(ConfigurationError, match="is not valid"):
        store.add(cert_pem(corp_ca[1]) + cert_pem(other_ca[1]), alias="x" * 64)
    assert files(store) == []


@pytest.mark.parametrize("data", [b"", b"not a certificate", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_non_certificate_is_refused(store: TrustStore, data: bytes) -> None:
    with pytest.raises(TrustError, match=r"'upload\.bin' holds no"):
        store.add(data, source="upload.bin")
    assert files(store) == []


def test_leaf_issued_by_a_ca_is_refused_with_a_hint(store: TrustStore, corp_ca: Any) -> None:
    _, leaf = issue_server_certificate(corp_ca[0], corp_ca[1], ["mail.internal"])
    with pytest.raises(TrustError) as caught:
        store.add(cert_pem(leaf), source="mail.pem")
    assert "CN=mail.internal" in caught.value.message
    assert "CN=Corp Root CA" in caught.value.hint and "instead" in caught.value.hint
    assert files(store) == []


def test_expired_certificate_is_refused(store: TrustStore) -> None:
    _, expired = self_signed("Old CA", ca=True, days=-1, start_days=-10)
    with pytest.raises(TrustError, match="expired on"):
        store.add(cert_pem(expired))
    assert files(store) == []


def test_bundle_with_bad_second_entry_adds_nothing(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    _, leaf = issue_server_certificate(corp_ca[0], corp_ca[1], ["mail.internal"])
    with pytest.raises(TrustError, match="certificate 2 of 2"):
        store.add(cert_pem(corp_ca[1]) + cert_pem(leaf), alias="bundle")
    assert files(store) == []
    store.add(cert_pem(other_ca[1]), alias="other")
    with pytest.raises(ConfigurationError, match="certificate 2 of 2"):
        store.add(cert_pem(corp_ca[1]) + cert_pem(other_ca[1]))
    assert files(store) == ["other.pem"]


def test_failed_write_rolls_back_earlier_files(
    store: TrustStore, corp_ca: Any, other_ca: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def failing_write(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        atomic_write(path, data, mode=mode)

    monkeypatch.setattr("postbridge.trust.truststore.atomic_write", failing_write)
    with pytest.raises(ConfigurationError, match="No space left"):
        store.add(cert_pem(corp_ca[1]) + cert_pem(other_ca[1]))
    assert len(calls) == 2
    assert files(store) == []


# --- listing and removing --------------------------------------------------------------------------------


def test_remove_by_alias_and_by_fingerprint(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="corp")
    store.add(cert_pem(other_ca[1]), alias="other")
    removed = store.remove("corp")
    assert removed.alias == "corp" and removed.info.fingerprint == fingerprint(corp_ca[1])
    typed = fingerprint(other_ca[1]).replace(":", "").lower()
    assert store.remove(typed).alias == "other"
    assert files(store) == [] and store.list() == []


def test_remove_unknown_lists_the_aliases(store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="corp")
    with pytest.raises(ConfigurationError) as caught:
        store.remove("nope")
    assert "'nope'" in caught.value.message and "corp" in caught.value.hint
    with pytest.raises(ConfigurationError, match="empty"):
        TrustStore(store.directory.parent / "missing").remove("nope")


def test_unreadable_file_is_reported_by_name(store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="good")
    (store.directory / "broken.pem").write_bytes(b"junk")
    with pytest.raises(TrustError, match=r"broken\.pem"):
        store.list()
    with pytest.raises(TrustError, match=r"broken\.pem"):
        store.ssl_context()
    with pytest.raises(TrustError) as caught:
        store.remove("broken")
    assert "delete the file" in caught.value.hint
    assert store.remove("good").alias == "good"


def test_expiring_within(store: TrustStore) -> None:
    _, short = create_ca("Short CA", days=10)
    _, long = create_ca("Long CA")
    store.add(cert_pem(short) + cert_pem(long))
    assert [entry.alias for entry in store.expiring_within(30)] == ["short-ca"]
    assert store.expiring_within(5) == []
    later = datetime.now(UTC) + timedelta(days=3660)
    assert [entry.alias for entry in store.expiring_within(0, now=later)] == ["long-ca", "short-ca"]


# --- the TLS client context ------------------------------------------------------------------------------


def test_context_settings_hold_only_the_store(store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]))
    context = store.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_CLIENT
    stored = context.get_ca_certs()
    assert len(stored) == 1 and stored[0]["subject"] == ((("commonName", "Corp Root CA"),),)


def test_context_verifies_server_of_a_stored_ca(tmp_path: Path, store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]))
    key, leaf = issue_server_certificate(corp_ca[0], corp_ca[1], ["mail.internal", "127.0.0.1"])
    configure = pem_files(key, leaf, tmp_path)
    assert serve_once(configure, store.ssl_context(), "mail.internal") == b"hello"
    assert serve_once(configure, store.ssl_context(), "127.0.0.1") == b"hello"
    mismatch = serve_once(configure, store.ssl_context(), "other.internal")
    assert isinstance(mismatch, ssl.SSLCertVerificationError) and "mismatch" in mismatch.verify_message


def test_context_rejects_server_of_a_foreign_ca(store: TrustStore, corp_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]))
    foreign = trustme.CA()
    result = serve_once(foreign.issue_cert("127.0.0.1").configure_cert, store.ssl_context(), "127.0.0.1")
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert "unable to get local issuer" in result.verify_message


def test_context_trusts_a_self_signed_server_certificate(tmp_path: Path, store: TrustStore) -> None:
    key, cert = self_signed("mail.internal", ca=False, hosts=("mail.internal",))
    store.add(cert_pem(cert), alias="mail-self-signed")
    assert serve_once(pem_files(key, cert, tmp_path), store.ssl_context(), "mail.internal") == b"hello"


def test_context_trusts_a_stored_intermediate_alone(store: TrustStore) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    store.add(intermediate.cert_pem.bytes(), alias="intermediate")
    leaf = intermediate.issue_cert("mail.internal")
    assert serve_once(leaf.configure_cert, store.ssl_context(), "mail.internal") == b"hello"


def test_empty_store_has_no_context(store: TrustStore, corp_ca: Any) -> None:
    with pytest.raises(TrustError) as caught:
        store.ssl_context()
    assert caught.value.message == "the backend trust store is empty, so no TLS server can be trusted"
    assert "'postbridge connector truststore add FILE'" in caught.value.hint
    store.add(cert_pem(corp_ca[1]), alias="corp")
    store.remove("corp")
    with pytest.raises(TrustError, match="is empty"):
        store.ssl_context()


def test_context_is_cached_until_the_folder_changes(store: TrustStore, corp_ca: Any, other_ca: Any) -> None:
    store.add(cert_pem(corp_ca[1]), alias="corp")
    first = store.ssl_context()
    assert store.ssl_context() is first
    store.add(cert_pem(other_ca[1]), alias="other")
    second = store.ssl_context()
    assert second is not first and len(second.get_ca_certs()) == 2
    assert store.ssl_context() is second
    store.remove("corp")
    third = store.ssl_context()
    assert third is not second and len(third.get_ca_certs()) == 1
