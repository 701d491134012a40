"""The one exception tree of postbridge.

Every error that postbridge raises on purpose is a :class:`PostbridgeError`. Foreign exceptions (``OSError``,
``ssl.SSLError``, ``h2.exceptions.ProtocolError``, ``cryptography`` errors, ...) are translated at the boundary
where they occur (``raise ... from exc``) so that callers, the CLI and the logs see one vocabulary::

    PostbridgeError                 anything postbridge raises on purpose; .hint says how to fix it
    ├── ConfigurationError          local: a bad option, file or setting (fix the configuration)
    │   └── HomeError               the home folder cannot be used
    ├── TrustError                  a certificate or key is unreadable, untrusted, expired or for another name
    ├── AuthenticationError         credentials or tokens are wrong, expired or for something else
    ├── ProtocolError               the peer broke a wire protocol (SOCKS5, tunnel, enrollment)
    │   ├── SocksProtocolError      a SOCKS5 client sent bytes that are not SOCKS5; knows the reply to send
    │   └── TunnelProtocolError     the tunnel peer broke the tunnel protocol
    ├── NetworkError                remote: a connection could not be opened or was lost
    │   └── PostbridgeTimeout       remote: the peer did not answer in time
    └── StreamRefused               a tunneled connection was refused; knows its reason and SOCKS5 reply

Local errors (configuration, home folder) mean "change something here"; remote errors (network, timeout,
protocol, refused) mean "something on the other side failed". Messages name the offending value, the cause and
the fix, and never contain a secret.
"""

from __future__ import annotations


class PostbridgeError(Exception):
    """Base of every error postbridge raises on purpose.

    ``hint`` is the fix in one sentence (may be empty); ``str(error)`` is the cause with the offending value.
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class ConfigurationError(PostbridgeError):
    """A local setting, option or file is wrong; the fix is to change it."""


class HomeError(ConfigurationError):
    """The home folder (``--home`` / ``POSTBRIDGE_HOME``) cannot be created or is not initialised."""


class TrustError(PostbridgeError):
    """A certificate, key or trust store is unreadable, untrusted, expired or names another host."""


class AuthenticationError(PostbridgeError):
    """Credentials or a token are wrong, expired, revoked or belong to something else."""


class ProtocolError(PostbridgeError):
    """The peer sent bytes that break a wire protocol; the connection cannot go on."""


class SocksProtocolError(ProtocolError):
    """A SOCKS5 client broke RFC 1928/1929; ``reply`` is the SOCKS5 reply to send before closing, if any."""

    def __init__(self, message: str, *, reply: int | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reply = reply


class TunnelProtocolError(ProtocolError):
    """The tunnel peer broke the tunnel protocol (HTTP/2 framing or postbridge's rules on top of it)."""


class NetworkError(PostbridgeError):
    """A connection could not be opened, or was lost."""


class PostbridgeTimeout(NetworkError):
    """The peer did not answer in time."""


class StreamRefused(PostbridgeError):
    """A tunneled connection was refused by the hub or the connector.

    ``reason`` is the tunnel's ``postbridge-error`` value (``not-allowed``, ``host-unreachable``, ...) and
    ``socks_reply`` the SOCKS5 reply code that tells a cloud application what happened.
    """

    def __init__(self, message: str, *, reason: str, socks_reply: int, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.socks_reply = socks_reply
