"""SMTP client of the mail adapter: the standard ``smtplib`` with the STARTTLS and AUTH pitfalls closed.

Like :mod:`postbridge.mail.imap` (the pattern), on a socket that :mod:`transport` opened (direct or through the
hub's SOCKS5 proxy), with these rules:

* every TLS handshake verifies chain and host name (:func:`transport.wrap`); ``smtplib.starttls()`` is never used;
* ``starttls-mandatory`` fails closed: no STARTTLS in the EHLO answer, or any reply but 220 to STARTTLS, ends the
  session; bytes that arrived after the 220 but before the handshake abort it (response injection);
* the EHLO answer received before TLS is discarded and EHLO is sent again over TLS (RFC 3207);
* credentials leave only over TLS, through the connector's ``tcp-tls`` mapping (protection ``off``), or with
  ``allow_cleartext_auth``; AUTH is our own SASL loop (:mod:`common`), so UTF-8 passwords and XOAUTH2 errors work;
* a message given as bytes gets CRLF line ends before smtplib dot-stuffs it, so no bare LF ever reaches the
  server (no "SMTP smuggling" of a second message through an ambiguous end of data).

One :class:`SmtpSession` sends any number of messages (each :meth:`SmtpSession.send` is one transaction; a
refusal leaves the session usable). :func:`build_message` makes a message from a receiver channel's fields and
refuses header injection (it lives in :mod:`compose`). :meth:`SmtpSession.check_envelope` asks whether the server
would take a mail from a sender to recipients without sending one (MAIL FROM, RCPT TO, then RSET, never DATA);
:func:`envelope_hint` explains a refusal. The session is blocking. No password, token or message body is ever
logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType

from postbridge.addresses import valid_host
from postbridge.errors import AuthenticationError, ConfigurationError, NetworkError, PostbridgeError
from postbridge.mail import transport
from postbridge.mail.common import (
    AT_GREETING,
    LoginMechanism,
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
from postbridge.mail.compose import Attachment, OutgoingMail, build_message, check_address
from postbridge.mail.settings import AuthMethod, ChannelSettings, Credentials, Protection

__all__ = [
    "Attachment",
    "EnvelopeReply",
    "OutgoingMail",
    "SmtpReplyError",
    "SmtpSession",
    "build_message",
    "check_address",
    "envelope_hint",
    "open_smtp",
]

log = logging.getLogger("postbridge.mail.smtp")

SMTPS_PORT = 465
MAX_CHALLENGES = 5
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_ENHANCED_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")  # RFC 3463, at the start of the reply text


class SmtpReplyError(MailProtocolError):
    """The SMTP server refused something; ``code`` and ``reply`` are its answer.

    ``refused`` maps each refused recipient to its (code, text) when recipients were refused.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int,
        reply: str,
        refused: Mapping[str, tuple[int, str]] | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(message, reply=reply, hint=hint or _reply_hint(code, reply))
        self.code = code
        self.refused = dict(refused or {})


def _reply_hint(code: int, reply: str) -> str:
    words = reply.lower()
    if "relay access denied" in words:
        return "the server does not relay to that domain: send only to domains it is responsible for, or log in"
    if code == 530 or "access denied" in words or "authentication required" in words:
        return "the server accepts mail only after a login: set auth and credentials (with TLS)"
    if code == 552:
        return "the message is larger than the server accepts"
    if 400 <= code < 500:
        return "a temporary refusal: send again later"
    if code in (550, 553):
        return "the server refused the address: check its spelling and that the mailbox exists"
    return ""


@dataclass(frozen=True)
class EnvelopeReply:
    """The server's answer to one envelope address: MAIL FROM for the ``sender``, RCPT TO for a ``recipient``."""

    address: str
    role: str  # "sender" | "recipient"
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        """True for a 2xx reply: the server would take mail from (or to) this address."""
        return 200 <= self.code < 300


def envelope_hint(reply: EnvelopeReply) -> str:
    """What to do about a refused sender or recipient, in one sentence; "" for an accepted address."""
    if reply.accepted:
        return ""
    words = reply.text.lower()
    found = _ENHANCED_STATUS.match(reply.text)
    status = found.group(1) if found else ""
    if "relay" in words:
        return (
            "the server relays only for authenticated users: use --check-auth with the channel's credentials, "
            "or a recipient in the server's own domain"
        )
    if "starttls" in words:
        return "the server wants TLS first: use protection 'starttls-mandatory' (or 'tls' on port 465)"
    if reply.code == 530 or "authentication required" in words:
        return "the server takes mail only after a login: use --check-auth with the channel's credentials"
    if reply.role == "sender" and reply.code in (501, 550, 553):
        return "the server refuses this sender: use an address the login may send as"
    if status == "4.5.3" or "too many recipients" in words:
        return "too many recipients in one transaction: check the others in a second run"
    if reply.code == 452 or status in ("4.2.2", "5.2.2") or "quota" in words:
        return "the mailbox or the server is full (over quota): try again later"
    if status == "5.1.1" or (reply.code in (550, 551, 553) and ("unknown" in words or "no such" in words)):
        return "no such mailbox at the server: check the address"
    if "access denied" in words:
        return "the server takes mail only after a login: use --check-auth with the channel's credentials"
    return _reply_hint(reply.code, reply.text)


class _Smtp(smtplib.SMTP):
    """smtplib on a socket we opened (TLS already done for SMTPS)."""

    def __init__(self, sock: socket.socket, *, local_hostname: str, timeout: float) -> None:
        self._prepared = sock
        super().__init__(local_hostname=local_hostname, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._prepared


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _default_local_name(sock: socket.socket) -> str:
    """EHLO name without DNS: the host name when it is a full one, else the address literal of our end."""
    name = socket.gethostname()
    if "." in name and valid_host(name):
        return name
    try:
        host = str(sock.getsockname()[0])
    except OSError:
        host = "127.0.0.1"
    return f"[IPv6:{host}]" if ":" in host else f"[{host}]"


def _check_envelope(sender: str, recipients: Sequence[str]) -> None:
    """Raises ConfigurationError for a bad sender, no recipients, or a bad recipient."""
    check_address(sender, "sender", allow_empty=True)  # "" is the null sender <> of notifications
    if isinstance(recipients, str) or not recipients:
        raise ConfigurationError(f"no recipients (got {recipients!r})", hint="give a list of addresses")
    for recipient in recipients:
        check_address(recipient, "recipient")


class SmtpSession:
    """One SMTP session (greeted, secured, logged in) that sends many messages. Use :func:`open_smtp`."""

    def __init__(self, settings: ChannelSettings, *, local_hostname: str | None = None) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self.tls = False
        self.tls_version: str | None = None
        self.greeting = ""
        self.features_before_tls: dict[str, str] = {}
        self.tls_context: ssl.SSLContext | None = None  # None: transport.tls_context (the connection test swaps it)
        self._smtp: _Smtp | None = None

    # -- connecting ---------------------------------------------------------------------------------------------

    def connect(self) -> SmtpSession:
        settings = self.settings
        sock = transport.open_channel(settings)
        if settings.protection is Protection.TLS:
            self._mark_tls(sock)
        name = self.local_hostname or _default_local_name(sock)
        smtp = self._smtp = _Smtp(sock, local_hostname=name, timeout=settings.timeout)
        try:
            code, text = smtp.connect(settings.server_name, settings.address.port)
        except smtplib.SMTPServerDisconnected as exc:
            raise self._lost(AT_GREETING, exc) from exc
        if code == -1:
            self.close()
            raise MailProtocolError(
                f"{settings.address} does not speak SMTP (greeting {_text(text)[:80]!r})",
                hint="check the address: this port belongs to another service",
            )
        if code != 220:
            self.close()
            raise SmtpReplyError(
                f"{settings.address} refused the session: {code} {_text(text)}", code=code, reply=_text(text)
            )
        self.greeting = _text(text)
        self._hello(smtp)
        self.features_before_tls = dict(smtp.esmtp_features)
        if settings.protection in (Protection.STARTTLS_MANDATORY, Protection.STARTTLS_OPTIONAL):
            self._starttls(smtp)
        if settings.auth is not AuthMethod.NONE:
            self._login(smtp)
        return self

    def _mark_tls(self, sock: socket.socket) -> None:
        self.tls = True
        if isinstance(sock, ssl.SSLSocket):
            self.tls_version = sock.version()

    def _hello(self, smtp: _Smtp) -> None:
        code, text = smtp.ehlo()
        if code != 250:
            code, text = smtp.helo()
            if not 200 <= code < 300:
                self.close()
                raise SmtpReplyError(
                    f"{self.settings.address} refused EHLO and HELO {smtp.local_hostname}: {code} {_text(text)}",
                    code=code,
                    reply=_text(text),
                    hint="pass local_hostname with a name the server accepts",
                )

    def _starttls(self, smtp: _Smtp) -> None:
        settings = self.settings
        if not smtp.has_extn("starttls"):
            if settings.protection is Protection.STARTTLS_MANDATORY:
                self.close()
                raise TlsDowngrade(
                    f"{settings.address} does not offer STARTTLS (EHLO: {' '.join(self.features_before_tls)})",
                    hint="use protection 'tls' for an implicit-TLS port (465); with a 'tcp-tls' mapping use 'off'; "
                    "if this server really has no TLS, something may be stripping it",
                )
            log.warning("%s offers no STARTTLS; going on without TLS (starttls-optional)", settings.address)
            return
        code, text = smtp.docmd("STARTTLS")
        if code != 220:
            self.close()
            raise TlsDowngrade(
                f"{settings.address} answered STARTTLS with {code} {_text(text)}",
                reply=_text(text),
                hint="the server's TLS set-up is broken (or an attacker answered for it): not going on in clear",
            )
        assert smtp.sock is not None and smtp.file is not None  # getreply() made the reader
        smtp.sock = transport.secure_after_starttls(
            settings, smtp.file, smtp.sock, "STARTTLS", self.close, self.tls_context
        )
        self.greeting = ""  # the clear-text greeting is pre-TLS state: discarded with the rest
        smtp.file = None
        self._mark_tls(smtp.sock)
        # RFC 3207: forget everything learnt before TLS, then EHLO again
        smtp.helo_resp = smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        self._hello(smtp)

    def _login(self, smtp: _Smtp) -> None:
        settings = self.settings
        credentials = check_credentials(settings)
        if not cleartext_allowed(settings, tls=self.tls):
            self.close()
            raise TlsDowngrade(
                f"not sending credentials to {settings.address} without TLS",
                hint="use protection 'starttls-mandatory' or 'tls'; only if you accept clear-text passwords, set "
                "allow_cleartext_auth",
            )
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        if not offered:
            self.close()
            raise AuthenticationError(
                f"{settings.address} offers no AUTH, but the channel has auth '{settings.auth}'",
                hint="servers such as Postfix offer AUTH only over TLS (use 'starttls-mandatory' or 'tls'); "
                "for a relay that needs no login set auth 'none'",
            )
        mechanism = self._choose(offered, credentials)
        if mechanism is None:
            self.close()
            raise AuthenticationError(
                f"{settings.address} does not offer {settings.auth} (it offers {' '.join(offered)})",
                hint="choose an authentication method the server offers",
            )
        code, text = self._authenticate(smtp, mechanism)
        if code != 235:  # not smtplib's "503 = already authenticated": Postfix says 503 when AUTH is off
            self.close()
            raise AuthenticationError(
                f"{settings.address} refused the login of '{credentials.user}' ({mechanism.name}): "
                f"{code} {scrub(text, credentials.secret)}",
                hint="check user and password (or token)",
            )
        log.info("SMTP %s: logged in as %r (%s, %s)", settings.address, credentials.user, mechanism.name,
                 self.tls_version or "no TLS")  # fmt: skip

    def _choose(self, offered: list[str], credentials: Credentials) -> SaslMechanism | None:
        settings = self.settings
        if settings.auth in (AuthMethod.PLAIN, AuthMethod.LOGIN):
            # both send the password itself; take the one asked for, else the other one
            order = ["PLAIN", "LOGIN"] if settings.auth is AuthMethod.PLAIN else ["LOGIN", "PLAIN"]
            for name in order:
                if name in offered:
                    if name == "PLAIN":
                        return PlainMechanism(credentials.user, credentials.secret)
                    return LoginMechanism(credentials.user, credentials.secret)
            return None
        mechanism = sasl_mechanism(settings.auth, credentials)
        return mechanism if mechanism.name in offered else None

    def _authenticate(self, smtp: _Smtp, mechanism: SaslMechanism) -> tuple[int, str]:
        """RFC 4954 AUTH with the initial response where the mechanism has one; returns the final reply."""
        initial = mechanism.initial_response()
        if initial is None:
            code, text = smtp.docmd("AUTH", mechanism.name)
        else:
            code, text = smtp.docmd("AUTH", f"{mechanism.name} {base64.b64encode(initial).decode() or '='}")
        for _ in range(MAX_CHALLENGES):
            if code != 334:
                return code, _text(text)
            try:
                challenge = base64.b64decode(text, validate=True)
            except binascii.Error:
                raise MailProtocolError(f"{self.settings.address} sent a SASL challenge that is not base64") from None
            code, text = smtp.docmd(base64.b64encode(mechanism.respond(challenge)).decode())
        raise MailProtocolError(f"{self.settings.address} sent more than {MAX_CHALLENGES} SASL challenges")

    def _lost(self, when: str, exc: BaseException) -> NetworkError:
        self.close()
        if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, TimeoutError):
            exc = exc.__context__  # smtplib turns a timeout into "Connection unexpectedly closed"
        return connection_lost(self.settings, when, exc, implicit_tls_port=SMTPS_PORT)

    # -- sending ------------------------------------------------------------------------------------------------

    @property
    def smtp(self) -> _Smtp:
        if self._smtp is None or self._smtp.sock is None:
            raise PostbridgeError("SMTP session is not connected", hint="open a new one with open_smtp()")
        return self._smtp

    @property
    def features(self) -> dict[str, str]:
        """The EHLO extensions (lower-case names) the server announced; after STARTTLS, the post-TLS ones."""
        return dict(self.smtp.esmtp_features)

    def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> dict[str, tuple[int, str]]:
        """Send one message (one SMTP transaction) to ``recipients`` (the envelope: Bcc goes here, not in headers).

        Returns the recipients the server refused (address -> (code, text)) while it accepted the others.
        Raises SmtpReplyError (sender, all recipients or the data refused; the session stays usable unless the
        server closed it), MailProtocolError, ConfigurationError for a bad address, NetworkError when the
        connection is lost (the message may or may not have been accepted).
        """
        _check_envelope(sender, recipients)
        smtp = self.smtp
        address = self.settings.address
        try:
            if isinstance(message, bytes):
                refused = smtp.sendmail(sender, list(recipients), _LINE_ENDS.sub(b"\r\n", message))
            else:
                refused = smtp.send_message(message, from_addr=sender, to_addrs=list(recipients))
        except smtplib.SMTPRecipientsRefused as exc:
            every = {str(rcpt): (code, _text(text)) for rcpt, (code, text) in exc.recipients.items()}
            first = next(iter(every.items()))
            raise SmtpReplyError(
                f"{address} refused every recipient, first {first[0]}: {first[1][0]} {first[1][1]}",
                code=first[1][0],
                reply=first[1][1],
                refused=every,
            ) from None
        except smtplib.SMTPSenderRefused as exc:
            reply = _text(exc.smtp_error)
            raise SmtpReplyError(
                f"{address} refused the sender {sender!r}: {exc.smtp_code} {reply}", code=exc.smtp_code, reply=reply
            ) from None
        except smtplib.SMTPDataError as exc:
            reply = _text(exc.smtp_error)
            raise SmtpReplyError(
                f"{address} refused the message: {exc.smtp_code} {reply}", code=exc.smtp_code, reply=reply
            ) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise self._lost("while sending (the message may not have been accepted)", exc) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise MailProtocolError(
                f"{address} cannot take this message: {exc}",
                hint="the addresses need SMTPUTF8, which the server lacks: use ASCII addresses",
            ) from None
        except smtplib.SMTPResponseException as exc:
            reply = _text(exc.smtp_error)
            raise SmtpReplyError(
                f"{address} answered {exc.smtp_code} {reply}", code=exc.smtp_code, reply=reply
            ) from None
        except OSError as exc:
            raise self._lost("while sending (the message may not have been accepted)", exc) from exc
        finally:
            if self._smtp is not None and self._smtp.sock is None:  # smtplib closed it (421 or lost)
                self._smtp = None
        log.info("SMTP %s: message accepted for %d of %d recipient(s)", address, len(recipients) - len(refused),
                 len(recipients))  # fmt: skip
        return {str(rcpt): (code, _text(text)) for rcpt, (code, text) in refused.items()}

    def send_mail(self, mail: OutgoingMail) -> dict[str, tuple[int, str]]:
        """Send what :func:`build_message` made, to its envelope (To, Cc and Bcc). Raises as :meth:`send`."""
        return self.send(mail.message, sender=mail.sender, recipients=mail.recipients)

    # -- checking an envelope without sending -------------------------------------------------------------------

    def check_envelope(self, sender: str, recipients: Sequence[str]) -> list[EnvelopeReply]:
        """Ask whether the server would take a mail from ``sender`` to ``recipients``, without sending one.

        MAIL FROM, RCPT TO per recipient, then RSET; never DATA, so nothing can be delivered. Returns the sender's
        reply followed by one per recipient, or only the sender's reply when it was refused (no recipient is
        tried then). A refusal is a reply, not an error: see :attr:`EnvelopeReply.accepted` and
        :func:`envelope_hint`. A server that hangs up instead of answering RSET has no transaction left, so the
        replies stand (and the session is closed).
        Raises ConfigurationError (an empty recipient list, an empty recipient, a line break or control character
        in an address), SmtpReplyError (421: the server closed the session; a refused RSET), MailProtocolError
        (a reply that is not SMTP; non-ASCII addresses for a server without SMTPUTF8), NetworkError when the
        connection is lost or falls silent before every reply is in.
        """
        _check_envelope(sender, recipients)
        smtp = self.smtp
        options = self._envelope_options(smtp, sender, recipients)
        replies = [self._envelope_command(smtp, "sender", sender, options)]
        if replies[0].accepted:
            replies += [self._envelope_command(smtp, "recipient", recipient, ()) for recipient in recipients]
        self._reset_envelope(smtp)
        accepted = sum(reply.accepted for reply in replies[1:])
        log.info("SMTP %s: envelope check (no DATA): sender %d, %d of %d recipient(s) accepted", self.settings.address,
                 replies[0].code, accepted, len(recipients))  # fmt: skip
        return replies

    def _envelope_options(self, smtp: _Smtp, sender: str, recipients: Sequence[str]) -> tuple[str, ...]:
        """The MAIL FROM parameters :meth:`send` would use for these addresses: SMTPUTF8 for non-ASCII ones."""
        if all(address.isascii() for address in (sender, *recipients)):
            return ()
        if not smtp.has_extn("smtputf8"):
            raise MailProtocolError(
                f"{self.settings.address} does not offer SMTPUTF8, which the non-ASCII address(es) need",
                hint="the addresses need SMTPUTF8, which the server lacks: use ASCII addresses",
            )
        return ("SMTPUTF8", "BODY=8BITMIME")  # as smtplib.send_message() does for an international envelope

    def _envelope_command(self, smtp: _Smtp, role: str, address: str, options: Sequence[str]) -> EnvelopeReply:
        """MAIL FROM (``role`` "sender") or RCPT TO; a refusal is returned, a 421 or a lost connection raised."""
        command = "MAIL FROM" if role == "sender" else "RCPT TO"
        try:
            code, raw = smtp.mail(address, options) if role == "sender" else smtp.rcpt(address, options)
        except smtplib.SMTPResponseException as exc:  # smtplib closed the connection (a reply line too long)
            self.close()
            reply = _text(exc.smtp_error)
            raise SmtpReplyError(
                f"{self.settings.address} answered {command} with {exc.smtp_code} {reply}",
                code=exc.smtp_code,
                reply=reply,
            ) from None
        except OSError as exc:  # smtplib.SMTPServerDisconnected is one
            raise self._lost(f"after {command} (no mail was sent)", exc) from exc
        text = _text(raw)
        if code == 421:
            self.close()
            raise SmtpReplyError(
                f"{self.settings.address} closed the session at {command}: {code} {text}", code=code, reply=text
            )
        if code // 100 not in (2, 4, 5):
            self.close()
            raise MailProtocolError(
                f"{self.settings.address} answered {command} with {code} {text[:80]!r}, which is no SMTP reply to it",
                reply=text,
                hint="check the address: this port may belong to another service",
            )
        return EnvelopeReply(address=address, role=role, code=code, text=text)

    def _reset_envelope(self, smtp: _Smtp) -> None:
        """RSET, so the check leaves no transaction open; a server that already hung up has none left."""
        address = self.settings.address
        try:
            code, raw = smtp.rset()
        except OSError as exc:  # smtplib.SMTPServerDisconnected is one
            if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
                raise self._lost("while waiting for the answer to RSET (no mail was sent)", exc) from exc
            log.info("SMTP %s: the server closed the connection before RSET (no mail was sent)", address)
            self.close()
            return
        if code == 421:  # closing the session: nothing left open
            self.close()
            return
        if not 200 <= code < 300:
            self.close()
            text = _text(raw)
            raise SmtpReplyError(
                f"{address} answered RSET with {code} {text}",
                code=code,
                reply=text,
                hint="the server may still hold the transaction open; the session was closed (no mail was sent)",
            )

    def quit(self) -> None:
        """QUIT and close; never raises (every sent message was already accepted or refused)."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.sock is not None:
                smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                smtp.close()

    def close(self) -> None:
        """Close without QUIT."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            with contextlib.suppress(OSError):
                smtp.close()

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.quit()


def open_smtp(settings: ChannelSettings, *, local_hostname: str | None = None) -> SmtpSession:
    """Connect, greet, secure and log in as the settings say. Raises a PostbridgeError naming cause and fix.

    ``local_hostname`` is the EHLO name (default: this host's full name, else our address literal).
    """
    session = SmtpSession(settings, local_hostname=local_hostname)
    try:
        return session.connect()
    except PostbridgeError:
        session.close()
        raise
    except smtplib.SMTPResponseException as exc:
        session.close()
        reply = _text(exc.smtp_error)
        raise SmtpReplyError(
            f"{settings.address} answered {exc.smtp_code} {reply} during set-up", code=exc.smtp_code, reply=reply
        ) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise session._lost("during set-up", exc) from exc
