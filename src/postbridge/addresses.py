"""``host:port`` values as users type them, parsed once and validated (IPv6 in brackets: ``[::1]:143``)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from postbridge.errors import ConfigurationError

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")


@dataclass(frozen=True, order=True)
class HostPort:
    """A host name or IP address and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def valid_host(host: str) -> bool:
    """True for an IP address or a syntactically valid DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def parse_host_port(text: str, *, what: str = "address", default_port: int | None = None) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port``; raise ConfigurationError quoting the text and the expected form."""
    value = text.strip()
    example = f"{what} must look like 'host:port' or '[::1]:port'"
    host: str
    port_text: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigurationError(f"{what} '{text}' has an unclosed '['", hint=example)
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"{what} '{text}' has text after ']' that is not ':port'", hint=example)
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" not in value:
        host, port_text = value, None
    else:
        raise ConfigurationError(f"{what} '{text}' is ambiguous (IPv6 needs brackets)", hint=example)
    if port_text is None:
        if default_port is None:
            raise ConfigurationError(f"{what} '{text}' has no port", hint=example)
        port = default_port
    else:
        if not port_text.isdigit():
            raise ConfigurationError(f"{what} '{text}' has port '{port_text}' that is not a number", hint=example)
        port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigurationError(f"{what} '{text}' has port {port} outside 1-65535", hint=example)
    if not host or not valid_host(host):
        raise ConfigurationError(f"{what} '{text}' has an invalid host '{host}'", hint=example)
    return HostPort(host.lower() if not _is_ip(host) else host, port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (with or without the root dot) and any loopback address (127.0.0.0/8, ``::1``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
