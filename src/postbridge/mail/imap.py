"""IMAP client of the mail adapter: the standard ``imaplib`` with the STARTTLS and login pitfalls closed.

What plain ``imaplib`` gets wrong and this module fixes (Poddebniak et al., "Why TLS is better without STARTTLS"):

* it verifies nothing by default -> every TLS handshake uses :func:`transport.tls_context` (chain + host name);
* it keeps untagged responses (capabilities, ALERTs) received before STARTTLS -> they are discarded and the
  capabilities read again over TLS;
* it silently drops bytes a server (or attacker) sent after the STARTTLS answer -> such bytes abort the session;
* ``login()`` ignores ``LOGINDISABLED`` and happily sends passwords in clear text -> credentials leave only over TLS
  (or through the connector's ``tcp-tls`` mapping with protection ``off``), unless ``allow_cleartext_auth``;
* a ``PREAUTH`` greeting skips STARTTLS -> refused in ``starttls-*`` modes.

The session is blocking (run it in a thread from asyncio). No password, token or message body is ever logged.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from postbridge.errors import AuthenticationError, NetworkError, PostbridgeError
from postbridge.mail import transport
from postbridge.mail.common import (
    AT_GREETING,
    MailProtocolError,
    TlsDowngrade,
    check_credentials,
    cleartext_allowed,
    connection_lost,
    scrub,
)
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection

log = logging.getLogger("postbridge.mail.imap")


@dataclass(frozen=True)
class Mailbox:
    name: str
    uidvalidity: int
    exists: int
    uidnext: int | None


class _Imap4(imaplib.IMAP4):
    """imaplib on a socket we opened (direct or through the hub's SOCKS5 proxy; TLS already done for IMAPS)."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self._prepared = sock
        super().__init__(host, port)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return self._prepared


def _uid_set(uids: int | Sequence[int]) -> str:
    return str(uids) if isinstance(uids, int) else ",".join(str(uid) for uid in uids)


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ImapSession:
    """One logged-in IMAP session. Use :func:`open_session` (or as a context manager)."""

    def __init__(self, settings: ChannelSettings) -> None:
        self.settings = settings
        self.tls = False
        self.tls_version: str | None = None
        self.capabilities_before_tls: tuple[str, ...] = ()
        self.tls_context: ssl.SSLContext | None = None  # None: transport.tls_context (the connection test swaps it)
        self._imap: _Imap4 | None = None

    # -- connecting ---------------------------------------------------------------------------------------------

    def connect(self) -> ImapSession:
        settings = self.settings
        sock = transport.open_channel(settings)
        if settings.protection is Protection.TLS:
            self._mark_tls(sock)
        try:
            imap = _Imap4(sock, settings.server_name, settings.address.port)
        except (imaplib.IMAP4.error, OSError, EOFError) as exc:
            sock.close()
            raise self._dropped(AT_GREETING, exc) from exc
        self._imap = imap
        self.capabilities_before_tls = tuple(imap.capabilities)
        if settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL):
            self._starttls(imap)
        if settings.auth is not AuthMethod.NONE and imap.state == "NONAUTH":
            self._login(imap)
        elif imap.state == "NONAUTH" and settings.auth is AuthMethod.NONE:
            raise AuthenticationError(
                f"{settings.address} requires a login, but the channel has auth 'none'",
                hint="set auth and credentials for this channel",
            )
        return self

    def _mark_tls(self, sock: socket.socket) -> None:
        self.tls = True
        if isinstance(sock, ssl.SSLSocket):
            self.tls_version = sock.version()

    def _starttls(self, imap: _Imap4) -> None:
        settings = self.settings
        mandatory = settings.protection is Protection.STARTTLS_MANDATORY
        if imap.state == "AUTH":  # PREAUTH: the server skipped authentication, and with it STARTTLS
            if mandatory or not settings.allow_cleartext_auth:
                self.abort()
                raise TlsDowngrade(
                    f"{settings.address} greeted with PREAUTH, so STARTTLS is impossible and mail would flow in clear",
                    hint="use protection 'tls' (IMAPS, port 993) or fix the server; PREAUTH before TLS is also "
                    "what a STARTTLS-stripping attacker sends",
                )
            return
        if "STARTTLS" not in imap.capabilities:
            if mandatory:
                self.abort()
                raise TlsDowngrade(
                    f"{settings.address} does not offer STARTTLS (capabilities: {' '.join(imap.capabilities)})",
                    hint="use protection 'tls' for an implicit-TLS port (993); with a 'tcp-tls' mapping use 'off'; "
                    "if this server really has no TLS, something may be stripping it",
                )
            log.warning("%s offers no STARTTLS; going on without TLS (starttls-optional)", settings.address)
            return
        try:
            typ, data = imap._simple_command("STARTTLS")
        except imaplib.IMAP4.error as exc:
            self.abort()
            raise TlsDowngrade(
                f"{settings.address} refused STARTTLS: {exc}", hint="the server's TLS is broken"
            ) from exc
        if typ != "OK":
            self.abort()
            raise TlsDowngrade(
                f"{settings.address} answered STARTTLS with {typ}",
                reply=_text(data),
                hint="the server's TLS set-up is broken (or an attacker answered for it): not going on in clear",
            )
        reader: Any = imap.file  # imaplib/poplib type it loosely; it is the socket's BufferedReader
        imap.sock = transport.secure_after_starttls(
            settings, reader, imap.sock, "STARTTLS", self.abort, self.tls_context
        )
        imap.file = imap.sock.makefile("rb")
        imap._tls_established = True  # type: ignore[attr-defined]
        self._mark_tls(imap.sock)
        imap.welcome = b""  # the clear-text greeting is pre-TLS state too: never shown or used afterwards
        imap.untagged_responses.clear()  # nothing said before TLS counts: capabilities, ALERTs, referrals
        imap._get_capabilities()

    def _cleartext_allowed(self) -> bool:
        return cleartext_allowed(self.settings, tls=self.tls)

    def _login(self, imap: _Imap4) -> None:
        settings = self.settings
        credentials = check_credentials(settings)  # no line breaks or NUL: they would inject commands
        if not self._cleartext_allowed():
            self.abort()
            raise TlsDowngrade(
                f"not sending credentials to {settings.address} without TLS",
                hint="use protection 'starttls-mandatory' or 'tls'; only if you accept clear-text passwords, set "
                "allow_cleartext_auth",
            )
        caps = set(imap.capabilities)
        method = settings.auth
        offered = sorted(cap[5:] for cap in caps if cap.startswith("AUTH="))
        if method not in (AuthMethod.PLAIN, AuthMethod.LOGIN) and f"AUTH={method.value.upper()}" not in caps:
            self.abort()
            raise AuthenticationError(
                f"no common authentication mechanism: {settings.address} offers {' '.join(offered) or 'no AUTH='} "
                f"but the channel uses '{method}'",
                hint="set the channel's auth to a mechanism the server offers",
            )
        typ: str
        data: Any
        try:
            if method in (AuthMethod.PLAIN, AuthMethod.LOGIN):
                if "LOGINDISABLED" in caps and not (method is AuthMethod.PLAIN and "AUTH=PLAIN" in caps):
                    self.abort()
                    if self.tls:
                        raise AuthenticationError(
                            f"no common authentication mechanism: {settings.address} announces LOGINDISABLED and "
                            f"offers {' '.join(offered) or 'no AUTH='}, but the channel uses '{method}'",
                            hint="set the channel's auth to a mechanism the server offers, or let the server accept "
                            "PLAIN over TLS",
                        )
                    raise TlsDowngrade(
                        f"{settings.address} announces LOGINDISABLED: it does not accept a password here",
                        hint="use TLS (protection 'starttls-mandatory' or 'tls')",
                    )
                if "AUTH=PLAIN" in caps and (method is AuthMethod.PLAIN or not _ascii(credentials)):
                    payload = f"\0{credentials.user}\0{credentials.secret}".encode()  # SASL PLAIN is UTF-8
                    typ, data = imap.authenticate("PLAIN", lambda _: payload)
                elif not _ascii(credentials):
                    raise AuthenticationError(
                        f"{settings.address} offers only LOGIN, which cannot carry a non-ASCII user or password",
                        hint="use an ASCII password, or a server that offers AUTH=PLAIN",
                    )
                else:  # LOGIN with both arguments quoted (imaplib quotes only the password)
                    typ, data = imap._simple_command(
                        "LOGIN", imap._quote(credentials.user), imap._quote(credentials.secret)
                    )
                    if typ == "OK":
                        imap.state = "AUTH"
            elif method is AuthMethod.CRAM_MD5:
                typ, data = imap.login_cram_md5(credentials.user, credentials.secret)
            elif method is AuthMethod.XOAUTH2:
                token = f"user={credentials.user}\x01auth=Bearer {credentials.secret}\x01\x01".encode()
                typ, data = imap.authenticate("XOAUTH2", lambda _: token)
            else:
                token = f"n,a={credentials.user},\x01auth=Bearer {credentials.secret}\x01\x01".encode()
                typ, data = imap.authenticate("OAUTHBEARER", lambda _: token)
        except imaplib.IMAP4.error as exc:
            self.close()
            reason = scrub(str(exc), credentials.secret)
            raise AuthenticationError(
                f"{settings.address} refused the login of '{credentials.user}' ({method}): {reason}",
                hint="check user and password (or token) and the authentication methods the server offers",
            ) from None
        except (OSError, EOFError) as exc:
            raise self._dropped("during login", exc) from exc
        if typ != "OK":
            self.close()
            raise AuthenticationError(f"{settings.address} refused the login of '{credentials.user}': {_text(data)}")
        imap._get_capabilities()  # servers announce more (UIDPLUS, MOVE, IDLE) once logged in

    def _dropped(self, when: str, exc: BaseException) -> NetworkError:
        return connection_lost(self.settings, when, exc, implicit_tls_port=993)

    # -- mailbox operations -------------------------------------------------------------------------------------

    @property
    def imap(self) -> _Imap4:
        if self._imap is None:
            raise PostbridgeError("IMAP session is not connected")
        return self._imap

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.imap.capabilities)

    def _call(self, what: str, command: Callable[..., tuple[str, Any]], *args: Any) -> tuple[str, Any]:
        """Run an imaplib command; its exceptions (BAD answers, a dropped line) become ours."""
        try:
            return command(*args)
        except imaplib.IMAP4.abort as exc:
            raise self._dropped(f"during {what}", exc) from exc
        except imaplib.IMAP4.error as exc:
            raise MailProtocolError(f"{self.settings.address}: {what} failed: {exc}", reply=str(exc)) from exc
        except (OSError, EOFError) as exc:
            raise self._dropped(f"during {what}", exc) from exc

    def _cmd(self, what: str, command: Callable[..., tuple[str, Any]], *args: Any) -> Any:
        """Run a command that must answer OK; returns its data."""
        return self._check(*self._call(what, command, *args), what)

    def _check(self, typ: str, data: Any, what: str) -> Any:
        if typ != "OK":
            raise MailProtocolError(f"{self.settings.address}: {what} failed: {_text(data)}", reply=_text(data))
        return data

    def list_folders(self) -> list[str]:
        data = self._cmd("LIST", self.imap.list)
        folders = []
        for line in data:
            if isinstance(line, bytes):
                match = re.match(rb'\((?P<flags>[^)]*)\) (?P<sep>"[^"]*"|NIL) (?P<name>.+)$', line)
                if match:
                    name = match.group("name").decode("utf-8", "replace")
                    folders.append(name[1:-1] if name.startswith('"') else name)
        return folders

    def select(self, folder: str, *, readonly: bool = False) -> Mailbox:
        data = self._cmd(f"SELECT {folder}", lambda: self.imap.select(_quote(folder), readonly=readonly))
        responses: dict[str, list[Any]] = self.imap.untagged_responses
        uidvalidity = int(responses.get("UIDVALIDITY", [b"0"])[-1])
        uidnext_raw = responses.get("UIDNEXT", [None])[-1]
        return Mailbox(folder, uidvalidity, int(data[0] or 0), int(uidnext_raw) if uidnext_raw else None)

    def search(self, criteria: str = "UNSEEN") -> list[int]:
        data = self._cmd(f"UID SEARCH {criteria}", self.imap.uid, "SEARCH", criteria)
        return sorted(int(uid) for uid in (data[0] or b"").split())

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        """RFC822.SIZE of many messages in one round trip; UIDs that no longer exist are absent."""
        if not uids:
            return {}
        data = self._cmd("UID FETCH RFC822.SIZE", self.imap.uid, "FETCH", _uid_set(uids), "(UID RFC822.SIZE)")
        result: dict[int, int] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if isinstance(line, bytes):
                uid, size = re.search(rb"UID (\d+)", line), re.search(rb"RFC822\.SIZE (\d+)", line)
                if uid and size:
                    result[int(uid.group(1))] = int(size.group(1))
        return result

    def size(self, uid: int) -> int:
        return self.sizes([uid]).get(uid, -1)

    def fetch_many(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Whole messages without setting \\Seen (BODY.PEEK[]), many per round trip; missing UIDs are absent."""
        if not uids:
            return {}
        data = self._cmd("UID FETCH BODY.PEEK[]", self.imap.uid, "FETCH", _uid_set(uids), "(UID BODY.PEEK[])")
        result: dict[int, bytes] = {}
        waiting: bytes | None = None  # a literal whose UID comes after it (servers may order items freely)
        for item in data:
            if isinstance(item, tuple) and len(item) == 2:
                found = re.search(rb"UID (\d+)", item[0])
                if found:
                    result[int(found.group(1))] = bytes(item[1])
                else:
                    waiting = bytes(item[1])
            elif isinstance(item, bytes) and waiting is not None:
                found = re.search(rb"UID (\d+)", item)
                if found:
                    result[int(found.group(1))] = waiting
                waiting = None
        return result

    def fetch(self, uid: int) -> bytes | None:
        """The whole message without setting \\Seen (BODY.PEEK[]); None when the UID no longer exists."""
        return self.fetch_many([uid]).get(uid)

    def store_flags(self, uids: int | Sequence[int], flags: str) -> None:
        uid_set = _uid_set(uids)
        self._cmd(f"UID STORE {uid_set}", self.imap.uid, "STORE", uid_set, "+FLAGS.SILENT", f"({flags})")

    def expunge_uid(self, uids: int | Sequence[int]) -> None:
        """Remove exactly these messages: UID EXPUNGE (UIDPLUS). Never a bare EXPUNGE, which removes others' too."""
        if "UIDPLUS" not in self.capabilities:
            raise MailProtocolError(
                f"{self.settings.address} lacks UIDPLUS, so single messages cannot be expunged safely",
                hint="use post-processing 'mark-read' or 'keep' with this server (the message stays flagged \\Deleted)",
            )
        uid_set = _uid_set(uids)
        self._cmd(f"UID EXPUNGE {uid_set}", self.imap.uid, "EXPUNGE", uid_set)

    def move(self, uids: int | Sequence[int], folder: str) -> None:
        """UID MOVE where offered, else COPY + \\Deleted + UID EXPUNGE."""
        uid_set = _uid_set(uids)
        if "MOVE" in self.capabilities:
            self._cmd(f"UID MOVE {uid_set}", self.imap.uid, "MOVE", uid_set, _quote(folder))
            return
        self._cmd(f"UID COPY {uid_set}", self.imap.uid, "COPY", uid_set, _quote(folder))
        self.store_flags(uids, "\\Deleted")
        self.expunge_uid(uids)

    def create_folder(self, folder: str) -> None:
        typ, data = self._call(f"CREATE {folder}", self.imap.create, _quote(folder))
        if typ != "OK" and b"ALREADYEXISTS" not in b" ".join(x for x in data if isinstance(x, bytes)):
            self._check(typ, data, f"CREATE {folder}")

    def status(self, folder: str) -> dict[str, int]:
        data = self._cmd(f"STATUS {folder}", self.imap.status, _quote(folder), "(MESSAGES UNSEEN UIDVALIDITY)")
        found = re.findall(
            rb"(MESSAGES|UNSEEN|UIDVALIDITY) (\d+)", data[0] if data and isinstance(data[0], bytes) else b""
        )
        return {key.decode(): int(value) for key, value in found}

    def idle(self, timeout: float) -> bool:
        """IDLE up to ``timeout`` seconds (RFC 2177); True as soon as the server reports new mail (EXISTS/RECENT).

        Call it with a selected mailbox. The caller re-arms it; keep ``timeout`` under 29 minutes, after which servers
        may drop an idle client. Raises MailProtocolError when IDLE is not offered, NetworkError when the line drops.
        """
        imap = self.imap
        if "IDLE" not in self.capabilities:
            raise MailProtocolError(
                f"{self.settings.address} does not offer IDLE", hint="poll with an interval instead of IDLE"
            )
        tag = imap._new_tag()
        imap.tagged_commands.pop(tag, None)
        try:
            imap.send(tag + b" IDLE\r\n")
            if not imap._get_line().startswith(b"+"):
                raise MailProtocolError(f"{self.settings.address} refused IDLE")
            new_mail = False
            sock = imap.sock
            previous = sock.gettimeout()
            sock.settimeout(timeout)
            try:
                while True:
                    line = imap._get_line()
                    if re.match(rb"\* \d+ (EXISTS|RECENT)", line):
                        new_mail = True
                        break
            except TimeoutError:
                pass
            finally:
                sock.settimeout(previous)
            imap.send(b"DONE\r\n")
            while not (line := imap._get_line()).startswith(tag):
                if re.match(rb"\* \d+ (EXISTS|RECENT)", line):
                    new_mail = True
            return new_mail
        except (OSError, EOFError, imaplib.IMAP4.abort) as exc:
            raise self._dropped("during IDLE", exc) from exc

    def interrupt(self) -> None:
        """From another thread: wake a call blocked on the server (an IDLE) by shutting the connection down; the
        blocked call then raises NetworkError. Closing alone would not wake it."""
        imap = self._imap
        if imap is not None:
            with contextlib.suppress(OSError):
                imap.sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Hang up at once without another word (after a failed or tampered STARTTLS nothing more is said)."""
        imap, self._imap = self._imap, None
        if imap is not None:
            with contextlib.suppress(OSError, ValueError):
                imap.file.close()
            with contextlib.suppress(OSError):
                imap.sock.close()

    def close(self) -> None:
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError, EOFError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                imap.shutdown()
        finally:
            with contextlib.suppress(OSError):
                imap.sock.close()

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(settings: ChannelSettings) -> ImapSession:
    """Connect, secure and log in as the settings say. Raises a PostbridgeError naming cause and fix."""
    session = ImapSession(settings)
    try:
        return session.connect()
    except PostbridgeError:
        session.close()
        raise
    except (imaplib.IMAP4.error, OSError, EOFError) as exc:
        session.close()
        raise session._dropped("during set-up", exc) from exc


def _ascii(credentials: Credentials) -> bool:
    return (credentials.user + credentials.secret).isascii()


def _text(data: Any) -> str:
    if isinstance(data, list | tuple):
        return " ".join(_text(item) for item in data if item is not None)
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


def append(session: ImapSession, folder: str, raw: bytes, flags: str = "") -> None:
    """Store a message in a folder (used by tests, the lab and 'archive' targets)."""
    session._cmd(f"APPEND {folder}", session.imap.append, _quote(folder), f"({flags})" if flags else None, None, raw)
