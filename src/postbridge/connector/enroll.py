"""Enrollment and certificate renewal, the connector side (the hub side is ``cloud/tunnel_listener.py``).

Enrollment talks to the hub's tunnel port with ALPN ``postbridge-enroll/1`` in two steps:

1. without trust yet, ask for the hub's CA and compare its SHA-256 fingerprint with the one pinned in the token
   (no secret is sent on this connection);
2. over a connection verified against that CA and the hub's host name, send the token and a CSR, and store the
   certificate that comes back (bound by the hub to one subaccount and one location ID).

Renewal uses step 2 with the current client certificate instead of a token. All connections may go through an
HTTP CONNECT egress proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from typing import Any

from python_socks import ProxyError, ProxyTimeoutError
from python_socks.async_.asyncio import Proxy

from postbridge.addresses import HostPort
from postbridge.cloud.state import EnrollmentToken
from postbridge.connector.state import ALPN_ENROLL, ConnectorState
from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    NetworkError,
    PostbridgeTimeout,
    ProtocolError,
    TrustError,
)
from postbridge.trust import pki

log = logging.getLogger("postbridge.connector")


async def open_socket(cloud: HostPort, egress_proxy: str | None, timeout: float) -> socket.socket:
    """A connected TCP socket to the hub, directly or through an HTTP CONNECT proxy. Raises NetworkError."""
    try:
        async with asyncio.timeout(timeout):
            if egress_proxy:
                proxy = Proxy.from_url(egress_proxy)
                sock: socket.socket = await proxy.connect(dest_host=cloud.host, dest_port=cloud.port)
                return sock
            return await _connect_direct(cloud)
    except TimeoutError as exc:
        raise PostbridgeTimeout(f"no connection to the hub at {cloud} within {timeout:g} s") from exc
    except (ProxyError, ProxyTimeoutError) as exc:
        raise NetworkError(
            f"egress proxy {egress_proxy} did not connect us to {cloud}: {exc}",
            hint="check --egress-proxy and that the proxy allows CONNECT to the hub's port",
        ) from exc
    except OSError as exc:
        via = f" through egress proxy {egress_proxy}" if egress_proxy else ""
        raise NetworkError(f"cannot connect to the hub at {cloud}{via}: {exc.strerror or exc}") from exc


async def _connect_direct(cloud: HostPort) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(cloud.host, cloud.port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"'{cloud.host}' has no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last


async def _exchange(
    cloud: HostPort, context: ssl.SSLContext, request: dict[str, Any], egress_proxy: str | None, timeout: float
) -> dict[str, Any]:
    sock = await open_socket(cloud, egress_proxy, timeout)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname=cloud.host)
            writer.write(json.dumps(request).encode() + b"\n")
            line = await reader.readline()
            writer.close()
    except TimeoutError as exc:
        raise PostbridgeTimeout(
            f"the hub at {cloud} did not answer the enrollment request within {timeout:g} s"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        raise TrustError(
            f"the hub at {cloud} is not trusted: {exc.verify_message}",
            hint="use the host name the hub's certificate was made for ('postbridge cloud init --hostname')",
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise NetworkError(
            f"TLS with the hub at {cloud} failed: {detail}", hint="is HOST:PORT the hub's tunnel port?"
        ) from exc
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(
            f"the hub at {cloud} sent no valid enrollment answer", hint="is it a postbridge hub?"
        ) from exc
    if "error" in answer:
        raise AuthenticationError(f"the hub refused: {answer['error']}", hint=str(answer.get("hint", "")))
    return answer


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # trust comes from the fingerprint pinned in the token (checked below)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_ENROLL])
    return context


def _verified_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem)
    context.set_alpn_protocols([ALPN_ENROLL])
    return context


async def enroll(
    state: ConnectorState,
    cloud: HostPort,
    token_text: str,
    *,
    egress_proxy: str | None = None,
    timeout: float = 15.0,
    force: bool = False,
) -> pki.ConnectorIdentity:
    """Enroll this connector; returns its identity. Raises a PostbridgeError naming the cause on any failure."""
    token = EnrollmentToken.decode(token_text)
    if state.enrolled and not force:
        current = state.enrollment().identity
        raise ConfigurationError(
            f"this home folder is already enrolled as connector {current.connector_id} (subaccount "
            f"{current.subaccount}, location '{current.location}')",
            hint="use another --home for a second connector, or pass --force to replace this enrollment",
        )
    answer = await _exchange(cloud, _unverified_context(), {"op": "ca"}, egress_proxy, timeout)
    ca_pem = str(answer.get("ca", ""))
    ca = pki.load_certificates(ca_pem.encode(), source=f"CA sent by {cloud}")[0]
    if pki.fingerprint(ca) != token.ca_fingerprint:
        raise TrustError(
            f"the hub at {cloud} presented CA {pki.fingerprint(ca)}, but the token pins {token.ca_fingerprint}",
            hint="you are talking to another hub than the one that issued the token (or to an impostor): check --cloud",
        )
    key = pki.generate_key()
    csr = pki.build_csr(key, "postbridge connector")
    request = {"op": "enroll", "token": token_text.strip(), "csr": csr.decode()}
    answer = await _exchange(cloud, _verified_context(ca_pem), request, egress_proxy, timeout)
    cert_pem = str(answer["certificate"]).encode()
    identity = pki.ConnectorIdentity.from_certificate(pki.load_certificates(cert_pem, source="issued certificate")[0])
    state.save(identity, cloud, pki.key_pem(key), cert_pem, ca_pem.encode())
    state.audit.config_change(
        action="enroll",
        detail={
            "subaccount": identity.subaccount,
            "location": identity.location,
            "connector_id": identity.connector_id,
            "cloud": str(cloud),
        },
    )
    return identity


async def renew(
    state: ConnectorState,
    *,
    cloud: HostPort | None = None,
    egress_proxy: str | None = None,
    timeout: float = 15.0,
    actor: str = "connector",
) -> None:
    """Replace the connector's key and certificate with fresh ones, authenticated by the current certificate.

    ``cloud`` overrides the hub address stored at enrollment (as ``connector run --cloud`` does).
    """
    enrollment = state.enrollment()
    target = cloud or enrollment.cloud
    context = state.tunnel_context(ALPN_ENROLL)
    key = pki.generate_key()
    csr = pki.build_csr(key, "postbridge connector")
    answer = await _exchange(target, context, {"op": "renew", "csr": csr.decode()}, egress_proxy, timeout)
    cert_pem = str(answer["certificate"]).encode()
    state.save(enrollment.identity, enrollment.cloud, pki.key_pem(key), cert_pem, state.hub_ca_path.read_bytes())
    log.info("certificate renewed; valid until %s", state.certificate().not_valid_after_utc.isoformat())
    state.audit.config_change(
        action="renew-certificate", detail={"connector_id": enrollment.identity.connector_id}, actor=actor
    )
