"""The certificate chain a TLS server presented, explained certificate by certificate (for the connection test).

Owns: reading the chain a handshake saw (:func:`peer_chain`: what the server sent, or what OpenSSL built and
verified), and :func:`explain_chain`: for every certificate its role, where it came from (sent by the server, the
keystore, the system store), whether it is trusted and why not — unknown CA, incomplete chain, expired, not yet
valid, a bad link, or a server certificate that does not name the host — plus the one problem that matters most and
its fix. Also which certificates ``--add-to-keystore`` would add (:meth:`ChainReport.anchor_candidates`).

Must not: open connections, read a keystore folder, or print. The walk itself and its verdict come from
:func:`postbridge.trust.chains.build_chain`; OpenSSL's verdict (the real handshake) always wins over ours.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from postbridge.trust.chains import ChainLink, ChainStatus, LinkProblem, build_chain
from postbridge.trust.pki import CertificateInfo, describe, fingerprint

ADD_COMMAND = "postbridge test … --add-to-keystore"


@dataclass(frozen=True)
class PresentedCertificate:
    """One certificate of the report: who sent or stored it, and whether (and why) it is trusted."""

    role: str  # "server", "intermediate", "root", "self-signed" or "unused"
    info: CertificateInfo
    source: str  # "sent by the server", "keystore 'alias'", "sent by the server, keystore 'alias'", "system store"
    sent: bool
    trusted: bool
    why: str
    pem: str

    def to_json(self) -> dict[str, object]:
        return {
            "role": self.role,
            "subject": self.info.subject,
            "issuer": self.info.issuer,
            "not_before": self.info.not_before.isoformat(),
            "not_after": self.info.not_after.isoformat(),
            "sans": list(self.info.sans),
            "sha256": self.info.fingerprint,
            "source": self.source,
            "trusted": self.trusted,
            "why": self.why,
        }


@dataclass(frozen=True)
class ChainReport:
    """The presented chain from the server certificate upwards, and the verdict on it.

    ``problem`` is "" when the chain is trusted and names the server, else one of "unknown-ca", "issuer-missing",
    "expired", "not-yet-valid", "bad-chain", "name-mismatch"; ``cause`` and ``fix`` say it in words.
    """

    certificates: tuple[PresentedCertificate, ...]
    problem: str
    cause: str
    fix: str

    @property
    def trusted(self) -> bool:
        return not self.problem

    @property
    def summary(self) -> str:
        sent = sum(1 for cert in self.certificates if cert.sent)
        text = f"{sent} certificate(s) sent"
        if self.trusted:
            top = next((c for c in reversed(self.certificates) if c.role != "unused"), None)
            return text + (f"; trusted through {top.source} ('{top.info.subject}')" if top else "")
        return f"{text}; not trusted: {self.cause}"

    def sent_pem(self) -> bytes:
        """The certificates the server sent, in its order (server certificate first), as PEM."""
        return "".join(cert.pem for cert in self.certificates if cert.sent).encode("ascii")

    def anchor_candidates(self) -> list[PresentedCertificate]:
        """What ``--add-to-keystore`` would add: the sent root (or self-signed server certificate), else the
        topmost CA certificate the server sent; empty when the server sent nothing that can anchor the chain."""
        chain = [cert for cert in self.certificates if cert.sent and cert.role != "unused"]
        roots = [cert for cert in chain if cert.role in ("root", "self-signed")]
        if roots:
            return roots[-1:]
        cas = [cert for cert in chain if cert.role == "intermediate"]
        return cas[-1:]

    def to_json(self) -> dict[str, object]:
        return {
            "trusted": self.trusted,
            "problem": self.problem,
            "cause": self.cause,
            "fix": self.fix,
            "certificates": [cert.to_json() for cert in self.certificates],
        }


def peer_chain(sock: ssl.SSLSocket, *, verified: bool = False) -> list[x509.Certificate]:
    """The server's certificates after a handshake: as sent (``verified=False``) or as OpenSSL built and verified
    them, up to the trust anchor (``verified=True``). Empty when the socket has no peer chain.

    Python 3.13 has ``SSLSocket.get_unverified_chain()``; 3.10-3.12 have the same methods on the private
    ``_sslobj`` (see docs/decisions.md); both are used read-only after the handshake.
    """
    name = "get_verified_chain" if verified else "get_unverified_chain"
    public = getattr(sock, name, None)
    if public is not None:
        blobs: Iterable[bytes] = public() or []
    else:
        private = getattr(getattr(sock, "_sslobj", None), name, None)
        if private is None:
            return []
        blobs = [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in private() or []]  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(blob) for blob in blobs]


def explain_chain(
    sent: list[x509.Certificate],
    trusted: Mapping[str, x509.Certificate],
    server_name: str,
    *,
    system: Iterable[x509.Certificate] = (),
    now: datetime | None = None,
) -> ChainReport:
    """Explain the chain ``sent`` by a server (server certificate first) against the ``trusted`` certificates
    (keystore: alias -> certificate) and the ``system`` store, for the host name ``server_name``.

    Never raises for a bad chain; raises ValueError when ``sent`` is empty.
    """
    if not sent:
        raise ValueError("the server sent no certificate")
    moment = now or datetime.now(UTC)
    system_list = list(system)
    store: dict[str, x509.Certificate] = dict(trusted)
    system_aliases = {fingerprint(cert) for cert in system_list} - {fingerprint(cert) for cert in trusted.values()}
    for cert in system_list:
        store.setdefault(f"system: {fingerprint(cert)}", cert)
    result = build_chain(sent[0], store, untrusted=sent[1:], now=moment)
    sent_prints = [fingerprint(cert) for cert in sent]
    name_ok = names_host(sent[0], server_name)
    problem, cause, fix = _verdict(result.links, result.status, name_ok, server_name, sent)
    chain_ok = result.ok
    presented: list[PresentedCertificate] = []
    for index, link in enumerate(result.links):
        is_sent = link.fingerprint in sent_prints
        if link.fingerprint in system_aliases:
            source = "the system store"
        elif link.alias is not None:
            source = ("sent by the server, " if is_sent else "") + f"keystore '{link.alias}'"
        else:
            source = "sent by the server"
        role = "server" if index == 0 and not link.self_signed else link.role
        ok = chain_ok and not link.issues and (index > 0 or name_ok)
        why = _why(index, link, chain_ok, name_ok, server_name, result.status, source)
        presented.append(PresentedCertificate(role, describe(link.certificate), source, is_sent, ok, why, _pem(link)))
    used = {link.fingerprint for link in result.links}
    for cert in sent:
        if fingerprint(cert) not in used:
            presented.append(
                PresentedCertificate(
                    "unused", describe(cert), "sent by the server", True, False,
                    "sent by the server but not part of the chain (a stale or foreign certificate)",
                    cert.public_bytes(Encoding.PEM).decode("ascii"),
                )
            )  # fmt: skip
    return ChainReport(tuple(presented), problem, cause, fix)


def names_host(cert: x509.Certificate, server_name: str) -> bool:
    """True when the certificate's subject alternative names cover ``server_name`` (DNS with a left-most ``*``
    wildcard, or an IP address); the common name is ignored, as OpenSSL's host name check does."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    try:
        address = ipaddress.ip_address(server_name)
    except ValueError:
        address = None
    if address is not None:
        return address in sans.get_values_for_type(x509.IPAddress)
    wanted = server_name.rstrip(".").lower()
    for pattern in sans.get_values_for_type(x509.DNSName):
        pattern = pattern.rstrip(".").lower()
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _pem(link: ChainLink) -> str:
    return link.certificate.public_bytes(Encoding.PEM).decode("ascii")


def _verdict(
    links: tuple[ChainLink, ...], status: ChainStatus, name_ok: bool, server_name: str, sent: list[x509.Certificate]
) -> tuple[str, str, str]:
    """(problem, cause, fix) of the chain: the first broken link decides, then trust, then the host name."""
    leaf = links[0]
    for link in links:
        for issue in link.issues:
            if issue.problem is LinkProblem.ISSUER_MISSING:
                issuer = link.issuer
                return (
                    "issuer-missing",
                    f"the issuer '{issuer}' of '{link.subject}' was not sent by the server and is not in the keystore "
                    "(an incomplete chain, or an unknown CA: Java's 'PKIX path building failed')",
                    f"if '{issuer}' is an intermediate CA, the mail server must send it with its certificate (or add "
                    f"it to the keystore); if it is the root CA, get it from the server's administrator and add it "
                    f"with 'postbridge keystore add FILE'",
                )
            if issue.problem is LinkProblem.EXPIRED:
                return (
                    "expired",
                    issue.message,
                    "the mail server's administrator must renew the certificate (or fix the server's clock)",
                )
            if issue.problem is LinkProblem.NOT_YET_VALID:
                return "not-yet-valid", issue.message, "check the clocks of this machine and of the mail server"
            return "bad-chain", issue.message, "the chain is malformed: ask the mail server's administrator to fix it"
    if status is ChainStatus.UNTRUSTED:
        top = links[-1]
        what = "its own self-signed certificate" if len(links) == 1 else f"the root '{top.subject}'"
        return (
            "unknown-ca",
            f"the chain ends at {what}, which is not in the keystore (an unknown CA: Java's 'PKIX path "
            "building failed')",
            f"compare the SHA-256 fingerprint {top.fingerprint[:23]}… with the server's administrator, then add it: "
            f"'{ADD_COMMAND}' or 'postbridge keystore add FILE'",
        )
    if not name_ok:
        sans = describe(sent[0]).sans
        carried = [name.split(":", 1)[1] for name in sans if name.startswith(("DNS:", "IP:"))]
        if not carried:
            return (
                "name-mismatch",
                f"the server certificate '{leaf.subject}' carries no host name, so it cannot be for '{server_name}'",
                "the server's administrator must reissue it with the server's host name as subject alternative name",
            )
        return (
            "name-mismatch",
            f"the server certificate '{leaf.subject}' is for {', '.join(carried)}, not for '{server_name}'",
            "use the certificate's host name as the virtual host (the mapping's virtual host may be any name), or "
            f"set tls_server_name to a name it carries (e.g. '{carried[0]}')",
        )
    return "", "", ""


def _why(
    index: int,
    link: ChainLink,
    chain_ok: bool,
    name_ok: bool,
    server_name: str,
    status: ChainStatus,
    source: str,
) -> str:
    if link.issues:
        return "; ".join(
            f"its issuer '{link.issuer}' was not sent and is not in the keystore"
            if issue.problem is LinkProblem.ISSUER_MISSING
            else issue.message
            for issue in link.issues
        )
    if index == 0 and not name_ok:
        return f"does not name '{server_name}'"
    anchor = status in (ChainStatus.ROOT, ChainStatus.ANCHOR) and (link.alias is not None)
    if anchor and (link.self_signed or status is ChainStatus.ANCHOR):
        return "trust anchor"
    if status is ChainStatus.UNTRUSTED and link.self_signed:
        return "a root that is not in the keystore"
    if not chain_ok:
        return "its chain does not lead to a trusted certificate"
    named = f", names '{server_name}'" if index == 0 else ""
    return f"signed by '{link.issuer}'{named}"
