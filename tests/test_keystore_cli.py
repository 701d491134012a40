"""Tests for ``postbridge keystore …`` (through the real CLI) and the chain check in postbridge.trust.chains.

Certificates are made on the fly with cryptography (a root -> intermediate -> issuing intermediate -> leaf PKI,
impostor CAs with the same name, a certificate that expires in 10 days). The chain walk is tested in process;
every command is run as a user would run it (``python -m postbridge --home H keystore …``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postbridge.home import atomic_write
from postbridge.trust.chains import ChainStatus, LinkProblem, build_chain
from postbridge.trust.pki import cert_pem, fingerprint
from postbridge.trust.truststore import TrustStore
from tests.harness import cli

# --- certificates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)


def make_cert(
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = True,
    path_length: int | None = None,
    days: float = 365,
    start_days: float = -1,
    cert_sign: bool = True,
    hosts: tuple[str, ...] = (),
) -> Issued:
    """A certificate for CN=name, self-signed without ``issuer``; CAs get keyCertSign unless told otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start_days))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    root: Issued
    intermediate: Issued
    issuing: Issued  # the intermediate that issues server certificates
    leaf: Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = make_cert("Corp Root")
    intermediate = make_cert("Corp Intermediate", root)
    issuing = make_cert("Corp Mail Issuing", intermediate)
    leaf = make_cert("mail.corp.example", issuing, ca=False, hosts=("mail.corp.example", "imap.corp.example"))
    return Pki(root, intermediate, issuing, leaf)


def keystore(home: Path) -> TrustStore:
    return TrustStore(home / "keystore")


def flat(text: str) -> str:
    """Messages as one line (rich wraps long lines at the terminal width)."""
    return " ".join(text.split())


def run_json(home: Path, *args: str, check: bool = True) -> object:
    return json.loads(cli(home, "keystore", *args, "--json", check=check).stdout)


# --- the chain walk (in process) -------------------------------------------------------------------------


def test_chain_builds_from_leaf_to_stored_root(pki: Pki) -> None:
    store = {"root": pki.root.cert, "inter": pki.intermediate.cert, "issuing": pki.issuing.cert}
    result = build_chain(pki.leaf.cert, store)
    assert result.status is ChainStatus.ROOT and result.ok
    assert [link.subject for link in result.links] == [
        "CN=mail.corp.example",
        "CN=Corp Mail Issuing",
        "CN=Corp Intermediate",
        "CN=Corp Root",
    ]
    assert [link.alias for link in result.links] == [None, "issuing", "inter", "root"]
    assert [link.role for link in result.links] == ["leaf", "intermediate", "intermediate", "root"]
    assert result.issues == ()


def test_stored_intermediate_without_root_is_an_anchor(pki: Pki) -> None:
    result = build_chain(pki.issuing.cert, [pki.issuing.cert, pki.intermediate.cert])
    assert result.status is ChainStatus.ANCHOR and result.ok
    assert result.summary == "anchor (intermediate, root not stored)"
    assert len(result.links) == 2


def test_leaf_whose_issuer_is_missing_is_broken(pki: Pki) -> None:
    result = build_chain(pki.leaf.cert, [pki.root.cert, pki.intermediate.cert])
    assert result.status is ChainStatus.BROKEN and not result.ok
    assert [issue.problem for issue in result.issues] == [LinkProblem.ISSUER_MISSING]
    assert "'CN=Corp Mail Issuing' of 'CN=mail.corp.example' is not in the store" in result.summary


def test_ca_with_the_same_name_that_did_not_sign_is_reported(pki: Pki) -> None:
    impostor = make_cert("Corp Root")  # same subject as the real root, other key
    result = build_chain(pki.intermediate.cert, {"fake-root": impostor.cert, "inter": pki.intermediate.cert})
    assert result.status is ChainStatus.BROKEN
    assert [issue.problem for issue in result.issues] == [LinkProblem.BAD_SIGNATURE]
    assert "'CN=Corp Root' ('fake-root') did not sign 'CN=Corp Intermediate'" in result.summary
    # with the real root beside the impostor, the walk picks the one whose signature verifies
    fixed = build_chain(pki.intermediate.cert, [impostor.cert, pki.root.cert, pki.intermediate.cert])
    assert fixed.status is ChainStatus.ROOT
    assert fixed.links[-1].fingerprint == fingerprint(pki.root.cert)


def test_expired_link_and_not_yet_valid_link() -> None:
    root = make_cert("Old Root", days=-1, start_days=-30)
    intermediate = make_cert("Under Old Root", root)
    result = build_chain(intermediate.cert, [root.cert, intermediate.cert])
    assert result.status is ChainStatus.BROKEN
    assert [(index, issue.problem) for index, link in enumerate(result.links) for issue in link.issues] == [
        (1, LinkProblem.EXPIRED)
    ]
    future = make_cert("Future Root", start_days=2)
    assert [issue.problem for issue in build_chain(future.cert, [future.cert]).issues] == [LinkProblem.NOT_YET_VALID]


def test_issuer_that_is_no_ca_or_may_not_sign_certificates() -> None:
    not_ca = make_cert("Plain Self-Signed", ca=False)
    below = make_cert("Signed By Plain", not_ca)
    result = build_chain(below.cert, [not_ca.cert, below.cert])
    assert [issue.problem for issue in result.issues] == [LinkProblem.NOT_A_CA]
    assert "is not a CA" in result.summary
    no_cert_sign = make_cert("CRL Only CA", cert_sign=False)
    child = make_cert("Child", no_cert_sign)
    result = build_chain(child.cert, [no_cert_sign.cert, child.cert])
    assert [issue.problem for issue in result.issues] == [LinkProblem.NOT_A_CA]
    assert "forbids signing certificates" in result.summary


def test_path_length_of_the_root_is_enforced() -> None:
    root = make_cert("Leaf Only Root", path_length=0)
    intermediate = make_cert("Not Allowed Intermediate", root)
    result = build_chain(intermediate.cert, [root.cert, intermediate.cert])
    assert [issue.problem for issue in result.issues] == [LinkProblem.PATH_LENGTH]
    leaf = make_cert("server", root, ca=False)
    assert build_chain(leaf.cert, [root.cert]).status is ChainStatus.ROOT


def test_self_signed_certificate_outside_the_store_is_untrusted(pki: Pki) -> None:
    result = build_chain(pki.root.cert, [pki.intermediate.cert])
    assert result.status is ChainStatus.UNTRUSTED and not result.ok


# --- the CLI ---------------------------------------------------------------------------------------------


def test_add_pem_bundle_and_der_then_list_and_show_the_chain(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bundle = tmp_path / "chain.pem"
    bundle.write_bytes(pki.issuing.pem + pki.intermediate.pem)
    root_der = tmp_path / "root.der"
    root_der.write_bytes(pki.root.cert.public_bytes(serialization.Encoding.DER))

    added = cli(home, "keystore", "add", str(bundle), "--alias", "corp")
    assert "added corp: CN=Corp Mail Issuing (CA" in added.stdout
    assert "added corp-2: CN=Corp Intermediate (CA" in added.stdout
    assert "anchor (intermediate, root not stored)" in added.stdout  # intermediates are accepted alone
    cli(home, "keystore", "add", str(root_der))

    listing = run_json(home, "list", "--check")
    assert isinstance(listing, list)
    assert [(row["alias"], row["ca"], row["chain"]["status"]) for row in listing] == [
        ("corp", "CA", "root"),
        ("corp-2", "CA", "root"),
        ("corp-root", "root CA", "root"),
    ]
    assert listing[0]["fingerprint"] == fingerprint(pki.issuing.cert)  # full in JSON
    assert listing[0]["issuer"] == "CN=Corp Intermediate" and listing[0]["warning"] is None

    shown = run_json(home, "show", "corp")
    assert isinstance(shown, dict)
    assert shown["key_type"] == "EC secp256r1" and shown["key_size"] == 256
    assert shown["sha1_fingerprint"] == ":".join(f"{b:02X}" for b in pki.issuing.cert.fingerprint(hashes.SHA1()))
    assert shown["basic_constraints"] == {"ca": True, "path_length": None}
    assert shown["key_usage"] == ["digitalSignature", "keyCertSign", "cRLSign"]
    assert shown["serial"] == format(pki.issuing.cert.serial_number, "X")
    assert [link["alias"] for link in shown["chain"]["links"]] == ["corp", "corp-2", "corp-root"]

    text = cli(home, "keystore", "show", fingerprint(pki.issuing.cert)[:23] + "…").stdout  # as the table shows it
    assert "builds to root 'CN=Corp Root' (corp-root)" in text
    assert fingerprint(pki.issuing.cert) in text and "keyCertSign" in text


def test_list_warns_about_expiring_and_expired_certificates(tmp_path: Path) -> None:
    home = tmp_path / "home"
    soon = make_cert("Expiring Soon CA", days=10)
    later = make_cert("Fine CA", days=400)
    keystore(home).add(soon.pem + later.pem)
    expired = make_cert("Expired CA", days=-2, start_days=-60)
    atomic_write(keystore(home).directory / "expired.pem", expired.pem)  # expired while stored

    listing = run_json(home, "list", "--check", check=False)
    assert isinstance(listing, list)
    rows = {row["alias"]: row for row in listing}
    assert rows["expiring-soon-ca"]["warning"].startswith("expires in 10 days (")
    assert rows["expiring-soon-ca"]["days_left"] == 10
    assert rows["expired"]["warning"].startswith("expired on")
    assert rows["fine-ca"]["warning"] is None
    assert rows["expired"]["chain"]["links"][0]["problems"][0]["problem"] == "expired"

    table = cli(home, "keystore", "list", check=False)
    assert table.returncode == 0
    assert "expires in" in table.stdout and "expired on" in table.stdout


def test_list_check_flags_a_ca_with_the_same_name_that_did_not_sign(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    impostor = make_cert("Corp Root")  # same name as the root that signed the intermediate, other key
    keystore(home).add(impostor.pem + pki.intermediate.pem)

    result = cli(home, "keystore", "list", "--check", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken:" in result.stdout
    listing = run_json(home, "list", "--check", check=False)
    assert isinstance(listing, list)
    assert [(row["alias"], row["chain"]["status"]) for row in listing] == [
        ("corp-intermediate", "broken"),
        ("corp-root", "root"),
    ]
    assert "'CN=Corp Root' ('corp-root') did not sign 'CN=Corp Intermediate'" in listing[0]["chain"]["summary"]
    assert listing[0]["chain"]["links"][0]["problems"][0]["problem"] == "bad-signature"


def test_export_pem_and_der_round_trip(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    keystore(home).add(pki.root.pem, alias="root")
    pem = cli(home, "keystore", "export", "root").stdout
    assert x509.load_pem_x509_certificate(pem.encode()) == pki.root.cert
    out = tmp_path / "root.der"
    cli(home, "keystore", "export", fingerprint(pki.root.cert), "--der", "--out", str(out))
    assert x509.load_der_x509_certificate(out.read_bytes()) == pki.root.cert
    openssl = shutil.which("openssl")
    if openssl is not None:
        printed = subprocess.run(
            [openssl, "x509", "-inform", "DER", "-in", str(out), "-noout", "-fingerprint", "-sha256"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert printed.strip().split("=", 1)[1] == fingerprint(pki.root.cert)


def test_remove_by_fingerprint_prefix_and_unknown_alias(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    keystore(home).add(pki.root.pem + pki.intermediate.pem)
    removed = cli(home, "keystore", "remove", fingerprint(pki.root.cert)[:11])
    assert "removed corp-root: CN=Corp Root" in removed.stdout
    assert [entry.alias for entry in keystore(home).list()] == ["corp-intermediate"]

    unknown = cli(home, "keystore", "show", "corp-root", check=False)
    assert unknown.returncode == 2
    assert "no certificate with alias or fingerprint 'corp-root'" in flat(unknown.stderr)
    assert "fix: its aliases are: corp-intermediate" in flat(unknown.stderr)


def test_bad_input_is_refused_with_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    result = cli(home, "keystore", "add", str(garbage), check=False)
    assert result.returncode == 1
    assert f"error: '{garbage}' holds no certificate in PEM or DER form" in flat(result.stderr)
    assert "fix: give a certificate file in PEM" in flat(result.stderr)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pki.leaf.pem)
    result = cli(home, "keystore", "add", str(leaf), check=False)
    assert result.returncode == 1
    assert "so it cannot be a trust anchor" in flat(result.stderr)
    assert "fix: add the certificate of the CA that issued it ('CN=Corp Mail Issuing') instead" in flat(result.stderr)
    result = cli(home, "keystore", "add", str(tmp_path / "missing.pem"), check=False)
    assert result.returncode == 2
    assert f"cannot read '{tmp_path / 'missing.pem'}': No such file or directory" in flat(result.stderr)
    assert not keystore(home).directory.exists() or keystore(home).list() == []


def test_connector_truststore_list_shows_the_same_information(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "connector" / "truststore").add(pki.root.pem + pki.issuing.pem, alias="corp")
    keystore(home).add(pki.root.pem + pki.issuing.pem, alias="corp")
    connector = json.loads(cli(home, "connector", "truststore", "list", "--json", "--check", check=False).stdout)
    cloud = run_json(home, "list", "--check", check=False)
    assert connector == cloud
    assert [(row["alias"], row["chain"]["summary"]) for row in connector] == [
        ("corp", "builds to root 'CN=Corp Root' (corp)"),
        ("corp-2", "anchor (intermediate, root not stored)"),
    ]
