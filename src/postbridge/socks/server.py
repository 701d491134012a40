"""Sans-I/O SOCKS5 server state machine of the cloud hub (RFC 1928 CONNECT, RFC 1929 and SAP method 0x80).

Owns the SOCKS5 conversation with one cloud application: method choice, authentication sub-negotiation, the
CONNECT request and its reply, and the hand-over to relaying. Bytes go in through :meth:`receive_data`,
events come out, and bytes to send are collected by :meth:`data_to_send`. Every state transition is in
``_TRANSITIONS``, keyed by ``(state, event type)``; an illegal pair raises :class:`SocksProtocolError` naming
both.

Must not touch sockets, asyncio, clocks, DNS, credentials or routing: the listener decides (``accept_auth``,
``reject_auth``, ``reply``) and this class only speaks the protocol.

Pipelining: ``receive_data`` returns at most one event that needs a decision, always as the last one, and
keeps the bytes behind it. After every decision call ``receive_data(b"")`` to get the events of those buffered
bytes (a request sent right behind the authentication, application data sent right behind the CONNECT).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from postbridge.addresses import HostPort
from postbridge.errors import SocksProtocolError
from postbridge.socks import wire
from postbridge.socks.wire import AddressType, Reply

__all__ = [
    "AddressType",
    "ConnectRequested",
    "Event",
    "JwtAuthRequested",
    "PasswordAuthRequested",
    "PayloadReceived",
    "Reply",
    "Socks5Server",
    "State",
]


@dataclass(frozen=True)
class PasswordAuthRequested:
    """The client sent RFC 1929 credentials; answer with ``accept_auth()`` or ``reject_auth()``."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class JwtAuthRequested:
    """The client sent a JWT and a location ID (method 0x80; "" = no location); answer like a password."""

    token: str = field(repr=False)
    location_id: str


@dataclass(frozen=True)
class ConnectRequested:
    """The client asked to CONNECT; ``host`` is the (lower-cased, never resolved) domain or the IP text."""

    host: str
    port: int
    address_type: AddressType


@dataclass(frozen=True)
class PayloadReceived:
    """Application bytes from the client, only after a SUCCEEDED reply (never empty)."""

    data: bytes


Event = PasswordAuthRequested | JwtAuthRequested | ConnectRequested | PayloadReceived


class State(enum.Enum):
    GREETING = "greeting"  # waiting for 05 NMETHODS METHODS
    PASSWORD_AUTH = "password-auth"  # waiting for the RFC 1929 request
    JWT_AUTH = "jwt-auth"  # waiting for the method 0x80 request
    AUTH_PENDING = "auth-pending"  # waiting for accept_auth() / reject_auth()
    REQUEST = "request"  # waiting for 05 CMD 00 ATYP ADDR PORT
    CONNECT_PENDING = "connect-pending"  # waiting for reply()
    RELAYING = "relaying"  # SUCCEEDED sent; everything received is payload
    CLOSED = "closed"  # flush data_to_send() and close; later input is ignored


class _Trigger(enum.Enum):
    """Transitions that are not inbound events: server decisions and the caller's calls."""

    CHOSE_JWT = "greeting offering method 0x80"
    CHOSE_PASSWORD = "greeting offering method 0x02"
    NO_ACCEPTABLE_METHOD = "greeting without a supported method"
    ACCEPT_AUTH = "accept_auth()"
    REJECT_AUTH = "reject_auth()"
    REQUEST_REFUSED = "request the server refuses itself"
    REPLY_SUCCEEDED = "reply(SUCCEEDED)"
    REPLY_FAILED = "reply(failure)"
    PROTOCOL_ERROR = "protocol error"


_Key = type[Event] | _Trigger

_TRANSITIONS: dict[tuple[State, _Key], State] = {
    (State.GREETING, _Trigger.CHOSE_JWT): State.JWT_AUTH,
    (State.GREETING, _Trigger.CHOSE_PASSWORD): State.PASSWORD_AUTH,
    (State.GREETING, _Trigger.NO_ACCEPTABLE_METHOD): State.CLOSED,
    (State.PASSWORD_AUTH, PasswordAuthRequested): State.AUTH_PENDING,
    (State.JWT_AUTH, JwtAuthRequested): State.AUTH_PENDING,
    (State.AUTH_PENDING, _Trigger.ACCEPT_AUTH): State.REQUEST,
    (State.AUTH_PENDING, _Trigger.REJECT_AUTH): State.CLOSED,
    (State.REQUEST, ConnectRequested): State.CONNECT_PENDING,
    (State.REQUEST, _Trigger.REQUEST_REFUSED): State.CLOSED,
    (State.CONNECT_PENDING, _Trigger.REPLY_SUCCEEDED): State.RELAYING,
    (State.CONNECT_PENDING, _Trigger.REPLY_FAILED): State.CLOSED,
    (State.RELAYING, PayloadReceived): State.RELAYING,
    **{(state, _Trigger.PROTOCOL_ERROR): State.CLOSED for state in State if state is not State.CLOSED},
}

_AUTH_HINT = "call it only after receive_data() returned an *AuthRequested event"
_REPLY_HINT = "call reply() only after receive_data() returned ConnectRequested"
_HINTS: dict[_Key, str] = {
    _Trigger.ACCEPT_AUTH: _AUTH_HINT,
    _Trigger.REJECT_AUTH: _AUTH_HINT,
    _Trigger.REPLY_SUCCEEDED: _REPLY_HINT,
    _Trigger.REPLY_FAILED: _REPLY_HINT,
}


def _key_name(key: _Key) -> str:
    return key.value if isinstance(key, _Trigger) else key.__name__


class Socks5Server:
    """One SOCKS5 conversation, seen from the hub. See the module docstring for the pipelining contract."""

    def __init__(self, *, max_token_length: int = 16384, max_pending: int = 256 * 1024) -> None:
        self.max_token_length = max_token_length
        self.max_pending = max_pending  # bytes held back while a decision is pending
        self.close_reason = ""  # why the state is CLOSED, for the listener's log (never holds a secret)
        self._state = State.GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._target = ""

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """True when the connection must be closed once ``data_to_send()`` is flushed."""
        return self._state is State.CLOSED

    def data_to_send(self) -> bytes:
        """The bytes queued for the client; the queue is cleared."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client (any split); ``b""`` only parses what is buffered.

        Raises SocksProtocolError when the client breaks the protocol; the state is then CLOSED,
        ``close_reason`` says why, and when ``error.reply`` is set that reply is already queued in
        ``data_to_send()``.
        """
        if self._state is State.CLOSED:
            return []
        if self._state is State.RELAYING and not self._buffer:
            return [PayloadReceived(bytes(data))] if data else []
        self._buffer += data
        try:
            return self._parse_buffer()
        except SocksProtocolError as error:
            self._fail(error)
            raise

    def accept_auth(self) -> None:
        """Answer the *AuthRequested event with success. Raises SocksProtocolError in any other state."""
        self._apply(_Trigger.ACCEPT_AUTH)
        self._outgoing += wire.AUTH_SUCCEEDED

    def reject_auth(self) -> None:
        """Answer the *AuthRequested event with failure; the state becomes CLOSED. Raises SocksProtocolError
        in any other state."""
        self._apply(_Trigger.REJECT_AUTH)
        self._outgoing += wire.AUTH_FAILED
        self._buffer.clear()
        self.close_reason = "authentication rejected"

    def reply(self, code: Reply, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        """Answer the ConnectRequested: SUCCEEDED -> RELAYING, any other code -> CLOSED.

        Raises SocksProtocolError outside CONNECT_PENDING, ValueError for an unknown code or a ``bound`` that
        is not an IP address text and port.
        """
        code = Reply(code)
        encoded = wire.encode_reply(code, bound)
        self._apply(_Trigger.REPLY_SUCCEEDED if code is Reply.SUCCEEDED else _Trigger.REPLY_FAILED)
        self._outgoing += encoded
        if code is not Reply.SUCCEEDED:
            self._buffer.clear()
            self.close_reason = f"CONNECT {self._target} answered {code.name} (0x{code:02x})"

    # -- internals ----------------------------------------------------------------------------------------

    def _apply(self, key: _Key) -> None:
        new_state = _TRANSITIONS.get((self._state, key))
        if new_state is None:
            raise SocksProtocolError(
                f"{_key_name(key)} is not allowed in state {self._state.name}", hint=_HINTS.get(key, "")
            )
        self._state = new_state

    def _fail(self, error: SocksProtocolError) -> None:
        if error.reply is not None:
            self._outgoing += wire.encode_reply(Reply(error.reply))
        self.close_reason = str(error)
        self._buffer.clear()
        self._apply(_Trigger.PROTOCOL_ERROR)

    def _parse_buffer(self) -> list[Event]:
        events: list[Event] = []
        while True:
            state = self._state
            if state is State.RELAYING:
                if self._buffer:
                    events.append(PayloadReceived(bytes(self._buffer)))
                    self._buffer.clear()
                    self._apply(PayloadReceived)
                return events
            if state is State.CLOSED:
                self._buffer.clear()
                return events
            if state in (State.AUTH_PENDING, State.CONNECT_PENDING):
                if len(self._buffer) > self.max_pending:
                    raise SocksProtocolError(
                        f"client sent {len(self._buffer)} bytes while its {state.name} decision was open, "
                        f"more than the limit of {self.max_pending}",
                        hint="the client must wait for the SOCKS5 reply before sending much data",
                    )
                return events
            event: Event | None = None
            if state is State.GREETING:
                self._parse_greeting()
            elif state is State.PASSWORD_AUTH:
                event = self._parse_password()
            elif state is State.JWT_AUTH:
                event = self._parse_jwt()
            else:
                event = self._parse_request()
            if event is not None:
                self._apply(type(event))
                events.append(event)
            elif self._state is state:
                return events  # the message is incomplete: wait for more bytes

    def _parse_greeting(self) -> None:
        buf = self._buffer
        if not buf:
            return
        if buf[0] != wire.SOCKS_VERSION:
            raise wire.not_socks5_error(buf[0])
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return
        methods = bytes(buf[2 : 2 + buf[1]])
        del buf[: 2 + buf[1]]
        if wire.METHOD_JWT in methods:
            self._apply(_Trigger.CHOSE_JWT)
            self._outgoing += bytes([wire.SOCKS_VERSION, wire.METHOD_JWT])
        elif wire.METHOD_PASSWORD in methods:
            self._apply(_Trigger.CHOSE_PASSWORD)
            self._outgoing += bytes([wire.SOCKS_VERSION, wire.METHOD_PASSWORD])
        else:
            self._apply(_Trigger.NO_ACCEPTABLE_METHOD)
            self._outgoing += bytes([wire.SOCKS_VERSION, wire.METHOD_NONE_ACCEPTABLE])
            offered = " ".join(f"{method:02x}" for method in methods) or "none"
            self.close_reason = (
                f"client offered no supported authentication method (offered: {offered}) — configure it with "
                "username/password (0x02) or a JWT (0x80); anonymous use is not offered"
            )

    def _check_auth_version(self, what: str) -> bool:
        """False when no byte is buffered yet; raises SocksProtocolError for a version other than 0x01."""
        if not self._buffer:
            return False
        if self._buffer[0] != wire.AUTH_VERSION:
            raise SocksProtocolError(
                f"{what} sub-negotiation has version 0x{self._buffer[0]:02x}, expected 0x01",
                hint="the client's SOCKS5 authentication implementation is broken or not SOCKS5",
            )
        return True

    def _parse_password(self) -> PasswordAuthRequested | None:
        buf = self._buffer
        if not self._check_auth_version("username/password (RFC 1929)") or len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) <= user_end or len(buf) < user_end + 1 + buf[user_end]:
            return None
        end = user_end + 1 + buf[user_end]
        username = wire.decode_credential(bytes(buf[2:user_end]), "username")
        password = wire.decode_credential(bytes(buf[user_end + 1 : end]), "password")
        del buf[:end]
        return PasswordAuthRequested(username=username, password=password)

    def _parse_jwt(self) -> JwtAuthRequested | None:
        buf = self._buffer
        if not self._check_auth_version("JWT (method 0x80)") or len(buf) < 5:
            return None
        token_length = int.from_bytes(buf[1:5], "big")
        if token_length > self.max_token_length:
            raise SocksProtocolError(
                f"JWT of {token_length} bytes is longer than the limit of {self.max_token_length} bytes",
                hint="request a fresh token from the hub's /oauth/token endpoint; this is not one of ours",
            )
        token_end = 5 + token_length
        if len(buf) <= token_end or len(buf) < token_end + 1 + buf[token_end]:
            return None
        end = token_end + 1 + buf[token_end]
        try:
            token = bytes(buf[5:token_end]).decode("ascii")
        except UnicodeDecodeError:
            raise SocksProtocolError(
                "JWT is not ASCII text", hint="send the compact JWT exactly as /oauth/token returned it"
            ) from None
        location_id = wire.decode_location_id(bytes(buf[token_end + 1 : end]))
        del buf[:end]
        return JwtAuthRequested(token=token, location_id=location_id)

    def _parse_request(self) -> ConnectRequested | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != wire.SOCKS_VERSION:
            raise wire.request_error(f"request has version 0x{buf[0]:02x}, expected 0x05")
        if len(buf) < 2:
            return None
        if buf[1] != wire.COMMAND_CONNECT:
            command = wire.command_name(buf[1])
            self._refuse(Reply.COMMAND_NOT_SUPPORTED, f"{command} is not supported", "the hub only offers CONNECT")
            return None
        if len(buf) < 3:
            return None
        if buf[2] != 0x00:
            raise wire.request_error(f"request has reserved byte 0x{buf[2]:02x}, expected 0x00")
        if len(buf) < 4:
            return None
        if buf[3] not in tuple(AddressType):
            reason, hint = f"address type 0x{buf[3]:02x} is not supported", "send a domain, IPv4 or IPv6"
            self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED, reason, hint)
            return None
        address_type = AddressType(buf[3])
        if address_type is AddressType.DOMAIN:
            if len(buf) < 5:
                return None
            if buf[4] == 0:
                raise wire.request_error("CONNECT names an empty domain")
            start, length = 5, buf[4]
        else:
            start, length = 4, 4 if address_type is AddressType.IPV4 else 16
        end = start + length + 2
        if len(buf) < end:
            return None
        raw, port = bytes(buf[start : start + length]), int.from_bytes(buf[end - 2 : end], "big")
        is_domain = address_type is AddressType.DOMAIN
        host = wire.decode_domain(raw) if is_domain else str(ipaddress.ip_address(raw))
        del buf[:end]
        self._target = str(HostPort(host, port))
        return ConnectRequested(host=host, port=port, address_type=address_type)

    def _refuse(self, code: Reply, reason: str, hint: str) -> None:
        self._apply(_Trigger.REQUEST_REFUSED)
        self._outgoing += wire.encode_reply(code)
        self._buffer.clear()
        self.close_reason = f"{reason}, replied {code.name} (0x{code:02x}) — {hint}"
