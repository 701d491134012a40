"""The backend dialer: opens the connector's connection to the internal host of a mapping (TCP or TCP TLS).

Owns the three phases of opening a backend connection and the translation of every failure into one
:class:`BackendError` with a tunnel reason (``host-unreachable``, ``timeout``, ``backend-tls``):

1. resolve the internal host (``loop.getaddrinfo``; a DNS failure is ``host-unreachable``),
2. connect to each resolved address in turn (so a refusal names the IP that refused),
3. for ``tcp-tls`` mappings, the TLS handshake verified against the backend trust store, with the certificate
   checked against :attr:`Mapping.server_name`.

The whole attempt runs within one ``timeout``. Must not: check access (the caller already found the mapping),
read or write application bytes, retry on its own, or put anything secret into messages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any

from postbridge.addresses import HostPort
from postbridge.connector.mappings import Mapping, Protocol
from postbridge.errors import ConfigurationError, NetworkError, StreamRefused, TrustError

HOST_UNREACHABLE = "host-unreachable"
TIMEOUT = "timeout"
BACKEND_TLS = "backend-tls"

# SOCKS5 reply a cloud application sees for each reason (see the reply table in the design).
_SOCKS_REPLY = {HOST_UNREACHABLE: 0x04, TIMEOUT: 0x04, BACKEND_TLS: 0x01}

# OpenSSL verify codes (X509_V_ERR_*) and what they mean for the operator of the connector.
_VERIFY_EXPLANATION = {
    2: "the backend trust store does not hold the CA that issued it",
    10: "the server's certificate has expired; renew it on the mail server",
    9: "the server's certificate is not valid yet; check the clocks of both machines",
    18: "the server's certificate is self-signed; add it to the backend trust store if you trust it",
    19: "the chain ends in a self-signed CA that the backend trust store does not hold",
    20: "the backend trust store does not hold the CA that issued it",
    21: "the server sent no intermediate certificate and the trust store does not hold the issuer",
    62: "host name mismatch: the certificate does not carry the name '{name}'",
    64: "IP address mismatch: the certificate does not carry the address '{name}'",
}


class BackendError(NetworkError):
    """The connector could not open the backend connection of a mapping.

    ``reason`` is the tunnel's ``postbridge-error`` value: ``host-unreachable`` (DNS failure, refused,
    unreachable), ``timeout`` or ``backend-tls``; :attr:`socks_reply` is what the cloud application is told.
    """

    def __init__(self, message: str, *, reason: str, hint: str = "") -> None:
        if reason not in _SOCKS_REPLY:
            raise ValueError(f"unknown backend error reason {reason!r}")
        super().__init__(message, hint=hint)
        self.reason = reason

    @property
    def socks_reply(self) -> int:
        """SOCKS5 reply: 0x04 (host unreachable) for DNS, refused, timeout; 0x01 (general failure) for TLS."""
        return _SOCKS_REPLY[self.reason]

    def to_stream_refused(self) -> StreamRefused:
        """The same failure as the hub sees it: a refused tunneled connection."""
        return StreamRefused(self.message, reason=self.reason, socks_reply=self.socks_reply, hint=self.hint)


async def open_backend(
    mapping: Mapping,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    tls_context: Callable[[], ssl.SSLContext],
    timeout: float = 10.0,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Open the connection to ``mapping.internal`` (TLS for ``tcp-tls``); return transport and protocol.

    ``tls_context`` is called only for ``tcp-tls`` mappings (e.g. ``TrustStore(dir).ssl_context``).
    Raises BackendError (reason ``host-unreachable``, ``timeout`` or ``backend-tls``) on every failure.
    """
    target = mapping.internal
    context: ssl.SSLContext | None = None
    if mapping.protocol is Protocol.TCP_TLS:
        try:
            context = tls_context()
        except (TrustError, ConfigurationError) as exc:
            raise BackendError(
                f"cannot open TLS to {target}: the backend trust store cannot be used: {exc.message}",
                reason=BACKEND_TLS,
                hint=exc.hint or "import the CA of the internal mail server into the backend trust store",
            ) from exc
    loop = asyncio.get_running_loop()
    phase = f"while resolving '{target.host}'"
    try:
        async with asyncio.timeout(timeout):
            addresses = await _resolve(loop, target)
            phase = f"while connecting to {target}"
            sock = await _connect(loop, target, addresses)
            phase = f"during the TLS handshake with {target}" if context else phase
            try:
                return await _start(loop, sock, protocol_factory, mapping, context, timeout)
            except BaseException:
                sock.close()
                raise
    except TimeoutError as exc:
        raise BackendError(
            f"no answer from {target} within {timeout:g} s ({phase})",
            reason=TIMEOUT,
            hint=_timeout_hint(phase),
        ) from exc


async def _resolve(loop: asyncio.AbstractEventLoop, target: HostPort) -> list[Any]:
    if target.is_ip:  # no resolver thread for an address literal (it costs a thread hop per connection)
        address = ipaddress.ip_address(target.host)
        if address.version == 6:
            return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (target.host, target.port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (target.host, target.port))]
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BackendError(
            f"cannot resolve '{target.host}': {exc.strerror}",
            reason=HOST_UNREACHABLE,
            hint="check the internal host of the mapping and the DNS settings of the connector machine",
        ) from exc
    except UnicodeError as exc:
        raise BackendError(f"cannot resolve '{target.host}': not a valid name", reason=HOST_UNREACHABLE) from exc
    if not infos:
        raise BackendError(f"cannot resolve '{target.host}': no addresses", reason=HOST_UNREACHABLE)
    return list(infos)


async def _connect(loop: asyncio.AbstractEventLoop, target: HostPort, infos: list[Any]) -> socket.socket:
    """Connect to each address in turn; raise one BackendError describing every failed attempt."""
    failures: list[tuple[str, OSError]] = []
    for family, kind, proto, _canonical, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            failures.append((str(HostPort(sockaddr[0], sockaddr[1])), exc))
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if any(isinstance(exc, TimeoutError) for _address, exc in failures):
        raise TimeoutError  # the OS gave up (ETIMEDOUT): report it as a timeout like our own
    name = "" if target.is_ip else f" ('{target.host}')"
    described = "; ".join(_describe_connect_failure(address, exc) for address, exc in failures)
    raise BackendError(
        described + name,
        reason=HOST_UNREACHABLE,
        hint=f"check that the mail server listens on {target} and that a firewall lets the connector machine reach it",
    ) from failures[-1][1]


def _describe_connect_failure(address: str, exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {address}"
    return f"cannot connect to {address}: {exc.strerror or exc}"


async def _start(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    mapping: Mapping,
    context: ssl.SSLContext | None,
    timeout: float,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    if context is None:
        transport, protocol = await loop.create_connection(protocol_factory, sock=sock)
        return transport, protocol
    where = str(mapping.internal)
    if mapping.tls_server_name:
        where += f" (as '{mapping.tls_server_name}')"
    try:
        transport, protocol = await loop.create_connection(
            protocol_factory,
            sock=sock,
            ssl=context,
            server_hostname=mapping.server_name,
            ssl_handshake_timeout=timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        explanation = _VERIFY_EXPLANATION.get(exc.verify_code, "").format(name=mapping.server_name)
        detail = f"certificate verify failed: {exc.verify_message}"
        raise BackendError(
            f"TLS handshake with {where} failed: {detail}" + (f" ({explanation})" if explanation else ""),
            reason=BACKEND_TLS,
            hint=_tls_hint(exc.verify_code),
        ) from exc
    except ssl.SSLError as exc:
        raise BackendError(
            f"TLS handshake with {where} failed: {_ssl_detail(exc)}", reason=BACKEND_TLS, hint=_ssl_hint(exc)
        ) from exc
    except TimeoutError:
        raise
    except OSError as exc:
        raise BackendError(
            f"TLS handshake with {where} failed: the server closed the connection ({exc.strerror or exc})",
            reason=BACKEND_TLS,
            hint=f"check that port {mapping.internal.port} of {mapping.internal.host} speaks implicit TLS; "
            "for a STARTTLS or plain port use protocol 'tcp'",
        ) from exc
    return transport, protocol


def _ssl_detail(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "the server closed the connection during the handshake"
    if reason == "WRONG_VERSION_NUMBER":
        return "the server does not speak TLS on this port (it answered with something else)"
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
        return "the server offers only TLS versions older than 1.2"
    if reason == "NO_PROTOCOLS_AVAILABLE":
        return "no TLS version acceptable to both sides"
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(exc)


def _ssl_hint(exc: ssl.SSLError) -> str:
    if getattr(exc, "reason", None) == "WRONG_VERSION_NUMBER":
        return (
            "the internal port expects plain text or STARTTLS: use protocol 'tcp', or the implicit TLS port "
            "(993 IMAPS, 995 POP3S, 465 SMTPS)"
        )
    if isinstance(exc, ssl.SSLEOFError):
        return "check that the internal port speaks implicit TLS; for STARTTLS or plain use protocol 'tcp'"
    return "check the TLS configuration of the internal mail server"


def _tls_hint(verify_code: int) -> str:
    if verify_code in (62, 64):
        return "set the mapping's TLS server name, or use an internal host name that the certificate carries"
    if verify_code in (9, 10):
        return "renew the mail server's certificate, or fix the clock that is wrong"
    return "import the issuing CA into the connector's backend trust store"


def _timeout_hint(phase: str) -> str:
    if "resolving" in phase:
        return "the DNS server of the connector machine did not answer; check its DNS settings"
    if "TLS" in phase:
        return "the server accepted TCP but did not answer TLS; it may expect plain text or STARTTLS (protocol 'tcp')"
    return "a firewall may silently drop the connection; check that the connector machine may reach the host"
