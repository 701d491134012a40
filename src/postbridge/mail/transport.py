"""Opening the byte stream of a mail channel: TCP directly or through the hub's SOCKS5 proxy, and TLS.

* ``connect(settings)``: a connected, blocking socket with the channel's timeout; for ``on-premise`` it goes through
  the SOCKS5 proxy named in the binding (RFC 1929, user ``<subaccount>/<location>``), and a refusal becomes a
  :class:`MailConnectError` that knows the SOCKS5 reply and says what to change.
* ``tls_context(settings)``: verifies the chain (keystore roots and intermediates, optionally the system store) and
  the host name, TLS 1.2 minimum.
* ``wrap(sock, settings)``: the TLS handshake with SNI, failures explained (unknown CA, wrong name, expired, old TLS).
* ``unread_bytes(reader, sock)``: what a server sent beyond the last answer, so that STARTTLS can refuse
  pre-handshake injection instead of silently dropping it.

The protocol clients (IMAP, POP3, SMTP) use these; this module must not speak a mail protocol.
"""

from __future__ import annotations

import io
import socket
import ssl
from collections.abc import Callable

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.sync import Proxy as SocksProxy

from postbridge.errors import NetworkError, PostbridgeTimeout, TrustError
from postbridge.mail.common import MailProtocolError
from postbridge.mail.settings import ChannelSettings, Protection, Proxy
from postbridge.trust.truststore import TrustStore

# SOCKS5 reply -> (the words Java and other clients show, what it means for a mail channel)
SOCKS_DIAGNOSES: dict[int, tuple[str, str]] = {
    1: ("general failure", "the connector could not complete the connection (TLS to the internal host failed?)"),
    2: ("Connection not allowed by ruleset", "no mapping for exactly this virtual host:port at this location"),
    3: ("Network unreachable", "no connector is connected for this subaccount and location ID"),
    4: ("Host unreachable", "the connector could not reach the internal host"),
    5: ("Connection refused", "the hub refused the credentials in the binding (or the location)"),
}


class NotTlsError(NetworkError):
    """The TLS handshake met a peer that does not speak TLS (a plain greeting, or a close at the first byte)."""


class MailConnectError(NetworkError):
    """The channel's connection could not be opened; ``socks_reply`` is set when the hub refused it."""

    def __init__(self, message: str, *, socks_reply: int | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.socks_reply = socks_reply


def connect(settings: ChannelSettings) -> socket.socket:
    """A connected blocking socket to the channel's address. Raises MailConnectError or PostbridgeTimeout."""
    target = settings.address
    if settings.proxy is Proxy.ON_PREMISE:
        binding = settings.binding
        assert binding is not None  # ChannelSettings guarantees it
        user = f"{binding.subaccount}/{settings.location_id}" if settings.location_id else binding.subaccount
        proxy = SocksProxy(
            ProxyType.SOCKS5,
            binding.socks.host,
            binding.socks.port,
            username=user,
            password=binding.client_secret,
            rdns=True,  # the virtual host is resolved by nobody but the connector's mapping
        )
        try:
            sock = proxy.connect(target.host, target.port, timeout=settings.timeout)
        except ProxyTimeoutError as exc:
            raise PostbridgeTimeout(
                f"the hub's SOCKS5 proxy {binding.socks} did not answer within {settings.timeout:g} s",
                hint="the hub is overloaded or a firewall drops the packets; the connector's own connection to the "
                "internal host may also be slow: run 'postbridge connector check'",
            ) from exc
        except ProxyConnectionError as exc:
            raise MailConnectError(
                f"cannot reach the hub's SOCKS5 proxy at {binding.socks}: {exc}",
                hint="check the binding's proxy host and port and that 'postbridge cloud serve' runs",
            ) from exc
        except ProxyError as exc:
            code = exc.error_code if isinstance(exc.error_code, int) else None
            if code is None:  # no reply code: the proxy broke the protocol or closed
                raise MailConnectError(
                    f"the hub's SOCKS5 proxy {binding.socks} failed without a reply code: {exc}",
                    hint="check that the binding's proxy address is the hub's SOCKS5 port",
                ) from exc
            words, meaning = SOCKS_DIAGNOSES.get(code, ("refused", "the hub refused the connection"))
            where = f"location '{settings.location_id}'" if settings.location_id else "the default location"
            raise MailConnectError(
                f'SOCKS5 reply 0x{code:02x} "{words}" for {target} at {where}: {meaning}',
                socks_reply=code,
                hint=_socks_hint(code, settings),
            ) from exc
        sock.settimeout(settings.timeout)
        return sock
    try:
        return socket.create_connection((target.host, target.port), timeout=settings.timeout)
    except TimeoutError as exc:
        raise PostbridgeTimeout(
            f"no connection to {target} within {settings.timeout:g} s",
            hint="a firewall drops the packets or the host is down: check the address and the route from here",
        ) from exc
    except socket.gaierror as exc:
        raise MailConnectError(f"cannot resolve '{target.host}': {exc.strerror}", hint="check the address") from exc
    except OSError as exc:
        raise MailConnectError(
            f"cannot connect to {target}: {exc.strerror or exc}",
            hint="is the server running, and is it reachable from here (proxy 'internet')?",
        ) from exc


def open_channel(settings: ChannelSettings) -> socket.socket:
    """:func:`connect`, then the TLS handshake right away for protection ``tls`` (IMAPS, POP3S, SMTPS)."""
    sock = connect(settings)
    return wrap(sock, settings) if settings.protection is Protection.TLS else sock


def _socks_hint(code: int | None, settings: ChannelSettings) -> str:
    if code == 2:
        return (
            f"add a mapping on the connector: 'postbridge connector mapping add {settings.address} --to HOST:PORT', "
            "or use the virtual host and port that are mapped"
        )
    if code == 3:
        return "check location_id against the connected connectors, and that the connector runs"
    if code == 4:
        return "run 'postbridge connector check' for this mapping on the connector and fix the internal address"
    if code == 5:
        return "use the binding printed by 'postbridge cloud binding' for this subaccount (secret and subaccount)"
    if code == 1:
        return "for a 'tcp-tls' mapping add the internal server's CA to the connector's truststore"
    return ""


def tls_context(settings: ChannelSettings) -> ssl.SSLContext:
    """A verifying client context: keystore (roots + intermediates) and optionally the system store."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    anchors = 0
    if settings.keystore is not None:
        bundle = TrustStore(settings.keystore, command="postbridge keystore").pem_bundle()
        if bundle:
            context.load_verify_locations(cadata=bundle)
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a stored intermediate is enough
            anchors += 1
    if settings.use_system_trust:
        context.load_default_certs()
        anchors += 1
    if not anchors:
        raise TrustError(
            "no certificate is trusted for this channel (empty keystore and no system store)",
            hint="add the server's root CA to the keystore, or set use_system_trust for public certificates",
        )
    return context


def wrap(sock: socket.socket, settings: ChannelSettings, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """TLS handshake on ``sock`` (SNI and host name = the channel's server name). Raises TrustError or NetworkError."""
    context = context or tls_context(settings)
    name = settings.server_name
    try:
        return context.wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise TrustError(
            f"the certificate of {settings.address} is not trusted: {exc.verify_message}",
            hint=_verify_hint(exc, name),
        ) from exc
    except ssl.SSLError as exc:
        sock.close()
        kind = NotTlsError if (exc.reason or "") in _NOT_TLS_REASONS else NetworkError
        raise kind(f"TLS handshake with {settings.address} failed: {exc.reason or exc}", hint=_tls_hint(exc)) from exc
    except TimeoutError as exc:
        sock.close()
        raise PostbridgeTimeout(
            f"TLS handshake with {settings.address} did not finish within {settings.timeout:g} s",
            hint="the server took the connection but not the handshake: a port that waits for a plain command "
            "wants protection 'starttls-mandatory'; otherwise the server is overloaded (raise the timeout)",
        ) from exc
    except OSError as exc:
        sock.close()
        raise NotTlsError(
            f"the connection to {settings.address} was dropped during the TLS handshake ({exc.strerror or exc})",
            hint="the server or mapping does not expect TLS here: for a 'tcp-tls' mapping use protection 'off'; "
            "for a STARTTLS port use 'starttls-mandatory'",
        ) from exc


def _verify_hint(exc: ssl.SSLCertVerificationError, name: str) -> str:
    code = exc.verify_code
    if code in (18, 19, 20, 21):  # self-signed, self-signed in chain, unknown issuer, unable to verify leaf
        return "add the server's root CA (and intermediates) to the keystore: 'postbridge keystore add FILE'"
    if code == 10:
        return "the server's certificate has expired: the mail server's administrator must renew it"
    if code == 9:
        return "the server's certificate is not valid yet: check the clocks"
    if code == 62:
        return (
            f"the certificate does not name '{name}': use the server's real name as virtual host, "
            "or set tls_server_name to a name the certificate carries"
        )
    return "inspect the chain with 'openssl s_client -showcerts' and add the missing CA to the keystore"


_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


def _tls_hint(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    if reason in _NOT_TLS_REASONS:
        return "the server does not speak TLS on this port: use protection 'starttls-mandatory' for a plain port"
    if "VERSION" in reason or "PROTOCOL" in reason:
        return "the server offers only an old TLS version (TLS 1.2 or newer is required): update the server"
    return ""


def unread_bytes(reader: io.BufferedReader, sock: socket.socket) -> bytes:
    """Bytes the server sent that nobody read yet (in the reader's buffer or the socket), without blocking."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # a peek on an empty buffer would otherwise wait for the server
    try:
        try:
            buffered = reader.peek(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            buffered = b""
        try:
            pending = sock.recv(4096, socket.MSG_PEEK)
        except (BlockingIOError, ssl.SSLWantReadError):
            pending = b""
    finally:
        sock.settimeout(timeout)
    return bytes(buffered or b"") + pending


def secure_after_starttls(
    settings: ChannelSettings,
    reader: io.BufferedReader,
    sock: socket.socket,
    command: str,
    abort: Callable[[], None],
    context: ssl.SSLContext | None = None,
) -> ssl.SSLSocket:
    """After the server's positive answer to STARTTLS/STLS: refuse bytes that came after the answer (response
    injection), close the clear-text reader, and do the verified handshake (``context`` defaults to
    :func:`tls_context`). Calls ``abort`` before raising."""
    leftover = unread_bytes(reader, sock)
    if leftover:
        abort()
        raise MailProtocolError(
            f"{settings.address} sent {len(leftover)} bytes after the {command} answer, before TLS began",
            hint="this is how response injection works (a man in the middle); connection aborted",
        )
    reader.close()  # the clear-text reader: nothing in it may be used any more
    return wrap(sock, settings, context)
