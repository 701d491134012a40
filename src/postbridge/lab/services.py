"""The lab's listeners: pymap's IMAP server, aiosmtpd's SMTP server and the POP3 driver, each on a STARTTLS port and an
implicit-TLS port, all over one :class:`Mailstore`.

Owns: binding the sockets (:class:`Listeners` remembers every server, connection and task so that closing the lab
ends them all), the glue pymap and aiosmtpd need (connection callback, SMTP handler and authenticator), and the
asyncio driver of the sans-I/O POP3 core (:func:`serve_pop3`).

Must not: decide addresses or ports (:mod:`postbridge.lab.server` does), or treat loopback peers as trusted: every
service refuses credentials until TLS is on, as a mail server on a network would.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import ssl
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException
from proxyprotocol.sock import SocketInfoLocal
from pymap.config import IMAPConfig
from pymap.imap import IMAPServer

from postbridge.errors import ConfigurationError
from postbridge.lab import pop3
from postbridge.lab.mailstore import Mailstore

log = logging.getLogger("postbridge.lab")

POP3_IDLE_TIMEOUT = 600.0  # RFC 1939: an inactivity autologout timer of at least 10 minutes
HANDSHAKE_TIMEOUT = 10.0

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listeners:
    """Every listening socket of the lab, with its open connections; :meth:`aclose` ends them all."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._protocols: weakref.WeakSet[SMTP] = weakref.WeakSet()

    async def serve_streams(self, handler: StreamHandler, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on ``port`` (0: a free one) with ``handler`` per connection; returns the bound port."""

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
                log.debug("lab connection ended: %s", exc)
            except asyncio.CancelledError:  # aclose(): end quietly (asyncio would log a cancelled callback)
                log.debug("lab connection closed with the lab")
            finally:
                if task is not None:
                    self._tasks.discard(task)
                writer.close()

        return await self._bind(
            port,
            lambda: asyncio.start_server(
                connected, self.host, port, ssl=tls, ssl_handshake_timeout=_handshake_timeout(tls)
            ),
        )

    async def serve_smtp(self, factory: Callable[[], SMTP], port: int, tls: ssl.SSLContext | None) -> int:
        def tracked() -> SMTP:
            protocol = factory()
            self._protocols.add(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        return await self._bind(
            port,
            lambda: loop.create_server(
                tracked, self.host, port, ssl=tls, ssl_handshake_timeout=_handshake_timeout(tls)
            ),
        )

    async def _bind(self, port: int, start: Callable[[], Awaitable[asyncio.Server]]) -> int:
        try:
            server = await start()
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            raise ConfigurationError(
                f"the lab cannot listen on {self.host} port {port}: "
                + ("the port is in use" if in_use else str(exc.strerror or exc)),
                hint="choose another --base-port, or leave it out to get free ports"
                if in_use
                else "use a loopback address this machine has (127.0.0.1, or ::1 where IPv6 is on)",
            ) from exc
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


def _handshake_timeout(tls: ssl.SSLContext | None) -> float | None:
    return HANDSHAKE_TIMEOUT if tls is not None else None  # asyncio refuses a timeout without TLS


# -- IMAP (pymap) ---------------------------------------------------------------------------------------------------


class _NetworkSocketInfo(SocketInfoLocal):
    """pymap lets loopback peers log in before STARTTLS; the lab stands in for a server elsewhere, so it does not."""

    __slots__ = ()

    @property
    def from_localhost(self) -> bool:
        return False


def imap_handler(store: Mailstore, config: IMAPConfig) -> StreamHandler:
    """pymap's IMAP server for one port: ``config`` says whether STARTTLS is offered (else the port is IMAPS)."""
    server = IMAPServer(store.login, config)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server(reader, writer, _NetworkSocketInfo(writer, unique_id=uuid.uuid4().bytes))

    return handle


# -- POP3 (our sans-I/O core) ---------------------------------------------------------------------------------------


def pop3_handler(store: Mailstore, tls: ssl.SSLContext, *, implicit_tls: bool) -> StreamHandler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_pop3(reader, writer, store, tls, implicit_tls=implicit_tls)

    return handle


async def serve_pop3(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    store: Mailstore,
    tls: ssl.SSLContext,
    *,
    implicit_tls: bool,
) -> None:
    """Drive one POP3 session: carry out what :class:`pop3.Pop3Server` asks for, feed it what arrives."""
    core = pop3.Pop3Server(secure=implicit_tls, tls_available=not implicit_tls)
    locked: str | None = None
    pending = deque(core.start())
    try:
        while True:
            while pending:
                command = pending.popleft()
                if isinstance(command, pop3.SendData):
                    writer.write(command.data)
                    await writer.drain()
                elif isinstance(command, pop3.StartTls):
                    await writer.start_tls(tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
                    pending.extend(core.tls_started())
                elif isinstance(command, pop3.CheckPassword):
                    if not store.check_password(command.user, command.password):
                        pending.extend(core.login_refused("[AUTH] invalid user name or password"))
                    elif not store.lock_maildrop(command.user):
                        pending.extend(core.login_refused("[IN-USE] another POP3 session holds this maildrop"))
                    else:
                        locked = command.user
                        pending.extend(core.login_accepted(await store.maildrop(command.user)))
                elif isinstance(command, pop3.DeleteMessages):
                    assert locked is not None  # the core asks for deletions only after a login
                    await store.delete(locked, command.keys)
                    pending.extend(core.deletions_applied())
                else:
                    return
            data = await asyncio.wait_for(reader.read(65536), POP3_IDLE_TIMEOUT)
            if not data:
                return
            pending.extend(core.receive_data(data))
    finally:
        if locked is not None:
            store.unlock_maildrop(locked)


# -- SMTP (aiosmtpd) ------------------------------------------------------------------------------------------------


class SmtpDelivery:
    """aiosmtpd handler: accepts mail from a logged-in user to lab users and puts it into their INBOX."""

    def __init__(self, store: Mailstore, server_name: str) -> None:
        self.store = store
        self.server_name = server_name

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator for AUTH PLAIN and LOGIN."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        ok = self.store.check_password(user, auth_data.password.decode("utf-8", "replace"))
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    async def handle_MAIL(  # aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required: log in with AUTH first"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 sender OK"

    async def handle_RCPT(  # aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.store.user_for_address(address) is None:
            known = ", ".join(user.address for user in self.store.users.values())
            return f"550 5.1.1 <{address}>: no such user here (the lab delivers to {known})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 recipient OK"

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an error in a session: a refused STARTTLS handshake is the client's verdict (say it
        in one line, as the other lab services do); anything else is a lab bug, logged with its traceback."""
        if isinstance(error, TLSSetupException):
            log.info("lab SMTP: the client ended the STARTTLS handshake: %s", error.__cause__ or error)
            return "421 4.7.0 TLS handshake failed"  # not sent: aiosmtpd closes the connection
        log.exception("lab SMTP: session failed")
        return "451 4.3.0 the lab mail server failed; see its log"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        trace = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"Received: from {session.host_name} ([{peer}]) by {self.server_name} (postbridge lab) with ESMTPSA; "
            f"{email.utils.format_datetime(datetime.now(UTC))}\r\n"
        ).encode()
        names = {user.name for address in envelope.rcpt_tos if (user := self.store.user_for_address(address))}
        for name in sorted(names):
            await self.store.deliver(name, trace + content)
        log.info("lab: delivered a message from <%s> to %s", envelope.mail_from, ", ".join(sorted(names)))
        return f"250 2.0.0 delivered to {len(names)} mailbox(es)"


class _DropLoginDataWarning(logging.Filter):
    """aiosmtpd 1.4 warns "Session.login_data is deprecated" at every successful AUTH, from its own code."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


_AIOSMTPD_FILTER = _DropLoginDataWarning()


def smtp_factory(delivery: SmtpDelivery, tls: ssl.SSLContext, *, implicit_tls: bool) -> Callable[[], SMTP]:
    """A protocol factory for one SMTP port: submission (STARTTLS required before anything else) or SMTPS."""
    loop = asyncio.get_running_loop()
    aiosmtpd_log = logging.getLogger("mail.log")
    if _AIOSMTPD_FILTER not in aiosmtpd_log.filters:
        aiosmtpd_log.addFilter(_AIOSMTPD_FILTER)

    def make() -> SMTP:
        return SMTP(
            delivery,
            hostname=delivery.server_name,
            ident="postbridge lab ESMTP",
            tls_context=None if implicit_tls else tls,
            require_starttls=not implicit_tls,
            auth_require_tls=not implicit_tls,  # on SMTPS the whole connection is TLS already
            authenticator=delivery.authenticate,
            enable_SMTPUTF8=True,
            loop=loop,
        )

    return make
