"""What the mail adapter's protocol clients share: SASL mechanisms, the clear-text rule and connection-loss errors.

* :func:`sasl_mechanism` turns a channel's ``auth`` and credentials into a small :class:`SaslMechanism` (PLAIN,
  LOGIN, CRAM-MD5, XOAUTH2, OAUTHBEARER) that answers challenges with bytes; each protocol (POP3 ``AUTH``, SMTP
  ``AUTH``) frames those bytes itself. Responses are UTF-8, so non-ASCII passwords work.
* :func:`cleartext_allowed` is the one rule for sending credentials: only over TLS, through the connector's
  ``tcp-tls`` mapping (protection ``off`` + proxy ``on-premise``), or with ``allow_cleartext_auth``.
* :func:`check_credentials` refuses user names and secrets with line breaks or NUL (command injection).
* :func:`connection_lost` explains a dropped or silent connection with the protection/port mismatch hint.

This module must not open connections, speak a protocol or log; a secret never appears in its messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Protocol

from postbridge.errors import ConfigurationError, NetworkError, PostbridgeTimeout, ProtocolError
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection, Proxy

_FORBIDDEN = ("\r", "\n", "\0")


class MailProtocolError(ProtocolError):
    """The mail server answered something that makes going on unsafe or impossible; ``reply`` is its words."""

    def __init__(self, message: str, *, reply: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reply = reply


class TlsDowngrade(MailProtocolError):
    """The channel requires TLS and the server (or someone in between) would not let us have it."""


class SaslMechanism(Protocol):
    """One SASL exchange from the client's side (RFC 4422): an optional initial response, then answers."""

    @property
    def name(self) -> str: ...

    def initial_response(self) -> bytes | None:
        """What to send with the AUTH command, or None when the mechanism waits for a challenge."""
        ...

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one (already base64-decoded) server challenge."""
        ...


@dataclass(frozen=True)
class PlainMechanism:
    user: str
    secret: str = field(repr=False)
    name: str = "PLAIN"

    def initial_response(self) -> bytes | None:
        return f"\0{self.user}\0{self.secret}".encode()

    def respond(self, challenge: bytes) -> bytes:
        return f"\0{self.user}\0{self.secret}".encode()


@dataclass
class LoginMechanism:
    """The non-standard LOGIN mechanism: the first challenge gets the user, every later one the password."""

    user: str
    secret: str = field(repr=False)
    name: str = "LOGIN"
    _answered: int = 0

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        self._answered += 1
        return (self.user if self._answered == 1 else self.secret).encode()


@dataclass(frozen=True)
class CramMd5Mechanism:
    """RFC 2195: ``user HEX(HMAC-MD5(password, challenge))``; the password itself never travels."""

    user: str
    secret: str = field(repr=False)
    name: str = "CRAM-MD5"

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        digest = hmac.new(self.secret.encode(), challenge, hashlib.md5).hexdigest()
        return f"{self.user} {digest}".encode()


@dataclass(frozen=True)
class XOAuth2Mechanism:
    """Google/Microsoft XOAUTH2; a failure comes as a JSON challenge that is answered with an empty line."""

    user: str
    secret: str = field(repr=False)
    name: str = "XOAUTH2"

    def initial_response(self) -> bytes | None:
        return f"user={self.user}\x01auth=Bearer {self.secret}\x01\x01".encode()

    def respond(self, challenge: bytes) -> bytes:
        return b""


@dataclass(frozen=True)
class OAuthBearerMechanism:
    """RFC 7628; a failure comes as a JSON challenge that is answered with a single ^A (RFC 7628 3.2.3)."""

    user: str
    secret: str = field(repr=False)
    name: str = "OAUTHBEARER"

    def initial_response(self) -> bytes | None:
        return f"n,a={self.user},\x01auth=Bearer {self.secret}\x01\x01".encode()

    def respond(self, challenge: bytes) -> bytes:
        return b"\x01"


def sasl_mechanism(method: AuthMethod, credentials: Credentials) -> SaslMechanism:
    """The mechanism object for ``method``. Raises ConfigurationError for ``none``."""
    if method is AuthMethod.PLAIN:
        return PlainMechanism(credentials.user, credentials.secret)
    if method is AuthMethod.LOGIN:
        return LoginMechanism(credentials.user, credentials.secret)
    if method is AuthMethod.CRAM_MD5:
        return CramMd5Mechanism(credentials.user, credentials.secret)
    if method is AuthMethod.XOAUTH2:
        return XOAuth2Mechanism(credentials.user, credentials.secret)
    if method is AuthMethod.OAUTHBEARER:
        return OAuthBearerMechanism(credentials.user, credentials.secret)
    raise ConfigurationError(f"authentication '{method}' has no SASL mechanism")


def check_credentials(settings: ChannelSettings) -> Credentials:
    """The channel's credentials, refused when a line break or NUL would smuggle commands in.

    Raises ConfigurationError (naming the user, never the secret).
    """
    credentials = settings.credentials
    if credentials is None:
        raise ConfigurationError(
            f"channel {settings.address} uses authentication '{settings.auth}' but has no user and password",
            hint="give a user and a password (or a credential name), or set auth = 'none'",
        )
    if any(char in credentials.user for char in _FORBIDDEN):
        raise ConfigurationError(
            f"the user name {credentials.user!r} for {settings.address} contains a line break or NUL",
            hint="remove the control characters from the user name",
        )
    if any(char in credentials.secret for char in _FORBIDDEN):
        raise ConfigurationError(
            f"the password (or token) of '{credentials.user}' for {settings.address} contains a line break or NUL",
            hint="store the password without a trailing newline",
        )
    return credentials


def cleartext_allowed(settings: ChannelSettings, *, tls: bool) -> bool:
    """May credentials be sent on this connection? Over TLS, through a ``tcp-tls`` mapping, or when allowed."""
    if tls or settings.allow_cleartext_auth:
        return True
    # the connector's 'tcp-tls' mapping encrypts the way to the server; the tunnel encrypts the rest
    return settings.protection is Protection.OFF and settings.proxy is Proxy.ON_PREMISE


def scrub(text: str, secret: str) -> str:
    """``text`` without ``secret`` (also not in base64), for messages built from a server's words."""
    if secret:
        text = text.replace(secret, "***")
        text = text.replace(base64.b64encode(secret.encode()).decode(), "***")
    return text


AT_GREETING = "while waiting for the greeting"
"""The ``when`` of :func:`connection_lost` before the server said anything: the one moment a wrong TLS mode shows."""


def connection_lost(
    settings: ChannelSettings, when: str, exc: BaseException, *, implicit_tls_port: int
) -> NetworkError:
    """The error for a connection that dropped or fell silent ``when`` (:data:`AT_GREETING` or during a command).

    At the greeting the likely cause is a TLS mode that does not fit the port, so the hint names the
    protection/mapping to change (``implicit_tls_port`` is the protocol's 993, 995 or 465); later the server itself
    closed or stalled. A timeout is a PostbridgeTimeout, a drop a NetworkError.
    """
    address = settings.address
    timed_out = isinstance(exc, TimeoutError)
    if when != AT_GREETING:
        hint = (
            f"the server did not answer in time: it may be overloaded; raise the channel's timeout "
            f"(now {settings.timeout:g} s) if it is only slow"
            if timed_out
            else "the server closed the connection: its log says why (a connection limit, a restart, an idle timeout)"
        )
    elif settings.protection is Protection.TLS:
        hint = "the peer may not speak TLS here: for a STARTTLS port use 'starttls-mandatory'"
    elif address.port == implicit_tls_port:
        hint = (
            f"port {implicit_tls_port} expects TLS at once: use protection 'tls', "
            "or a 'tcp-tls' mapping with protection 'off'"
        )
    else:
        hint = (
            f"if this goes through a 'tcp' mapping to an implicit-TLS port ({implicit_tls_port}), change the "
            "mapping to 'tcp-tls' or use protection 'tls'"
        )
    if timed_out:
        return PostbridgeTimeout(f"{address} did not answer {when} within {settings.timeout:g} s", hint=hint)
    reason = str(exc) or type(exc).__name__
    return NetworkError(f"connection dropped by {address} {when}: {reason}", hint=hint)
