"""The lab's users and mailboxes: pymap's in-memory ("dict") backend, shared by IMAP, POP3 and SMTP delivery.

Owns: the lab users (:class:`LabUser`) and checking their passwords, the pymap ``Login`` and configurations of the
IMAP ports (one with STARTTLS, one for implicit TLS), delivering a message into a user's INBOX (SMTP), and the POP3
view of that same INBOX: the maildrop snapshot, its UIDLs (``<uidvalidity>.<uid>``, stable as long as the lab runs),
removing messages after a POP3 QUIT, and the one-POP3-session-per-user lock.

Must not: keep anything on disk (mail lives as long as the lab runs), or speak a protocol.
"""

from __future__ import annotations

import hmac
import re
import ssl
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from proxyprotocol.version import ProxyProtocolVersion
from pymap.backend.dict import Config, Login
from pymap.backend.dict.filter import FilterSet
from pymap.backend.dict.mailbox import MailboxData, MailboxSet
from pymap.concurrent import Subsystem
from pymap.parsing.message import AppendMessage
from pymap.parsing.specials import FetchRequirement
from pymap.user import UserMetadata
from pysasl.hashing import Cleartext

from postbridge.errors import ConfigurationError
from postbridge.lab.pop3 import MaildropMessage

_USER_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
_LINE_ENDS = re.compile(rb"\r?\n")


@dataclass(frozen=True)
class LabUser:
    """A lab mailbox owner; ``address`` is where SMTP delivers to (``name@domain``)."""

    name: str
    password: str = field(repr=False)
    address: str

    @classmethod
    def parse(cls, text: str, domain: str) -> LabUser:
        """``NAME:PASSWORD`` as typed on the command line; raises ConfigurationError quoting the name."""
        name, colon, password = text.partition(":")
        name = name.strip().lower()
        if not _USER_NAME.match(name) or not colon or not password:
            raise ConfigurationError(
                f"lab user '{name[:40]}' is not NAME:PASSWORD with a name of 1-32 lower-case letters, digits, "
                "'.', '_' or '-'",
                hint="give users like 'carol:carol-lab'",
            )
        return cls(name, password, f"{name}@{domain}")


def check_users(users: Sequence[LabUser]) -> None:
    """Raises ConfigurationError when there is no user or a name is given twice."""
    names = [user.name for user in users]
    if not users or len(set(names)) != len(names):
        raise ConfigurationError(
            f"the lab needs at least one user and no name twice (got: {', '.join(names) or 'none'})",
            hint="give each --user NAME:PASSWORD once",
        )


class _LabImapConfig(Config):
    """pymap's dict-backend configuration without its demo user and with a fixed greeting (no DNS look-up)."""

    @property
    def greeting(self) -> bytes:
        return b"postbridge lab IMAP ready"


class Mailstore:
    """Users and their mailboxes; create it inside the running event loop (pymap's locks belong to it)."""

    def __init__(self, users: Sequence[LabUser], *, tls_context: ssl.SSLContext) -> None:
        """Raises ConfigurationError as :func:`check_users` does."""
        check_users(users)
        self.users = {user.name: user for user in users}
        self.starttls_config = self._config(tls_context, tls_enabled=True)
        self.implicit_tls_config = self._config(tls_context, tls_enabled=False)
        self.login = Login(self.starttls_config)
        self._pop3_locked: set[str] = set()
        for user in users:
            self.login.users_dict[user.name] = UserMetadata(self.starttls_config, user.name, password=user.password)
            self.starttls_config.set_cache[user.name] = (MailboxSet(), FilterSet())

    @staticmethod
    def _config(tls_context: ssl.SSLContext, *, tls_enabled: bool) -> Config:
        return _LabImapConfig(
            Namespace(passlib_cfg=None, proxy_protocol=None),
            host=None,
            port=0,
            demo_data=False,
            demo_user="",
            demo_password="",
            ssl_context=tls_context,
            tls_enabled=tls_enabled,
            hash_context=Cleartext(),  # lab passwords are printed at start anyway
            cpu_subsystem=Subsystem.for_asyncio(),  # no thread pool to leave behind
            proxy_protocol=ProxyProtocolVersion.get(None),
            invalid_user_sleep=0.1,
        )

    # -- users ------------------------------------------------------------------------------------------------------

    def check_password(self, name: str, password: str) -> bool:
        user = self.users.get(name)
        expected = user.password if user else "\0"  # compare anyway: same time for unknown users
        return hmac.compare_digest(expected.encode(), password.encode()) and user is not None

    def user_for_address(self, address: str) -> LabUser | None:
        """The user that ``address`` (``name@domain``, case-insensitive) delivers to, if any."""
        wanted = address.strip().lower()
        return next((user for user in self.users.values() if user.address == wanted), None)

    # -- mail -------------------------------------------------------------------------------------------------------

    async def inbox(self, name: str) -> MailboxData:
        mailbox_set, _ = self.starttls_config.set_cache[name]
        return await mailbox_set.get_mailbox("INBOX")

    async def deliver(self, name: str, message: bytes) -> int:
        """Append ``message`` (line ends made CRLF) to the user's INBOX as a new, recent message; returns its UID.

        Raises ConfigurationError for an unknown user.
        """
        if name not in self.users:
            raise ConfigurationError(f"'{name}' is not a lab user", hint=f"lab users: {', '.join(self.users)}")
        data = b"\r\n".join(_LINE_ENDS.split(message))
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        inbox = await self.inbox(name)
        appended = await inbox.append(AppendMessage(data, when=datetime.now(UTC)), recent=True)
        return appended.uid

    async def maildrop(self, name: str) -> list[MaildropMessage]:
        """The INBOX as POP3 sees it at login: every message, in UID order."""
        inbox = await self.inbox(name)
        result = []
        async for message in inbox.messages():
            loaded = await message.load_content(FetchRequirement.CONTENT)
            result.append(MaildropMessage(message.uid, f"{inbox.uid_validity}.{message.uid}", bytes(loaded)))
        return sorted(result, key=lambda message: message.key)

    async def delete(self, name: str, uids: Sequence[int]) -> None:
        """Expunge these INBOX messages (IMAP sessions see them go at their next command)."""
        if uids:
            await (await self.inbox(name)).delete(uids)

    def lock_maildrop(self, name: str) -> bool:
        """Take the user's POP3 lock (RFC 1939: one session at a time); False when another session holds it."""
        if name in self._pop3_locked:
            return False
        self._pop3_locked.add(name)
        return True

    def unlock_maildrop(self, name: str) -> None:
        self._pop3_locked.discard(name)
