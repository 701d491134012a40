"""The named checks of the connection test: second looks that turn a failed step into a cause and a fix.

* :func:`plain_to_tls_port`: the greeting never came — does the port answer a TLS handshake (implicit TLS)?
* :func:`tls_to_plain_port`: the TLS handshake failed — does the port greet in plain text instead?
* :func:`starttls_over_tcp_tls`: STARTTLS is not offered — is the mapping ``tcp-tls`` (the connector does TLS)?
* :func:`cleartext_warning`: protection ``off`` — do the password and the mail cross a network in clear text?
* :func:`explain`: the server's certificate chain against the keystore (and the system store).

Each check follows the table "where TLS is done" of docs/architecture.md: STARTTLS ports go over a ``tcp`` mapping
with protection ``starttls-mandatory``; implicit-TLS ports (993/995/465) over a ``tcp-tls`` mapping with ``off``.
Checks open at most one short second connection, never send credentials, and never raise: what they cannot learn
becomes an evidence line. They must not print; the probe adds their findings to the failed step.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from pathlib import Path
from typing import TypedDict

from cryptography import x509

from postbridge.errors import PostbridgeError, TrustError
from postbridge.mail import transport
from postbridge.mail.hub_diagnosis import mapping_of
from postbridge.mail.settings import ChannelSettings, Protection, Proxy
from postbridge.trust.pki import fingerprint, load_certificates
from postbridge.trust.server_chain import ChainReport, explain_chain
from postbridge.trust.truststore import TrustStore

log = logging.getLogger("postbridge.probe")

CHECK_TIMEOUT = 5.0
"""Seconds a second look may take at most (less when the channel's timeout is shorter)."""

IMPLICIT_TLS_PORTS = {993: "IMAPS", 995: "POP3S", 465: "SMTPS"}
GREETINGS = (b"* OK", b"* PREAUTH", b"* BYE", b"+OK", b"-ERR", b"220", b"421", b"554")


class Finding(TypedDict, total=False):
    evidence: tuple[str, ...]
    fix: str
    cause: str


def inspection_context() -> ssl.SSLContext:
    """A client context that verifies nothing: only to fetch a chain that the verified handshake refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def explain(
    settings: ChannelSettings, sent: list[x509.Certificate], *, verified: list[x509.Certificate] | None = None
) -> ChainReport:
    """The chain ``sent`` by the server against the channel's keystore; ``verified`` is OpenSSL's chain after a
    verified handshake (its anchor then counts as trusted even when it came from the system store).
    Raises TrustError when the server sent no certificate or the keystore is broken."""
    if not sent:
        raise TrustError(f"{settings.address} sent no certificate")
    trusted: dict[str, x509.Certificate] = {}
    if settings.keystore is not None and settings.keystore.is_dir():
        trusted = {entry.alias: cert for entry, cert in TrustStore(settings.keystore).certificates()}
    stored = {fingerprint(cert) for cert in trusted.values()}
    if verified:
        system = [cert for cert in verified[-1:] if fingerprint(cert) not in stored]
    else:
        system = _system_certificates() if settings.use_system_trust else []
    return explain_chain(sent, trusted, settings.server_name, system=system)


def _system_certificates() -> list[x509.Certificate]:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            with contextlib.suppress(OSError, PostbridgeError):
                return load_certificates(Path(candidate).read_bytes(), source=candidate)
    return []


def _mapping_words(settings: ChannelSettings) -> tuple[str, str | None]:
    """('the mapping V -> I (protocol)', protocol) as the hub reports it, or ('', None)."""
    if settings.proxy is not Proxy.ON_PREMISE:
        return "", None
    mapping = mapping_of(settings)
    if not mapping:
        return "", None
    protocol = str(mapping.get("protocol", ""))
    return (
        f"the hub reports the mapping {mapping.get('virtual')} -> {mapping.get('internal')} as '{protocol}'",
        protocol,
    )


def _add_command(settings: ChannelSettings, protocol: str) -> str:
    return f"postbridge connector mapping add {settings.address} --to INTERNAL_HOST:PORT --protocol {protocol}"


def plain_to_tls_port(settings: ChannelSettings) -> Finding:
    """The plain greeting did not come: a TLS handshake on a second connection tells an implicit-TLS port."""
    version = _tls_answer(settings)
    if version is None:
        return {"evidence": ("a second connection with a TLS handshake got no TLS answer either",)}
    evidence = [f"a second connection answered a TLS handshake ({version}): this port expects TLS at once"]
    words, protocol = _mapping_words(settings)
    if settings.proxy is Proxy.ON_PREMISE:
        if words:
            evidence.append(words)
        fix = (
            "let the connector do the TLS: map the implicit-TLS port as 'tcp-tls' "
            f"('{_add_command(settings, 'tcp-tls')}') and use protection 'off'; or keep the "
            f"'{protocol or 'tcp'}' mapping and use protection 'tls' (TLS end to end, checked against the keystore)"
        )
    else:
        fix = "use protection 'tls' for this port, or the server's STARTTLS port with 'starttls-mandatory'"
    return {
        "evidence": tuple(evidence),
        "cause": f"{settings.address} expects implicit TLS, but the channel speaks plain text "
        f"(protection '{settings.protection}')",
        "fix": fix,
    }


def tls_to_plain_port(settings: ChannelSettings) -> Finding:
    """The TLS handshake failed: a plain read on a second connection tells a port that greets in clear text."""
    greeting = _plain_greeting(settings)
    if greeting is None:
        return {"evidence": ("a second connection without TLS got no plain greeting either",)}
    evidence = [f"a second connection without TLS got the plain greeting '{greeting}'"]
    words, protocol = _mapping_words(settings)
    if words:
        evidence.append(words)
    if protocol == "tcp-tls":
        fix = (
            "the connector already speaks TLS to the server (mapping 'tcp-tls'), so the channel must not: "
            "use protection 'off'"
        )
    else:
        fix = (
            "this port speaks plain text first: use protection 'starttls-mandatory', or the server's "
            "implicit-TLS port (993 IMAPS, 995 POP3S, 465 SMTPS) with protection 'tls'"
        )
    return {
        "evidence": tuple(evidence),
        "cause": f"{settings.address} greets in plain text, but the channel began with a TLS handshake "
        "(protection 'tls')",
        "fix": fix,
    }


def starttls_over_tcp_tls(settings: ChannelSettings) -> Finding:
    """STARTTLS was required but not offered: through a ``tcp-tls`` mapping that is expected."""
    words, protocol = _mapping_words(settings)
    if protocol != "tcp-tls":
        return {"evidence": (words,)} if words else {}
    return {
        "evidence": (words, "the connector's TLS to the server is already in place, so the server offers no STARTTLS"),
        "fix": "use protection 'off' with this 'tcp-tls' mapping: the tunnel and the connector encrypt the whole way",
    }


def cleartext_warning(settings: ChannelSettings) -> str:
    """'' when protection ``off`` is safe here (a ``tcp-tls`` mapping), else what crosses a network in clear."""
    if settings.protection is not Protection.OFF:
        return ""
    if settings.proxy is not Proxy.ON_PREMISE:
        return (
            "protection 'off': the password and the mail cross the network in clear text; use 'starttls-mandatory' "
            "or 'tls'"
        )
    _, protocol = _mapping_words(settings)
    if protocol == "tcp-tls":
        return ""
    if protocol:
        return (
            f"protection 'off' over a '{protocol}' mapping: the password and the mail cross the internal network "
            "between the connector and the server in clear text; use 'starttls-mandatory', or map the server's "
            "implicit-TLS port as 'tcp-tls'"
        )
    return (
        "protection 'off': the hub could not say whether the mapping is 'tcp-tls'; unless it is, the password and "
        "the mail cross the internal network in clear text"
    )


def _second_connection(settings: ChannelSettings) -> socket.socket | None:
    quick = settings.timeout if settings.timeout < CHECK_TIMEOUT else CHECK_TIMEOUT
    try:
        sock = transport.connect(settings)
    except PostbridgeError as exc:
        log.debug("named check: no second connection to %s: %s", settings.address, exc.message)
        return None
    sock.settimeout(quick)
    return sock


def _tls_answer(settings: ChannelSettings) -> str | None:
    """The TLS version when the port completes a (non-verifying) TLS handshake, else None."""
    sock = _second_connection(settings)
    if sock is None:
        return None
    try:
        with inspection_context().wrap_socket(sock, server_hostname=settings.server_name) as tls:
            return tls.version() or "TLS"
    except (OSError, ssl.SSLError):
        return None
    finally:
        sock.close()


def _plain_greeting(settings: ChannelSettings) -> str | None:
    """The first line when the port greets like a mail server in plain text, else None."""
    sock = _second_connection(settings)
    if sock is None:
        return None
    data = b""
    try:
        while b"\n" not in data and len(data) < 1024:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        sock.close()
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line.startswith(GREETINGS):
        return None
    return line.decode("utf-8", "replace")[:120]
