"""POP3 client of the mail adapter: the standard ``poplib`` with the STLS and login pitfalls closed.

Like :mod:`postbridge.mail.imap` (the pattern), on a socket that :mod:`transport` opened (direct or through the
hub's SOCKS5 proxy), with these rules:

* every TLS handshake verifies chain and host name (:func:`transport.wrap`); ``poplib.stls()`` is never used;
* ``starttls-mandatory`` fails closed: no STLS in CAPA, or any answer but ``+OK`` to STLS, ends the session;
  bytes that arrived after the STLS answer but before the handshake abort it (response injection);
* the capabilities read before TLS are discarded and CAPA is read again over TLS;
* credentials leave only over TLS, through the connector's ``tcp-tls`` mapping (protection ``off``), or with
  ``allow_cleartext_auth`` (:func:`common.cleartext_allowed`); APOP (MD5 of a server-chosen stamp) is never used;
* a message is returned byte-exact: lines rebuilt with CRLF, dot-stuffing undone, no line-length limit of 2 KiB.

``delete()`` only marks a message: the server removes marked messages when ``quit()`` succeeds (RFC 1939 UPDATE
state). Leaving the ``with`` block by an exception closes without QUIT, so nothing marked is removed then.
The session is blocking (run it in a thread from asyncio). No password, token or message body is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import poplib
import socket
import ssl
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from postbridge.errors import AuthenticationError, ConfigurationError, NetworkError, PostbridgeError
from postbridge.mail import transport
from postbridge.mail.common import (
    AT_GREETING,
    MailProtocolError,
    PlainMechanism,
    SaslMechanism,
    TlsDowngrade,
    check_credentials,
    cleartext_allowed,
    connection_lost,
    sasl_mechanism,
    scrub,
)
from postbridge.mail.settings import AuthMethod, ChannelSettings, Protection

log = logging.getLogger("postbridge.mail.pop3")

POP3S_PORT = 995
MAX_LINE = 1 << 20  # a message line longer than 1 MiB is an attack, not mail
MAX_CHALLENGES = 5
_AUTH_COMMAND_LIMIT = 255  # RFC 5034: longer AUTH commands send the initial response after a "+" instead


class _Pop3(poplib.POP3):
    """poplib on a socket we opened (TLS already done for POP3S), with typed access to its line primitives."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self._prepared = sock
        try:
            super().__init__(host, port)  # reads the greeting
        except BaseException:
            with contextlib.suppress(OSError):
                self.close()  # poplib leaves its reader (and with it the socket) open when the greeting fails
            raise

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return self._prepared

    def command(self, line: str) -> bytes:
        """Send one command, return its one-line answer; raises ``error_proto`` on ``-ERR`` or EOF."""
        answer: bytes = self._shortcmd(line)  # type: ignore[attr-defined]
        return answer

    def long_command(self, line: str) -> list[bytes]:
        """Send one command, return the lines of its multi-line answer (poplib's 2 KiB line limit applies)."""
        _, lines, _ = self._longcmd(line)  # type: ignore[attr-defined]
        return list(lines)

    def read_message(self) -> bytes:
        """The rest of a multi-line answer as one message: CRLF line ends, dot-stuffing undone like poplib."""
        parts: list[bytes] = []
        while True:
            line = self.file.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise MailProtocolError(f"a line of the message from {self.host} is longer than {MAX_LINE} bytes")
            if not line.endswith(b"\n"):
                raise EOFError("the connection closed in the middle of a message")
            content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if content == b".":
                return b"".join(parts)
            if content.startswith(b".."):
                content = content[1:]
            parts.append(content + b"\r\n")


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


def _error_text(exc: poplib.error_proto) -> str:
    return _text(exc.args[0]) if exc.args else "-ERR"


def _is_eof(exc: poplib.error_proto) -> bool:
    return _error_text(exc) == "-ERR EOF"


def _number(number: int) -> int:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigurationError(f"POP3 message number {number!r} is not a positive integer")
    return number


class Pop3Session:
    """One logged-in POP3 session (the mailbox is locked until quit). Use :func:`open_pop3`."""

    def __init__(self, settings: ChannelSettings) -> None:
        self.settings = settings
        self.tls = False
        self.tls_version: str | None = None
        self.greeting = ""
        self.capabilities: dict[str, list[str]] = {}
        self.capabilities_before_tls: dict[str, list[str]] = {}
        self.marked_for_deletion: set[int] = set()
        self.tls_context: ssl.SSLContext | None = None  # None: transport.tls_context (the connection test swaps it)
        self._pop: _Pop3 | None = None

    # -- connecting ---------------------------------------------------------------------------------------------

    def connect(self) -> Pop3Session:
        settings = self.settings
        sock = transport.open_channel(settings)
        if settings.protection is Protection.TLS:
            self._mark_tls(sock)
        try:
            pop = _Pop3(sock, settings.server_name, settings.address.port)
        except poplib.error_proto as exc:
            sock.close()
            if _is_eof(exc):
                raise self._lost(AT_GREETING, EOFError("closed")) from exc
            raise MailProtocolError(
                f"{settings.address} refused the session: {_error_text(exc)}", reply=_error_text(exc)
            ) from exc
        except (OSError, EOFError) as exc:
            sock.close()
            raise self._lost(AT_GREETING, exc) from exc
        self._pop = pop
        self.greeting = _text(pop.welcome)
        self.capabilities = self._read_capabilities(pop)
        self.capabilities_before_tls = dict(self.capabilities)
        if settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL):
            self._starttls(pop)
        if settings.auth is AuthMethod.NONE:
            raise AuthenticationError(
                f"{settings.address} requires a login (POP3 always does), but the channel has auth 'none'",
                hint="set auth and credentials for this channel",
            )
        self._login(pop)
        return self

    def _mark_tls(self, sock: socket.socket) -> None:
        self.tls = True
        if isinstance(sock, ssl.SSLSocket):
            self.tls_version = sock.version()

    def _read_capabilities(self, pop: _Pop3) -> dict[str, list[str]]:
        try:
            lines = pop.long_command("CAPA")
        except poplib.error_proto as exc:
            if _is_eof(exc):
                raise
            return {}  # an RFC 1939-only server: no STLS, no SASL
        capabilities: dict[str, list[str]] = {}
        for line in lines:
            words = line.decode("utf-8", "replace").split()
            if words:
                capabilities[words[0].upper()] = words[1:]
        return capabilities

    def _starttls(self, pop: _Pop3) -> None:
        settings = self.settings
        if "STLS" not in self.capabilities:
            if settings.protection is Protection.STARTTLS_MANDATORY:
                self.close()
                raise TlsDowngrade(
                    f"{settings.address} does not offer STLS (capabilities: {' '.join(self.capabilities) or 'none'})",
                    hint="use protection 'tls' for an implicit-TLS port (995); with a 'tcp-tls' mapping use 'off'; "
                    "if this server really has no TLS, something may be stripping it",
                )
            log.warning("%s offers no STLS; going on without TLS (starttls-optional)", settings.address)
            return
        try:
            answer = pop.command("STLS")
        except poplib.error_proto as exc:
            if _is_eof(exc):
                raise
            self.close()
            raise TlsDowngrade(
                f"{settings.address} refused STLS: {_error_text(exc)}",
                reply=_error_text(exc),
                hint="the server's TLS set-up is broken (or an attacker answered for it): not going on in clear",
            ) from None
        if not answer.startswith(b"+OK"):
            self.close()
            raise TlsDowngrade(
                f"{settings.address} answered STLS with {_text(answer)!r} instead of +OK",
                reply=_text(answer),
                hint="the server's TLS set-up is broken (or an attacker answered for it): not going on in clear",
            )
        reader: Any = pop.file  # imaplib/poplib type it loosely; it is the socket's BufferedReader
        pop.sock = transport.secure_after_starttls(settings, reader, pop.sock, "STLS", self.close, self.tls_context)
        self.greeting = ""  # the clear-text greeting is pre-TLS state: discarded with the rest
        pop.file = pop.sock.makefile("rb")
        pop._tls_established = True  # type: ignore[attr-defined]
        self._mark_tls(pop.sock)
        self.capabilities = self._read_capabilities(pop)  # nothing said before TLS counts

    def _login(self, pop: _Pop3) -> None:
        settings = self.settings
        credentials = check_credentials(settings)
        if not cleartext_allowed(settings, tls=self.tls):
            self.close()
            raise TlsDowngrade(
                f"not sending credentials to {settings.address} without TLS",
                hint="use protection 'starttls-mandatory' or 'tls'; only if you accept clear-text passwords, set "
                "allow_cleartext_auth",
            )
        offered = [mechanism.upper() for mechanism in self.capabilities.get("SASL", [])]
        method = settings.auth
        try:
            if method is AuthMethod.PLAIN and "PLAIN" in offered:
                self._authenticate(pop, PlainMechanism(credentials.user, credentials.secret))
            elif method in (AuthMethod.PLAIN, AuthMethod.LOGIN):
                pop.user(credentials.user)
                pop.pass_(credentials.secret)
            else:
                self._authenticate(pop, sasl_mechanism(method, credentials))
        except poplib.error_proto as exc:
            if _is_eof(exc):
                raise self._lost("during login", EOFError("closed")) from None
            self.close()
            reason = scrub(_error_text(exc), credentials.secret)
            raise AuthenticationError(
                f"{settings.address} refused the login of '{credentials.user}' ({method}): {reason}",
                hint="check user and password (or token); the server offers SASL "
                f"{' '.join(offered) or '(none)'}" + (" and USER/PASS" if "USER" in self.capabilities else ""),
            ) from None
        log.info("POP3 %s: logged in as %r (%s, %s)", settings.address, credentials.user, method,
                 self.tls_version or "no TLS")  # fmt: skip

    def _authenticate(self, pop: _Pop3, mechanism: SaslMechanism) -> None:
        """RFC 5034 AUTH: initial response when it fits in 255 octets, then challenge/response until +OK."""
        command = f"AUTH {mechanism.name}"
        pending = mechanism.initial_response()
        if pending is not None:
            encoded = base64.b64encode(pending).decode() or "="
            if len(command) + 1 + len(encoded) <= _AUTH_COMMAND_LIMIT:
                command, pending = f"{command} {encoded}", None
        answer = pop.command(command)
        for _ in range(MAX_CHALLENGES):
            if answer.startswith(b"+OK"):
                return
            if not (answer == b"+" or answer.startswith(b"+ ")):
                raise MailProtocolError(f"{self.settings.address} answered AUTH with {_text(answer)!r}")
            try:
                challenge = base64.b64decode(answer[2:].strip(), validate=True)
            except binascii.Error:
                raise MailProtocolError(f"{self.settings.address} sent a SASL challenge that is not base64") from None
            reply = pending if pending is not None else mechanism.respond(challenge)
            pending = None
            answer = pop.command(base64.b64encode(reply).decode())
        raise MailProtocolError(f"{self.settings.address} sent more than {MAX_CHALLENGES} SASL challenges")

    def _lost(self, when: str, exc: BaseException) -> NetworkError:
        return connection_lost(self.settings, when, exc, implicit_tls_port=POP3S_PORT)

    # -- mailbox operations -------------------------------------------------------------------------------------

    @property
    def pop3(self) -> _Pop3:
        if self._pop is None:
            raise PostbridgeError("POP3 session is not connected")
        return self._pop

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[_Pop3]:
        """Run one command: -ERR becomes MailProtocolError (session usable), a lost connection NetworkError."""
        pop = self.pop3
        try:
            yield pop
        except poplib.error_proto as exc:
            if _is_eof(exc):
                self.close()
                raise self._lost(f"during {what}", EOFError("closed")) from exc
            text = _error_text(exc)
            if not text.startswith("-ERR"):  # poplib's own complaint (a line too long): out of step now
                self.close()
            raise MailProtocolError(f"{self.settings.address}: {what} failed: {text}", reply=text) from exc
        except MailProtocolError:
            self.close()  # the answer was cut or overlong: the session cannot go on in step
            raise
        except (OSError, EOFError) as exc:
            self.close()
            raise self._lost(f"during {what}", exc) from exc

    def stat(self) -> tuple[int, int]:
        """(number of messages, total size in octets). Raises MailProtocolError or NetworkError."""
        with self._talking("STAT") as pop:
            answer = pop.command("STAT")
        try:
            _, count, size = answer.split()[:3]
            return int(count), int(size)
        except ValueError:
            raise MailProtocolError(f"{self.settings.address} answered STAT with {_text(answer)!r}") from None

    def uidl(self) -> dict[int, str]:
        """Message number -> unique id, stable across sessions (RFC 1939 UIDL). Raises MailProtocolError."""
        try:
            with self._talking("UIDL") as pop:
                lines = pop.long_command("UIDL")
        except MailProtocolError as exc:
            if exc.reply.startswith("-ERR") and not exc.hint:
                exc.hint = "the server lacks UIDL: use post-processing 'delete' (not 'keep') with it"
            raise
        return {number: value.decode("ascii", "replace") for number, value in self._pairs("UIDL", lines)}

    def sizes(self) -> dict[int, int]:
        """Message number -> size in octets, for all messages in one round trip (LIST)."""
        with self._talking("LIST") as pop:
            lines = pop.long_command("LIST")
        try:
            return {number: int(value) for number, value in self._pairs("LIST", lines)}
        except ValueError:
            raise MailProtocolError(f"{self.settings.address} sent a LIST size that is no number") from None

    def size(self, number: int) -> int:
        """The size in octets of message ``number`` (LIST n). Raises MailProtocolError when it does not exist."""
        with self._talking(f"LIST {_number(number)}") as pop:
            answer = pop.command(f"LIST {number}")
        try:
            return int(answer.split()[2])
        except (IndexError, ValueError):
            raise MailProtocolError(f"{self.settings.address} answered LIST with {_text(answer)!r}") from None

    def retrieve(self, number: int) -> bytes:
        """Message ``number`` byte-exact (RETR). Raises MailProtocolError when it does not exist."""
        with self._talking(f"RETR {_number(number)}") as pop:
            pop.command(f"RETR {number}")
            return pop.read_message()

    def delete(self, number: int) -> None:
        """Mark message ``number`` for deletion (DELE); it is removed only when :meth:`quit` succeeds."""
        with self._talking(f"DELE {_number(number)}") as pop:
            pop.command(f"DELE {number}")
        self.marked_for_deletion.add(number)

    def reset(self) -> None:
        """Unmark every message marked for deletion in this session (RSET)."""
        with self._talking("RSET") as pop:
            pop.command("RSET")
        self.marked_for_deletion.clear()

    def _pairs(self, what: str, lines: list[bytes]) -> Iterator[tuple[int, bytes]]:
        for line in lines:
            parts = line.split()
            if len(parts) < 2 or not parts[0].isdigit():
                raise MailProtocolError(f"{self.settings.address} sent a malformed {what} line {line[:80]!r}")
            yield int(parts[0]), parts[1]

    def quit(self) -> None:
        """End the session with QUIT, which removes the marked messages. Raises NetworkError if that is unsure."""
        pop, self._pop = self._pop, None
        if pop is None:
            return
        marked = len(self.marked_for_deletion)
        when = f"during QUIT ({marked} message(s) marked for deletion may still be there)" if marked else "during QUIT"
        try:
            pop.command("QUIT")
        except poplib.error_proto as exc:
            if _is_eof(exc):
                raise self._lost(when, EOFError("closed")) from exc
            raise MailProtocolError(
                f"{self.settings.address} answered QUIT with {_error_text(exc)}: deletions were not applied",
                reply=_error_text(exc),
            ) from exc
        except OSError as exc:
            raise self._lost(when, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                pop.close()
        self.marked_for_deletion.clear()

    def close(self) -> None:
        """Drop the connection without QUIT: messages marked for deletion stay (RFC 1939)."""
        pop, self._pop = self._pop, None
        if pop is not None:
            with contextlib.suppress(OSError, ValueError):
                pop.close()

    def __enter__(self) -> Pop3Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.quit()
        else:
            self.close()


def open_pop3(settings: ChannelSettings) -> Pop3Session:
    """Connect, secure and log in as the settings say. Raises a PostbridgeError naming cause and fix."""
    session = Pop3Session(settings)
    try:
        return session.connect()
    except PostbridgeError:
        session.close()
        raise
    except poplib.error_proto as exc:
        session.close()
        raise session._lost("during set-up", EOFError(_error_text(exc))) from exc
    except (OSError, EOFError) as exc:
        session.close()
        raise session._lost("during set-up", exc) from exc
