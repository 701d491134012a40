"""Tests for postbridge.trust.pki: CA, server and connector certificates, identities, loading, fingerprints.

TLS tests do real handshakes over 127.0.0.1 (a server thread and a blocking client).
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from postbridge.errors import ConfigurationError, TrustError
from postbridge.trust.pki import (
    ConnectorIdentity,
    build_csr,
    cert_pem,
    create_ca,
    describe,
    fingerprint,
    generate_key,
    issue_connector_certificate,
    issue_server_certificate,
    key_pem,
    load_certificates,
    load_private_key,
    parse_fingerprint,
    remaining_lifetime_fraction,
    validate_name,
)

# --- a real TLS handshake on loopback -------------------------------------------------------------


@dataclass
class Outcome:
    received: bytes = b""
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    peercert: dict[str, Any] | None = field(default=None)


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str) -> Outcome:
    """Connect over 127.0.0.1; the server sends b'hello' after its handshake and records the client cert."""
    outcome = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError as exc:
            outcome.server_error = exc
            return
        connection.settimeout(10)
        try:
            with server_context.wrap_socket(connection, server_side=True) as tls:
                outcome.peercert = tls.getpeercert()
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = exc
        finally:
            connection.close()

    thread = threading.Thread(target=serve, name="tls-test-server")
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            while len(outcome.received) < 5:
                chunk = tls.recv(5 - len(outcome.received))
                if not chunk:
                    break
                outcome.received += chunk
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = exc
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive()
    return outcome


def server_context(
    tmp_path: Path, key: Any, cert: x509.Certificate, *, client_ca: x509.Certificate | None = None
) -> ssl.SSLContext:
    cert_file = tmp_path / f"server-{cert.serial_number}.pem"
    key_file = tmp_path / f"key-{cert.serial_number}.pem"
    cert_file.write_bytes(cert_pem(cert))
    key_file.write_bytes(key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=cert_pem(client_ca).decode())
    return context


def client_context(ca: x509.Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=cert_pem(ca).decode())
    return context


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_ca("postbridge test CA")


@pytest.fixture(scope="module")
def server(ca: Any) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return issue_server_certificate(ca[0], ca[1], ["hub.test", "127.0.0.1", "::1", "localhost"])


IDENTITY = ConnectorIdentity("acme", "dc1", "conn-1")

# --- CA and server certificates -------------------------------------------------------------------


def test_create_ca_is_a_self_signed_p256_ca(ca: Any) -> None:
    key, cert = ca
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    info = describe(cert)
    assert info.is_ca and info.self_signed
    assert info.subject == "CN=postbridge test CA" == info.issuer
    assert 3649 <= (info.not_after - datetime.now(UTC)).days <= 3650


def test_server_certificate_fields(ca: Any, server: Any) -> None:
    _, cert = server
    info = describe(cert)
    assert info.sans == ["DNS:hub.test", "IP:127.0.0.1", "IP:::1", "DNS:localhost"]
    assert info.subject == "CN=hub.test" and not info.is_ca and not info.self_signed
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.verify_directly_issued_by(ca[1])


def test_server_certificate_never_outlives_its_ca() -> None:
    ca_key, ca_cert = create_ca("short CA", days=10)
    _, cert = issue_server_certificate(ca_key, ca_cert, ["hub.test"], days=825)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


@pytest.mark.parametrize("name", ["hub.test", "localhost", "127.0.0.1", "::1"])
def test_server_certificate_verifies_in_real_handshake(tmp_path: Path, ca: Any, server: Any, name: str) -> None:
    outcome = handshake(server_context(tmp_path, *server), client_context(ca[1]), name)
    assert outcome.client_error is None, outcome.client_error
    assert outcome.received == b"hello"


@pytest.mark.parametrize("name", ["other.test", "127.0.0.2", "::2"])
def test_hostname_mismatch_fails_the_handshake(tmp_path: Path, ca: Any, server: Any, name: str) -> None:
    outcome = handshake(server_context(tmp_path, *server), client_context(ca[1]), name)
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in outcome.client_error.verify_message
    assert outcome.received == b""


def test_certificate_of_another_ca_fails_the_handshake(tmp_path: Path, ca: Any) -> None:
    other_key, other_cert = create_ca("other CA")
    foreign = issue_server_certificate(other_key, other_cert, ["127.0.0.1"])
    outcome = handshake(server_context(tmp_path, *foreign), client_context(ca[1]), "127.0.0.1")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer" in outcome.client_error.verify_message


@pytest.mark.parametrize("hostnames", [[], ["bad host!"], ["-.-"], ["*."]])
def test_server_certificate_refuses_bad_host_names(ca: Any, hostnames: list[str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        issue_server_certificate(ca[0], ca[1], hostnames)
    if hostnames:
        assert hostnames[0] in str(caught.value)


def test_issuing_with_a_key_of_another_ca_is_refused(ca: Any) -> None:
    other_key, _ = create_ca("other CA")
    with pytest.raises(TrustError, match="does not belong"):
        issue_server_certificate(other_key, ca[1], ["hub.test"])


def test_a_leaf_cannot_issue(server: Any) -> None:
    with pytest.raises(TrustError, match="not a CA"):
        issue_server_certificate(server[0], server[1], ["x.test"])


def test_lifetime_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="0 days"):
        create_ca("x", days=0)


# --- connector certificates and identities --------------------------------------------------------


def test_connector_certificate_from_csr(ca: Any) -> None:
    key = generate_key()
    cert = issue_connector_certificate(ca[0], ca[1], build_csr(key, "ignored"), IDENTITY)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "conn-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "dc1"
    assert describe(cert).sans == ["URI:urn:postbridge:connector:acme:dc1:conn-1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert 29 <= (cert.not_valid_after_utc - datetime.now(UTC)).days <= 30
    cert.verify_directly_issued_by(ca[1])
    assert ConnectorIdentity.from_certificate(cert) == IDENTITY


def test_connector_certificate_default_location_has_no_ou_and_serials_are_random(ca: Any) -> None:
    identity = ConnectorIdentity("acme", "", "c2")
    csr = build_csr(generate_key(), "c2")
    first = issue_connector_certificate(ca[0], ca[1], csr, identity)
    second = issue_connector_certificate(ca[0], ca[1], csr, identity)
    assert first.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    assert first.serial_number != second.serial_number
    assert ConnectorIdentity.from_certificate(first) == identity


def test_mutual_tls_handshake_carries_the_identity(tmp_path: Path, ca: Any, server: Any) -> None:
    key = generate_key()
    cert = issue_connector_certificate(ca[0], ca[1], build_csr(key, "conn-1"), IDENTITY)
    (tmp_path / "client.pem").write_bytes(cert_pem(cert))
    (tmp_path / "client.key").write_bytes(key_pem(key))
    client = client_context(ca[1])
    client.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    outcome = handshake(server_context(tmp_path, *server, client_ca=ca[1]), client, "hub.test")
    assert outcome.server_error is None and outcome.client_error is None
    assert outcome.received == b"hello"
    assert ConnectorIdentity.from_peercert(outcome.peercert) == IDENTITY


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(tmp_path: Path, ca: Any, server: Any) -> None:
    other_key, other_cert = create_ca("rogue CA")
    key = generate_key()
    cert = issue_connector_certificate(other_key, other_cert, build_csr(key, "conn-1"), IDENTITY)
    (tmp_path / "client.pem").write_bytes(cert_pem(cert))
    (tmp_path / "client.key").write_bytes(key_pem(key))
    client = client_context(ca[1])
    client.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    outcome = handshake(server_context(tmp_path, *server, client_ca=ca[1]), client, "hub.test")
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.received == b""


def test_tampered_csr_is_refused(ca: Any) -> None:
    csr_pem = build_csr(generate_key(), "honest-name")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    tampered_der = der.replace(b"honest-name", b"forged-name")
    assert tampered_der != der
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(TrustError, match="wrong signature"):
        issue_connector_certificate(ca[0], ca[1], tampered, IDENTITY)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_unparsable_csr_is_refused(ca: Any, data: bytes) -> None:
    with pytest.raises(TrustError, match="cannot be parsed"):
        issue_connector_certificate(ca[0], ca[1], data, IDENTITY)


def test_weak_csr_key_is_refused(ca: Any) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(TrustError, match="RSA"):
        issue_connector_certificate(ca[0], ca[1], build_csr(weak, "weak"), IDENTITY)


def test_identity_uri_form() -> None:
    assert IDENTITY.to_uri() == "urn:postbridge:connector:acme:dc1:conn-1"
    assert ConnectorIdentity("a", "", "c").to_uri() == "urn:postbridge:connector:a::c"
    assert ConnectorIdentity.from_uri("urn:postbridge:connector:a::c") == ConnectorIdentity("a", "", "c")


@pytest.mark.parametrize(
    "uri",
    [
        "urn:other:connector:a:b:c",
        "urn:postbridge:connector:a:b",
        "urn:postbridge:connector:a:b:c:d",
        "urn:postbridge:connector:a%3Ab:loc:c",
        "urn:postbridge:connector::loc:c",
        "urn:postbridge:connector:%41cme:loc:c",
        "urn:postbridge:connector:a:loc:%ff",
    ],
)
def test_identity_from_bad_uri_is_refused(uri: str) -> None:
    with pytest.raises(TrustError):
        ConnectorIdentity.from_uri(uri)


@given(
    subaccount=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    location=st.from_regex(r"[A-Za-z0-9._-]{0,64}", fullmatch=True),
    connector_id=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
)
def test_identity_uri_round_trips(subaccount: str, location: str, connector_id: str) -> None:
    identity = ConnectorIdentity(subaccount, location, connector_id)
    assert ConnectorIdentity.from_uri(identity.to_uri()) == identity


def test_identity_with_invalid_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'a:b'"):
        ConnectorIdentity("a:b", "", "c")
    with pytest.raises(ConfigurationError, match="connector id"):
        ConnectorIdentity("a", "", "")


@pytest.mark.parametrize(
    "peercert",
    [
        {},
        None,
        {"subjectAltName": (("DNS", "hub.test"),)},
        {"subjectAltName": (("URI", "https://example.test/"),)},
        {
            "subjectAltName": (
                ("URI", "urn:postbridge:connector:a::b"),
                ("URI", "urn:postbridge:connector:a::c"),
            )
        },
    ],
)
def test_identity_from_peercert_without_one_identity_is_refused(peercert: dict[str, Any] | None) -> None:
    with pytest.raises(TrustError, match="instead of one"):
        ConnectorIdentity.from_peercert(peercert)


def test_identity_from_server_certificate_is_refused(server: Any) -> None:
    with pytest.raises(TrustError, match="no postbridge connector identities"):
        ConnectorIdentity.from_certificate(server[1])


@pytest.mark.parametrize("value", ["dc1", "a", "A.b_c-9", "x" * 64])
def test_validate_name_accepts(value: str) -> None:
    assert validate_name(value, "location ID") == value


@pytest.mark.parametrize("value", ["", "x" * 65, "has space", "a/b", "ü", "a:b"])
def test_validate_name_refuses_and_quotes(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        validate_name(value, "location ID")
    assert f"location ID '{value}'" in str(caught.value)


def test_validate_name_allows_empty_only_when_asked() -> None:
    assert validate_name("", "location ID", allow_empty=True) == ""


# --- loading, fingerprints, lifetime --------------------------------------------------------------


def test_load_certificates_pem_bundle_and_der(ca: Any, server: Any) -> None:
    bundle = cert_pem(server[1]) + b"\n" + cert_pem(ca[1])
    assert load_certificates(bundle) == [server[1], ca[1]]
    der = ca[1].public_bytes(serialization.Encoding.DER)
    assert load_certificates(der) == [ca[1]]


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x03\x02\x01\x01"])
def test_load_certificates_refuses_garbage(data: bytes) -> None:
    with pytest.raises(TrustError) as caught:
        load_certificates(data, source="junk.bin")
    assert str(caught.value).startswith("'junk.bin' holds no certificate in PEM or DER form")


def test_load_certificates_refuses_a_key_and_a_broken_pem(ca: Any) -> None:
    with pytest.raises(TrustError, match=r"'key\.pem' holds no certificate"):
        load_certificates(key_pem(ca[0]), source="key.pem")
    lines = cert_pem(ca[1]).splitlines()
    lines[3] = b"!!!!" + lines[3][4:]
    with pytest.raises(TrustError, match="cannot be parsed"):
        load_certificates(b"\n".join(lines), source="broken.pem")


def test_load_private_key(tmp_path: Path) -> None:
    key = generate_key()
    loaded = load_private_key(key_pem(key), source="k.pem")
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-password"),
    )
    with pytest.raises(TrustError, match=r"'enc\.pem' is encrypted") as caught:
        load_private_key(encrypted, source="enc.pem")
    assert "secret-password" not in str(caught.value)
    with pytest.raises(TrustError, match=r"'junk' holds no usable private key"):
        load_private_key(b"junk", source="junk")


def test_fingerprint_format(ca: Any) -> None:
    value = fingerprint(ca[1])
    assert re.fullmatch(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}", value)
    digest = hashlib.sha256(ca[1].public_bytes(serialization.Encoding.DER)).hexdigest()
    assert value.replace(":", "") == digest.upper()
    assert describe(ca[1]).fingerprint == value


def test_parse_fingerprint_normalises(ca: Any) -> None:
    value = fingerprint(ca[1])
    compact = value.replace(":", "")
    for typed in (value, value.lower(), compact.lower(), f"  {compact}  ", f"SHA256 Fingerprint={value}"):
        assert parse_fingerprint(typed) == value


@pytest.mark.parametrize("text", ["", "AB:CD", "Z" * 64, "A" * 63, "A" * 66])
def test_parse_fingerprint_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError, match="is not a SHA-256 fingerprint"):
        parse_fingerprint(text)


def test_describe_fields(server: Any) -> None:
    info = describe(server[1])
    assert info.serial == format(server[1].serial_number, "X")
    assert info.not_before.tzinfo is not None and info.not_after.tzinfo is not None
    assert info.not_before < datetime.now(UTC) < info.not_after
    assert info.issuer == "CN=postbridge test CA"
    assert not info.expires_within(30)
    assert info.expires_within(900)


def test_remaining_lifetime_fraction(ca: Any) -> None:
    _, cert = issue_server_certificate(ca[0], ca[1], ["hub.test"], days=10)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert remaining_lifetime_fraction(cert) > 0.99
    assert remaining_lifetime_fraction(cert, start + (end - start) / 2) == pytest.approx(0.5)
    assert remaining_lifetime_fraction(cert, start + (end - start) * 0.8) == pytest.approx(0.2)
    assert remaining_lifetime_fraction(cert, end + timedelta(seconds=1)) == 0.0
    assert remaining_lifetime_fraction(cert, start - timedelta(days=1)) == 1.0
