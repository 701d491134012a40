"""Chain building: does a certificate lead, link by verified link, to a root or an anchor in a trust store?

:func:`build_chain` walks issuer -> subject from one certificate (a stored CA, or a server's leaf) through the
certificates of a store, verifying every signature (``verify_directly_issued_by``), and reports each link and
what is wrong with it: the issuer is not stored, the stored certificate with the issuer's name did not sign it,
a link is expired or not yet valid, the issuer is not a CA (or may not sign certificates, or its path length is
exceeded). A chain that stops at a stored certificate whose own issuer is not stored is fine: the trust stores
load their certificates with ``VERIFY_X509_PARTIAL_CHAIN``, so every stored CA is a trust anchor by itself.

This module owns the walk and its verdict. It must not read files, open connections, build ``ssl`` contexts or
print; callers (``postbridge keystore``, the connection test) decide where certificates come from and how the
result is shown.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from postbridge.trust.pki import fingerprint

MAX_DEPTH = 10
"""Longest chain walked (links); a longer one is reported as broken (real chains have 2 to 4 links)."""


class ChainStatus(enum.StrEnum):
    """The verdict on a whole chain."""

    ROOT = "root"  # builds to a self-signed root that is in the store
    ANCHOR = "anchor"  # builds to a stored CA whose own issuer is not stored (a partial-chain anchor)
    UNTRUSTED = "untrusted"  # every link verifies, but no certificate of the chain is in the store
    BROKEN = "broken"  # some link has a problem


class LinkProblem(enum.StrEnum):
    """What can be wrong with one link."""

    ISSUER_MISSING = "issuer-missing"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    NOT_A_CA = "not-a-ca"
    PATH_LENGTH = "path-length"
    LOOP = "loop"
    TOO_LONG = "too-long"


@dataclass(frozen=True)
class LinkIssue:
    """One problem of a link, with a sentence that names the certificates involved."""

    problem: LinkProblem
    message: str


@dataclass(frozen=True)
class ChainLink:
    """One certificate of the chain; ``alias`` is its name in the store (None when it is not stored)."""

    certificate: x509.Certificate
    subject: str
    issuer: str
    fingerprint: str
    alias: str | None
    is_ca: bool
    self_signed: bool
    issues: tuple[LinkIssue, ...] = ()

    @property
    def stored(self) -> bool:
        return self.alias is not None

    @property
    def role(self) -> str:
        """'root' (self-signed CA), 'self-signed', 'intermediate' (CA) or 'leaf'."""
        if self.self_signed:
            return "root" if self.is_ca else "self-signed"
        return "intermediate" if self.is_ca else "leaf"


@dataclass(frozen=True)
class ChainResult:
    """The links from the starting certificate (first) upwards, and the verdict."""

    links: tuple[ChainLink, ...]
    status: ChainStatus

    @property
    def ok(self) -> bool:
        """True when TLS verification against the store can succeed through this chain."""
        return self.status in (ChainStatus.ROOT, ChainStatus.ANCHOR)

    @property
    def issues(self) -> tuple[LinkIssue, ...]:
        return tuple(issue for link in self.links for issue in link.issues)

    @property
    def summary(self) -> str:
        """One line for a listing: 'root CN=...', 'anchor (intermediate, root not stored)', 'broken: ...'."""
        top = self.links[-1]
        if self.status is ChainStatus.ROOT:
            return f"builds to root '{top.subject}'" + (f" ({top.alias})" if top.alias else "")
        if self.status is ChainStatus.ANCHOR:
            return f"anchor ({top.role}, root not stored)"
        if self.status is ChainStatus.UNTRUSTED:
            return f"ends at root '{top.subject}', which is not in the store"
        return "broken: " + "; ".join(issue.message for issue in self.issues)


@dataclass(frozen=True)
class _Candidate:
    certificate: x509.Certificate
    alias: str | None


def build_chain(
    start: x509.Certificate,
    store_certificates: Mapping[str, x509.Certificate] | Iterable[x509.Certificate],
    *,
    untrusted: Iterable[x509.Certificate] = (),
    now: datetime | None = None,
) -> ChainResult:
    """Walk from ``start`` to a self-signed root or a stored anchor through ``store_certificates``.

    ``store_certificates`` is either ``{alias: certificate}`` (links then name their alias) or plain
    certificates. ``start`` may itself be one of them. ``untrusted`` certificates (the intermediates a server sent)
    may be links of the chain but are never anchors (their links have no alias). Never raises for a bad chain:
    every problem is reported in the result (a certificate whose signature algorithm cannot be checked counts as a
    bad signature).
    """
    moment = now or datetime.now(UTC)
    store = _candidates(store_certificates)
    by_fingerprint = {fingerprint(item.certificate): item.alias for item in store}
    store += [_Candidate(certificate, None) for certificate in untrusted]
    links: list[ChainLink] = []
    current = start
    ca_links_below = 0  # CA certificates below the issuer being checked (for pathLenConstraint)
    status: ChainStatus | None = None
    while status is None:
        current_fingerprint = fingerprint(current)
        issues = list(_time_issues(current, moment))
        self_signed = _self_signed(current)
        next_certificate: x509.Certificate | None = None
        if self_signed:
            status = ChainStatus.ROOT
        elif len(links) + 1 >= MAX_DEPTH:
            issues.append(LinkIssue(LinkProblem.TOO_LONG, f"the chain is longer than {MAX_DEPTH} certificates"))
        else:
            seen = {link.fingerprint for link in links} | {current_fingerprint}
            issuer, issue = _find_issuer(current, store, seen, ca_links_below + int(_is_ca(current)), moment)
            if issue is not None:
                issues.append(issue)
            if issuer is not None:
                next_certificate = issuer
            elif (
                issue is not None
                and issue.problem is LinkProblem.ISSUER_MISSING
                and current_fingerprint in by_fingerprint
                and _is_ca(current)
            ):
                status = ChainStatus.ANCHOR
                issues.remove(issue)  # a stored CA is a trust anchor by itself
        links.append(
            ChainLink(
                certificate=current,
                subject=current.subject.rfc4514_string(),
                issuer=current.issuer.rfc4514_string(),
                fingerprint=current_fingerprint,
                alias=by_fingerprint.get(current_fingerprint),
                is_ca=_is_ca(current),
                self_signed=self_signed,
                issues=tuple(issues),
            )
        )
        if next_certificate is None:
            status = status or ChainStatus.BROKEN
            break
        ca_links_below += int(_is_ca(current))
        current = next_certificate
    if any(link.issues for link in links):
        status = ChainStatus.BROKEN
    elif status is ChainStatus.ROOT and not any(link.stored for link in links):
        status = ChainStatus.UNTRUSTED
    return ChainResult(tuple(links), status)


def _candidates(source: Mapping[str, x509.Certificate] | Iterable[x509.Certificate]) -> list[_Candidate]:
    if isinstance(source, Mapping):
        return [_Candidate(certificate, alias) for alias, certificate in source.items()]
    return [_Candidate(certificate, fingerprint(certificate)) for certificate in source]


def _find_issuer(
    child: x509.Certificate, store: list[_Candidate], seen: set[str], ca_links_below: int, moment: datetime
) -> tuple[x509.Certificate | None, LinkIssue | None]:
    """The stored certificate that signed ``child``, or the issue that prevents one (valid issuers first)."""
    child_subject = child.subject.rfc4514_string()
    issuer_name = child.issuer.rfc4514_string()
    named = [item for item in store if item.certificate.subject == child.issuer]
    signers = [item for item in named if _signed_by(child, item.certificate)]
    if not named:
        return None, LinkIssue(
            LinkProblem.ISSUER_MISSING, f"the issuer '{issuer_name}' of '{child_subject}' is not in the store"
        )
    if not signers:
        aliases = ", ".join(f"'{item.alias}'" for item in named)
        return None, LinkIssue(
            LinkProblem.BAD_SIGNATURE,
            f"the stored certificate named '{issuer_name}' ({aliases}) did not sign '{child_subject}': "
            "the store holds another CA with the same name",
        )
    # prefer a CA, then one that is still valid, then the one that lives longest (a renewed root with the same key)
    signers.sort(
        key=lambda item: (
            not _is_ca(item.certificate),
            item.certificate.not_valid_after_utc <= moment,
            -item.certificate.not_valid_after_utc.timestamp(),
        )
    )
    chosen = signers[0]
    label = f"'{issuer_name}'" + (f" ({chosen.alias})" if chosen.alias else "")
    if fingerprint(chosen.certificate) in seen:
        return None, LinkIssue(LinkProblem.LOOP, f"the chain loops back to {label}")
    if not _is_ca(chosen.certificate):
        return None, LinkIssue(LinkProblem.NOT_A_CA, f"{label} signed '{child_subject}' but is not a CA")
    if not _may_sign_certificates(chosen.certificate):
        return None, LinkIssue(
            LinkProblem.NOT_A_CA, f"{label} signed '{child_subject}' but its key usage forbids signing certificates"
        )
    limit = _path_length(chosen.certificate)
    if limit is not None and ca_links_below > limit:
        return chosen.certificate, LinkIssue(
            LinkProblem.PATH_LENGTH,
            f"{label} may have at most {limit} CA(s) below it, but '{child_subject}' makes {ca_links_below}",
        )
    return chosen.certificate, None


def _time_issues(cert: x509.Certificate, moment: datetime) -> Iterable[LinkIssue]:
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc <= moment:
        yield LinkIssue(LinkProblem.EXPIRED, f"'{subject}' expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > moment:
        yield LinkIssue(
            LinkProblem.NOT_YET_VALID, f"'{subject}' is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
        )


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _signed_by(cert, cert)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _basic_constraints(cert)
    return constraints is not None and constraints.ca


def _path_length(cert: x509.Certificate) -> int | None:
    constraints = _basic_constraints(cert)
    return constraints.path_length if constraints is not None else None


def _may_sign_certificates(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return usage.key_cert_sign
