"""The ``smtp`` flow target: forward each message, as it is, through an SMTP receiver channel.

Settings: ``channel`` (a table like ``postbridge mail send``'s ``[receiver]``: address, proxy, protection, auth,
user/password or credential, keystore, ... parsed by :func:`postbridge.mail.settings.channel_from_mapping`; the
keystore defaults to ``HOME/keystore``, a relative one is taken relative to the home folder), ``to`` (the envelope
recipients, required) and ``from`` (the envelope sender; default: the original one, i.e. the message's
Return-Path, else its From address). The message's bytes are sent unchanged behind one prepended header,
``X-Postbridge-Idempotency-Key``.

One session (:func:`postbridge.mail.smtp.open_smtp`) is kept open between deliveries and checked with NOOP before
each; credentials are resolved again for every new session (an OAuth2 access token expires), but not while
building: the build only checks that the credential exists (no network I/O).

Answers: the final reply (``250 2.0.0 Ok: queued as ...``) is the ref. A 4xx reply and network errors are
retryable, a 5xx reply permanent; so are an untrusted certificate, a refused login and bad settings. When the
server accepts some recipients and refuses others, the message counts as delivered (a retry would send it to the
accepted ones again) and the ref names the refused ones.

Must not: change the message beyond the one header, or put a password or token into a message, log or repr.
"""

from __future__ import annotations

import logging
import smtplib
import threading
from collections.abc import Callable, Mapping
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    PostbridgeError,
    TrustError,
)
from postbridge.mail.settings import ChannelSettings, CredentialResolver, Credentials, channel_from_mapping
from postbridge.mail.smtp import SmtpReplyError, SmtpSession, check_address, open_smtp
from postbridge.runtime.targets import (
    Delivery,
    DeliveryResult,
    TargetError,
    TargetTable,
    check_idempotency_key,
    resolve_path,
)
from postbridge.runtime.targets_json import header_text, parse
from postbridge.trust.credentials import CredentialStore, PasswordEntry

log = logging.getLogger("postbridge.runtime.targets")

KEYS = ("kind", "channel", "from", "to")
IDEMPOTENCY_HEADER = "X-Postbridge-Idempotency-Key"


class _WithoutNetwork:
    """Resolves a credential name for the build-time check without fetching an OAuth2 token: the entry's user and
    kind with a placeholder secret (a resolver that is not a credential store is asked as it is)."""

    def __init__(self, resolver: CredentialResolver) -> None:
        self.resolver = resolver

    def resolve(self, name: str) -> Credentials:
        if not isinstance(self.resolver, CredentialStore):
            return self.resolver.resolve(name)
        entry = self.resolver.get(name)
        return Credentials(entry.user, "(checked later)", token=not isinstance(entry, PasswordEntry))


class SmtpTarget:
    """Forwards deliveries through one receiver channel, reusing one SMTP session."""

    kind = "smtp"

    def __init__(
        self,
        channel: Mapping[str, Any],
        *,
        source: str,
        credentials: CredentialResolver | None,
        sender: str | None,
        recipients: list[str],
        describe: str,
    ) -> None:
        self._channel = dict(channel)  # may hold a password: kept out of repr
        self._source = source
        self._credentials = credentials
        self.sender = sender
        self.recipients = recipients
        self.describe = describe
        self._session: SmtpSession | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SmtpTarget({self.describe!r}, to={self.recipients!r})"

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Send the message to the recipients; raises TargetError (see the module docstring)."""
        key = check_idempotency_key(delivery.idempotency_key)
        message = f"{IDEMPOTENCY_HEADER}: {key}\r\n".encode("ascii") + delivery.raw
        sender = self.sender if self.sender is not None else original_sender(delivery.raw)
        with self._lock:
            try:
                session = self._open()
                refused, reply = _send(session, message, sender, self.recipients)
            except PostbridgeError as exc:
                if not isinstance(exc, SmtpReplyError):  # a refusal leaves the session usable; anything else not
                    self._drop()
                raise _target_error(exc) from exc
        ref = reply or f"accepted by {self.describe}"
        if refused:
            listed = "; ".join(f"{address} {code} {text}" for address, (code, text) in refused.items())
            log.warning("flow %s: %s refused %d recipient(s) of %s: %s", delivery.flow, self.describe,
                        len(refused), delivery.key, listed)  # fmt: skip
            ref = f"{ref} (refused: {listed})"
        return DeliveryResult(ref=ref[:500])

    def _open(self) -> SmtpSession:
        if self._session is not None:
            try:
                code, _ = self._session.smtp.noop()
                if code == 250:
                    return self._session
            except (PostbridgeError, smtplib.SMTPException, OSError):
                pass
            self._drop()
        settings = self.settings()
        self._session = open_smtp(settings)
        return self._session

    def settings(self) -> ChannelSettings:
        """The channel with freshly resolved credentials. Raises ConfigurationError and what the resolver raises."""
        return channel_from_mapping(self._channel, source=self._source, credentials=self._credentials)

    def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                session.quit()


def _send(
    session: SmtpSession, message: bytes, sender: str, recipients: list[str]
) -> tuple[dict[str, tuple[int, str]], str]:
    """:meth:`SmtpSession.send`, and the server's final reply to DATA, which smtplib's sendmail drops."""
    smtp = session.smtp
    replies: list[tuple[int, bytes]] = []
    data: Callable[[Any], tuple[int, bytes]] = smtp.data

    def keep_reply(body: Any) -> tuple[int, bytes]:
        reply = data(body)
        replies.append(reply)
        return reply

    smtp.data = keep_reply  # type: ignore[method-assign,assignment]  # smtplib has no other way to the reply
    try:
        refused = session.send(message, sender=sender, recipients=recipients)
    finally:
        vars(smtp).pop("data", None)
    reply = " ".join(f"{replies[-1][0]} {replies[-1][1].decode('utf-8', 'replace')}".split()) if replies else ""
    return refused, reply


def original_sender(raw: bytes) -> str:
    """The envelope sender the message came with: its Return-Path ("" for the null sender <>), else the From
    address. Raises TargetError (permanent) when it has neither."""
    headers = parse(raw, headers_only=True)
    return_path = header_text(headers, "return-path").strip()
    if return_path:
        return parseaddr(return_path)[1] if return_path != "<>" else ""
    sender = parseaddr(header_text(headers, "from"))[1]
    if not sender:
        raise TargetError(
            "the message has neither a Return-Path nor a From address to keep as the sender",
            retryable=False,
            hint="set 'from' in the smtp target to the envelope sender to use",
        )
    return sender


def _target_error(exc: PostbridgeError) -> TargetError:
    if isinstance(exc, TargetError):
        return exc
    if isinstance(exc, SmtpReplyError):
        codes = [code for code, _ in exc.refused.values()] or [exc.code]
        retryable = any(400 <= code < 500 for code in codes)
    else:
        # an untrusted certificate, a refused login, bad settings: permanent; network, timeouts, odd servers: retry
        retryable = not isinstance(exc, ConfigurationError | TrustError | AuthenticationError)
    return TargetError(exc.message, retryable=retryable, hint=exc.hint)


def build(table: Mapping[str, Any], *, source: str, home: Path, credentials: CredentialResolver | None) -> SmtpTarget:
    """The smtp target of ``table``; raises ConfigurationError (see :func:`targets.build_target`)."""
    reader = TargetTable(table, source, KEYS)
    channel = dict(reader.subtable("channel"))
    keystore = channel.get("keystore") or "keystore"
    if isinstance(keystore, str):
        channel["keystore"] = str(resolve_path(keystore, home))
    recipients = reader.strings("to")
    sender = reader.text("from", None)
    try:
        for recipient in recipients:
            check_address(recipient, "recipient")
        if sender is not None:
            check_address(sender, "sender", allow_empty=True)
    except ConfigurationError as exc:
        raise reader.error(exc.message, hint=exc.hint) from None
    channel_source = f"{source} channel"
    try:
        settings = channel_from_mapping(
            channel,
            source=channel_source,
            credentials=_WithoutNetwork(credentials) if credentials is not None else None,
        )
    except ConfigurationError as exc:
        if exc.message.startswith(source):
            raise
        raise reader.error(f"channel: {exc.message}", hint=exc.hint) from None
    return SmtpTarget(
        channel,
        source=channel_source,
        credentials=credentials,
        sender=sender,
        recipients=recipients,
        describe=f"smtp {settings.address}",
    )
