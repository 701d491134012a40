"""SOCKS5 wire vocabulary for the hub: RFC 1928/1929 constants, reply codes, encoders and small decoders.

Owns the byte-level pieces that :mod:`postbridge.socks.server` assembles: reply encoding, the SAP-compatible
location-ID decoding of method 0x80, and the diagnosis of clients that do not speak SOCKS5 at all.
Must not hold state, do I/O or decide anything about routing or authentication.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress

from postbridge.addresses import valid_host
from postbridge.errors import SocksProtocolError

SOCKS_VERSION = 0x05
AUTH_VERSION = 0x01  # sub-negotiation version of RFC 1929 and of method 0x80
METHOD_NO_AUTH = 0x00
METHOD_PASSWORD = 0x02  # RFC 1929 username/password
METHOD_JWT = 0x80  # SAP Cloud Connectivity compatible: JWT + location ID
METHOD_NONE_ACCEPTABLE = 0xFF
COMMAND_CONNECT = 0x01
AUTH_SUCCEEDED = bytes([AUTH_VERSION, 0x00])
AUTH_FAILED = bytes([AUTH_VERSION, 0x01])

_COMMAND_NAMES = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}


class Reply(enum.IntEnum):
    """RFC 1928 REP values of a SOCKS5 reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AddressType(enum.IntEnum):
    """RFC 1928 ATYP values."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


def command_name(command: int) -> str:
    """``'BIND (0x02)'`` for a CMD byte, for messages."""
    return f"{_COMMAND_NAMES.get(command, 'unknown command')} (0x{command:02x})"


def encode_reply(code: Reply, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    """Encode ``05 REP 00 ATYP BND.ADDR BND.PORT``.

    Raises ValueError when ``bound`` is not an IPv4/IPv6 address text and a port 0-65535 (a caller bug).
    """
    host, port = bound
    address = ipaddress.ip_address(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bound port {port} is outside 0-65535")
    address_type = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes([SOCKS_VERSION, Reply(code), 0x00, address_type]) + address.packed + port.to_bytes(2, "big")


def request_error(message: str, hint: str = "the client's SOCKS5 request is malformed") -> SocksProtocolError:
    """A protocol error in the CONNECT request; the client is answered with GENERAL_FAILURE."""
    return SocksProtocolError(message, reply=Reply.GENERAL_FAILURE, hint=hint)


def decode_credential(raw: bytes, what: str) -> str:
    """Decode an RFC 1929 username or password; raises SocksProtocolError (never quoting a password)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = f" {raw[:64]!r}" if what == "username" else ""
        raise SocksProtocolError(
            f"{what}{shown} is not valid UTF-8", hint="the client must send RFC 1929 credentials as UTF-8"
        ) from None


def decode_domain(raw: bytes) -> str:
    """The lower-cased host name of an ATYP 3 request (one trailing dot dropped).

    Raises SocksProtocolError (reply GENERAL_FAILURE) for non-ASCII bytes or an invalid host name.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise request_error(
            f"CONNECT domain {raw[:64]!r} is not ASCII",
            hint="send internationalised names as punycode (xn--...)",
        ) from None
    host = text[:-1] if text.endswith(".") else text
    if not valid_host(host):
        raise request_error(
            f"CONNECT names {text[:64]!r}, which is not a valid host name",
            hint="connect to the virtual host of a connector mapping, e.g. 'mail.corp.example'",
        )
    return host.lower()


def decode_location_id(raw: bytes) -> str:
    """Decode the location ID of method 0x80: base64 of printable UTF-8, else the raw text; b"" means "".

    Raises SocksProtocolError when the bytes are neither base64 of printable text nor printable text.
    """
    if not raw:
        return ""
    try:
        decoded = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    if decoded and decoded.isprintable():
        return decoded
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text.isprintable() or not text:
        raise SocksProtocolError(
            f"location ID {raw[:64]!r} is neither base64 of printable text nor printable text",
            hint="the client must send the location ID base64-encoded (or as plain text): 'ZGMx' for 'dc1'",
        )
    return text


def not_socks5_error(first_byte: int) -> SocksProtocolError:
    """The error for a connection whose first byte is not 0x05, guessing which protocol was spoken instead."""
    shown = f"0x{first_byte:02x}"
    if 0x20 < first_byte < 0x7F:
        shown += f" ({chr(first_byte)!r})"
    message = f"not a SOCKS5 client: first byte {shown}"
    if first_byte in b"GPCHDO":  # GET, POST/PUT/PATCH, CONNECT, HEAD, DELETE, OPTIONS
        hint = (
            "is an HTTP client pointed at the SOCKS port? Configure it to use a SOCKS5 proxy "
            "(e.g. curl --socks5-hostname HOST:PORT) instead of an HTTP proxy"
        )
    elif first_byte == 0x16:
        hint = (
            "is a TLS client pointed at the SOCKS port? The port speaks plain SOCKS5; start TLS end to end "
            "after the SOCKS5 CONNECT succeeded"
        )
    elif first_byte == 0x04:
        hint = "the client speaks SOCKS4/4a, which the hub does not offer; configure it to use SOCKS5"
    else:
        hint = "configure the client to use a SOCKS5 proxy (RFC 1928) with username/password or a JWT"
    return SocksProtocolError(message, hint=hint)
