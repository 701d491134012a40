"""The server chain report: every certificate a server presents, trusted or not and why (trust/server_chain.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography import x509

from postbridge.trust.pki import load_certificates
from postbridge.trust.server_chain import explain_chain, names_host, peer_chain
from tests.hostile.certs import SERVER_NAME, bad_certificates, good_certificate
from tests.servers import LOOPBACK
from tests.servers.imaps import imaps_server
from tests.servers.pki import TestPki


def sent_chain(pem: bytes) -> list[x509.Certificate]:
    return load_certificates(pem)


def root_only(pki: TestPki) -> dict[str, x509.Certificate]:
    return {"test-root": load_certificates(pki.root_pem.read_bytes())[0]}


def test_a_good_chain_is_trusted_through_the_keystore_root(test_pki: TestPki) -> None:
    report = explain_chain(sent_chain(good_certificate(test_pki).chain_pem), root_only(test_pki), SERVER_NAME)
    assert report.trusted and report.problem == "" and report.fix == ""
    assert [c.role for c in report.certificates] == ["server", "intermediate", "root"]
    assert [c.sent for c in report.certificates] == [True, True, False]
    assert all(c.trusted for c in report.certificates)
    assert report.certificates[-1].source == "keystore 'test-root'"
    assert "trust anchor" in report.certificates[-1].why
    assert f"names '{SERVER_NAME}'" in report.certificates[0].why
    assert "2 certificate(s) sent" in report.summary and "test-root" in report.summary
    assert report.certificates[0].info.fingerprint and f"DNS:{SERVER_NAME}" in report.certificates[0].info.sans


@pytest.mark.parametrize(
    ("case", "problem", "words"),
    [
        ("missing-intermediate", "issuer-missing", "was not sent by the server and is not in the keystore"),
        ("unknown-root", "issuer-missing", "PKIX path building failed"),
        ("self-signed", "unknown-ca", "its own self-signed certificate"),
        ("expired", "expired", "expired on"),
        ("wrong-host", "name-mismatch", f"not for '{SERVER_NAME}'"),
    ],
)
def test_each_bad_chain_names_its_problem_and_the_fix(test_pki: TestPki, case: str, problem: str, words: str) -> None:
    presented = bad_certificates(test_pki)[case]
    report = explain_chain(sent_chain(presented.chain_pem), root_only(test_pki), SERVER_NAME)
    assert not report.trusted
    assert report.problem == problem
    assert words in report.cause
    assert report.fix
    assert not all(c.trusted for c in report.certificates)


def test_the_fix_for_a_name_mismatch_offers_a_name_the_certificate_carries(test_pki: TestPki) -> None:
    report = explain_chain(
        sent_chain(bad_certificates(test_pki)["wrong-host"].chain_pem), root_only(test_pki), SERVER_NAME
    )
    assert "tls_server_name" in report.fix and "(e.g. 'other.example')" in report.fix
    assert report.certificates[0].why == f"does not name '{SERVER_NAME}'"
    assert report.certificates[1].trusted  # the rest of the chain is fine


def test_anchor_candidates_prefer_a_sent_root_else_the_topmost_sent_ca(test_pki: TestPki) -> None:
    cases = bad_certificates(test_pki)
    self_signed = explain_chain(sent_chain(cases["self-signed"].chain_pem), {}, SERVER_NAME)
    assert [c.role for c in self_signed.anchor_candidates()] == ["self-signed"]
    stranger = explain_chain(sent_chain(cases["unknown-root"].chain_pem), root_only(test_pki), SERVER_NAME)
    assert [c.role for c in stranger.anchor_candidates()] == ["intermediate"]
    alone = explain_chain(sent_chain(cases["missing-intermediate"].chain_pem), root_only(test_pki), SERVER_NAME)
    assert alone.anchor_candidates() == []  # only the server certificate was sent
    assert alone.sent_pem().count(b"BEGIN CERTIFICATE") == 1


def test_a_sent_root_that_is_not_stored_is_an_unknown_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(SERVER_NAME)
    pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    report = explain_chain(sent_chain(pem), {}, SERVER_NAME)
    assert report.problem == "unknown-ca" and "is not in the keystore" in report.cause
    assert [c.role for c in report.certificates] == ["server", "root"]
    assert report.certificates[-1].why == "a root that is not in the keystore"
    assert [c.role for c in report.anchor_candidates()] == ["root"]


def test_a_certificate_sent_but_not_part_of_the_chain_is_listed_as_unused(test_pki: TestPki) -> None:
    stray = trustme.CA().cert_pem.bytes()
    pem = good_certificate(test_pki).chain_pem + stray
    report = explain_chain(sent_chain(pem), root_only(test_pki), SERVER_NAME)
    assert report.trusted
    assert report.certificates[-1].role == "unused" and not report.certificates[-1].trusted


def test_system_store_anchors_are_named_as_such(test_pki: TestPki) -> None:
    root = load_certificates(test_pki.root_pem.read_bytes())
    report = explain_chain(sent_chain(good_certificate(test_pki).chain_pem), {}, SERVER_NAME, system=root)
    assert report.trusted and report.certificates[-1].source == "the system store"


def test_names_host_follows_the_san_rules() -> None:
    ca = trustme.CA()
    cert = load_certificates(ca.issue_cert("*.corp.example", "mail.other.example", "127.0.0.1").cert_chain_pems[0]
                             .bytes())[0]  # fmt: skip
    assert names_host(cert, "imap.corp.example")
    assert names_host(cert, "IMAP.Corp.Example.")
    assert not names_host(cert, "corp.example")  # a wildcard covers one label, not the bare domain
    assert not names_host(cert, "a.b.corp.example")
    assert names_host(cert, "mail.other.example")
    assert names_host(cert, "127.0.0.1") and not names_host(cert, "127.0.0.2")
    assert not names_host(load_certificates(ca.cert_pem.bytes())[0], "anything")  # no SAN at all


def test_empty_chain_is_refused() -> None:
    with pytest.raises(ValueError, match="no certificate"):
        explain_chain([], {}, SERVER_NAME)


def test_peer_chain_reads_what_the_server_sent_and_what_openssl_verified(test_pki: TestPki) -> None:
    import socket

    with imaps_server(test_pki.server_context()) as port:
        raw = socket.create_connection((LOOPBACK, port), timeout=5)
        with test_pki.client_context().wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            sent = peer_chain(tls)
            verified = peer_chain(tls, verified=True)
    subjects = [cert.subject for cert in sent]
    assert len(sent) == 2 and len(verified) == 3
    assert [cert.subject for cert in verified[:2]] == subjects
    assert verified[-1] == load_certificates(test_pki.root_pem.read_bytes())[0]
