"""The lab's POP3 server as a sans-I/O state machine: RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595), USER/PASS,
AUTH PLAIN (RFC 5034), UIDL and TOP.

Owns: parsing command lines, the session states (authorization, waiting for a password check, transaction, update),
which command is allowed in which state (:data:`_ALLOWED`), the replies, the maildrop snapshot taken at login (message
numbers never change during a session) and the marks for deletion. It is fed bytes with :meth:`Pop3Server.receive_data`
and the results of what it asked for (:meth:`login_accepted`, :meth:`login_refused`, :meth:`tls_started`,
:meth:`deletions_applied`); each call returns the commands to carry out, in order.

Must not: touch sockets, TLS, clocks, the mailbox store or passwords beyond handing them on in
:class:`CheckPassword`; credentials are refused (never asked for) until the connection is secure.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MAX_LINE = 1024  # octets of one command line (RFC 2449 says 255; AUTH PLAIN with long passwords needs more)
_LINE_ENDS = re.compile(rb"\r?\n")


@dataclass(frozen=True)
class MaildropMessage:
    """One message of the maildrop: ``key`` names it in the store, ``unique_id`` is its UIDL (1-70 printable
    characters), ``data`` the message as sent, CRLF line ends (its length is the size LIST and STAT report)."""

    key: int
    unique_id: str
    data: bytes = field(repr=False)


# -- what the driver is asked to do ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendData:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Run the TLS handshake now, then call :meth:`Pop3Server.tls_started`."""


@dataclass(frozen=True)
class CheckPassword:
    """Check the password and lock the maildrop, then call ``login_accepted`` or ``login_refused``."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class DeleteMessages:
    """Remove these messages from the store, then call :meth:`Pop3Server.deletions_applied`."""

    keys: tuple[int, ...]


@dataclass(frozen=True)
class CloseConnection:
    pass


Command = SendData | StartTls | CheckPassword | DeleteMessages | CloseConnection


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    AUTH_CONTINUE = "auth-continue"  # AUTH PLAIN sent "+ ", waiting for the base64 line
    CHECKING = "checking"  # waiting for the driver's password check
    TRANSACTION = "transaction"
    UPDATE = "update"  # QUIT received, waiting for the deletions
    CLOSED = "closed"


_ALLOWED: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"CAPA", "STLS", "USER", "PASS", "AUTH", "QUIT"}),
    State.TRANSACTION: frozenset({"CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT"}),
}


class Pop3Server:
    """One POP3 session. ``secure`` is True on an implicit-TLS port; ``tls_available`` offers STLS otherwise."""

    def __init__(self, *, secure: bool, tls_available: bool, greeting: str = "postbridge lab POP3 ready") -> None:
        self.state = State.AUTHORIZATION
        self.secure = secure
        self.user: str | None = None
        self._tls_available = tls_available and not secure
        self._greeting = greeting
        self._buffer = b""
        self._maildrop: list[MaildropMessage] = []
        self._deleted: set[int] = set()  # message numbers, 1-based
        self._handlers: dict[str, Callable[[str], list[Command]]] = {
            "CAPA": self._capa, "STLS": self._stls, "USER": self._user, "PASS": self._pass, "AUTH": self._auth,
            "QUIT": self._quit, "STAT": self._stat, "LIST": self._list, "UIDL": self._uidl, "RETR": self._retr,
            "TOP": self._top, "DELE": self._dele, "RSET": self._rset, "NOOP": lambda _: [self._ok("")],
        }  # fmt: skip

    def start(self) -> list[Command]:
        return [self._ok(self._greeting)]

    # -- input ------------------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Command]:
        """Feed received bytes; commands are handled one line at a time until one needs the driver."""
        if self.state is State.CLOSED:
            return []
        self._buffer += data
        return self._process()

    def login_accepted(self, maildrop: Sequence[MaildropMessage]) -> list[Command]:
        self._expect(State.CHECKING, "login_accepted")
        self._maildrop = list(maildrop)
        self.state = State.TRANSACTION
        count, size = self._totals()
        return [self._ok(f"maildrop of {self.user} has {count} messages ({size} octets)"), *self._process()]

    def login_refused(self, reason: str) -> list[Command]:
        """``reason`` starts with a response code such as ``[AUTH]`` or ``[IN-USE]`` (RFC 2449, RFC 3206)."""
        self._expect(State.CHECKING, "login_refused")
        self.state, self.user = State.AUTHORIZATION, None
        return [self._err(reason), *self._process()]

    def tls_started(self) -> list[Command]:
        self.secure = True
        self._tls_available = False
        return self._process()

    def deletions_applied(self) -> list[Command]:
        self._expect(State.UPDATE, "deletions_applied")
        self.state = State.CLOSED
        return [self._ok("postbridge lab POP3 signing off"), CloseConnection()]

    def _expect(self, state: State, call: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{call}() called in state {self.state.value}, not {state.value}")

    def _process(self) -> list[Command]:
        out: list[Command] = []
        while self.state in (State.AUTHORIZATION, State.AUTH_CONTINUE, State.TRANSACTION):
            line, sep, rest = self._buffer.partition(b"\n")
            if len(line) > MAX_LINE:
                self.state = State.CLOSED
                return [*out, self._err(f"line longer than {MAX_LINE} octets"), CloseConnection()]
            if not sep:
                return out
            self._buffer = rest
            out += self._line(line.rstrip(b"\r"))
        return out

    def _line(self, raw: bytes) -> list[Command]:
        text = raw.decode("utf-8", "replace")
        if self.state is State.AUTH_CONTINUE:
            self.state = State.AUTHORIZATION
            return self._plain(text.strip())
        name, _, argument = text.strip().partition(" ")
        name = name.upper()
        handler = self._handlers.get(name)
        if handler is None:
            return [self._err(f"unknown command '{name[:20]}'")]
        if name not in _ALLOWED[self.state]:
            return [self._err(f"{name} is not allowed in the {self.state.value} state")]
        return handler(argument.strip())

    # -- authorization ----------------------------------------------------------------------------------------------

    def _capa(self, _: str) -> list[Command]:
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION postbridge-lab"]
        if self._tls_available:
            lines.append("STLS")
        if self.secure and self.state is State.AUTHORIZATION:
            lines += ["USER", "SASL PLAIN"]
        return [self._multiline("capability list follows", [line.encode() for line in lines])]

    def _stls(self, _: str) -> list[Command]:
        if not self._tls_available:
            return [self._err("TLS is already active" if self.secure else "STLS is not offered here")]
        self._buffer = b""  # RFC 2595: nothing sent before the handshake may count after it
        return [self._ok("begin TLS negotiation"), StartTls()]

    def _insecure(self) -> list[Command] | None:
        if self.secure:
            return None
        return [self._err("[AUTH] credentials are accepted only over TLS: use STLS first (or the POP3S port)")]

    def _user(self, argument: str) -> list[Command]:
        if refused := self._insecure():
            return refused
        if not argument:
            return [self._err("USER needs a name")]
        self.user = argument
        return [self._ok(f"send the password of {argument}")]

    def _pass(self, argument: str) -> list[Command]:
        if refused := self._insecure():
            return refused
        if self.user is None:
            return [self._err("send USER first")]
        self.state = State.CHECKING
        return [CheckPassword(self.user, argument)]

    def _auth(self, argument: str) -> list[Command]:
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            return [self._multiline("SASL mechanisms follow", [b"PLAIN"] if self.secure else [])]
        if refused := self._insecure():
            return refused
        if mechanism.upper() != "PLAIN":
            return [self._err(f"[AUTH] mechanism '{mechanism[:20]}' is not supported (only PLAIN)")]
        if not initial:
            self.state = State.AUTH_CONTINUE
            return [SendData(b"+ \r\n")]
        return self._plain(initial.strip())

    def _plain(self, encoded: str) -> list[Command]:
        if encoded == "*":
            return [self._err("AUTH cancelled")]
        try:
            authzid, user, password = base64.b64decode(encoded or "", validate=True).decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return [self._err("[AUTH] malformed PLAIN response")]
        if authzid and authzid != user:
            return [self._err("[AUTH] acting as another user is not allowed")]
        self.user, self.state = user, State.CHECKING
        return [CheckPassword(user, password)]

    def _quit(self, _: str) -> list[Command]:
        if self.state is State.AUTHORIZATION:
            self.state = State.CLOSED
            return [self._ok("postbridge lab POP3 signing off"), CloseConnection()]
        self.state = State.UPDATE
        keys = tuple(self._maildrop[number - 1].key for number in sorted(self._deleted))
        return [DeleteMessages(keys)]

    # -- transaction ------------------------------------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        kept = [m for number, m in enumerate(self._maildrop, 1) if number not in self._deleted]
        return len(kept), sum(len(m.data) for m in kept)

    def _message(self, argument: str) -> tuple[int, MaildropMessage] | SendData:
        word = argument.split(" ")[0]
        if not word.isdigit() or not 1 <= int(word) <= len(self._maildrop):
            return self._err(f"no such message '{word[:20]}'")
        number = int(word)
        if number in self._deleted:
            return self._err(f"message {number} is already deleted")
        return number, self._maildrop[number - 1]

    def _listing(self, argument: str, value: Callable[[MaildropMessage], str], what: str) -> list[Command]:
        if argument:
            found = self._message(argument)
            if isinstance(found, SendData):
                return [found]
            return [self._ok(f"{found[0]} {value(found[1])}")]
        lines = [
            f"{number} {value(message)}".encode()
            for number, message in enumerate(self._maildrop, 1)
            if number not in self._deleted
        ]
        return [self._multiline(what, lines)]

    def _stat(self, _: str) -> list[Command]:
        count, size = self._totals()
        return [self._ok(f"{count} {size}")]

    def _list(self, argument: str) -> list[Command]:
        return self._listing(argument, lambda message: str(len(message.data)), "scan listing follows")

    def _uidl(self, argument: str) -> list[Command]:
        return self._listing(argument, lambda message: message.unique_id, "unique-id listing follows")

    def _retr(self, argument: str) -> list[Command]:
        found = self._message(argument)
        if isinstance(found, SendData):
            return [found]
        return [self._multiline(f"{len(found[1].data)} octets", _lines(found[1].data))]

    def _top(self, argument: str) -> list[Command]:
        words = argument.split(" ")
        found = self._message(argument)
        if isinstance(found, SendData):
            return [found]
        if len(words) != 2 or not words[1].isdigit():
            return [self._err("TOP needs a message number and a number of lines")]
        header, separator, body = found[1].data.partition(b"\r\n\r\n")
        lines = _lines(header) + ([b""] if separator else [])
        lines += _lines(body)[: int(words[1])]
        return [self._multiline("top of message follows", lines)]

    def _dele(self, argument: str) -> list[Command]:
        found = self._message(argument)
        if isinstance(found, SendData):
            return [found]
        self._deleted.add(found[0])
        return [self._ok(f"message {found[0]} marked for deletion")]

    def _rset(self, _: str) -> list[Command]:
        self._deleted.clear()
        count, size = self._totals()
        return [self._ok(f"maildrop has {count} messages ({size} octets)")]

    # -- replies ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _ok(text: str) -> SendData:
        return SendData(f"+OK {text}".rstrip().encode() + b"\r\n")

    @staticmethod
    def _err(text: str) -> SendData:
        return SendData(f"-ERR {text}".encode() + b"\r\n")

    @staticmethod
    def _multiline(text: str, lines: Sequence[bytes]) -> SendData:
        stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
        return SendData(b"".join(line + b"\r\n" for line in [f"+OK {text}".encode(), *stuffed, b"."]))


def _lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` without their ends; a final line end does not start another line."""
    lines = _LINE_ENDS.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    return lines
