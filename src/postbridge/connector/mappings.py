"""The connector's mappings: which virtual ``host:port`` leads to which internal ``host:port``, and how.

Owns the :class:`Mapping` value (validated once, when it is built or read), its JSON form, and the file
``HOME/connector/mappings.json`` that holds them (written atomically with :func:`postbridge.home.write_json`).
Virtual hosts are compared case-insensitively: names are kept in lower case, IP addresses canonical.

Must not: decide whether a tunneled connection is allowed (access control does that with
:meth:`MappingStore.load`), dial anything, or hold secrets (a mapping has none).

File format::

    {"mappings": [{"virtual": "mail.corp:143", "internal": "10.1.2.3:143", "protocol": "tcp",
                   "tls_server_name": null, "description": "", "enabled": true}, ...]}
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from postbridge.addresses import HostPort, parse_host_port, valid_host
from postbridge.errors import ConfigurationError
from postbridge.home import read_json, write_json

_FIELDS = ("virtual", "internal", "protocol", "tls_server_name", "description", "enabled")
_REQUIRED = ("virtual", "internal", "protocol")


class Protocol(StrEnum):
    """How the connector talks to the internal host: plain bytes, or TLS opened by the connector itself."""

    TCP = "tcp"
    TCP_TLS = "tcp-tls"


def parse_protocol(text: str) -> Protocol:
    """Parse ``tcp`` / ``tcp-tls`` (also ``TCP TLS``, ``tcp_tls``).

    Raises ConfigurationError quoting ``text`` when it is neither.
    """
    normalized = "-".join(text.strip().lower().replace("_", " ").replace("-", " ").split())
    try:
        return Protocol(normalized)
    except ValueError:
        raise ConfigurationError(
            f"unknown protocol '{text}'",
            hint="use 'tcp' (bytes pass through, the client may do STARTTLS) or 'tcp-tls' (the connector "
            "opens TLS to the internal host)",
        ) from None


def normalize_virtual(address: HostPort) -> HostPort:
    """Return ``address`` as mappings are keyed: host names in lower case, IP addresses canonical."""
    try:
        host = str(ipaddress.ip_address(address.host))
    except ValueError:
        host = address.host.lower()
    if host == address.host:
        return address
    return HostPort(host, address.port)


@dataclass(frozen=True)
class Mapping:
    """One allowed route: ``virtual`` (what cloud apps ask for) -> ``internal`` (what the connector dials).

    Building one validates it and raises ConfigurationError naming the bad value.
    """

    virtual: HostPort
    internal: HostPort
    protocol: Protocol
    tls_server_name: str | None = None
    description: str = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "virtual", normalize_virtual(self.virtual))
        if not isinstance(self.protocol, Protocol):
            object.__setattr__(self, "protocol", parse_protocol(str(self.protocol)))
        if self.tls_server_name is not None:
            name = self.tls_server_name.strip()
            if not name or not valid_host(name):
                raise ConfigurationError(
                    f"TLS server name '{self.tls_server_name}' of mapping {self.virtual} is not a host name",
                    hint="give the name the internal server's certificate carries, e.g. 'mail.corp.example'",
                )
            if self.protocol is not Protocol.TCP_TLS:
                raise ConfigurationError(
                    f"mapping {self.virtual} has TLS server name '{name}' but protocol '{self.protocol}'",
                    hint="a TLS server name is only used with protocol 'tcp-tls'; drop it or change the protocol",
                )
            object.__setattr__(self, "tls_server_name", name.lower())

    @property
    def server_name(self) -> str:
        """The name the internal server's certificate must carry, ``tls_server_name`` or the internal host."""
        return self.tls_server_name or self.internal.host

    def to_json(self) -> dict[str, Any]:
        """The mapping as a JSON object (the inverse of :meth:`from_json`)."""
        return {
            "virtual": str(self.virtual),
            "internal": str(self.internal),
            "protocol": self.protocol.value,
            "tls_server_name": self.tls_server_name,
            "description": self.description,
            "enabled": self.enabled,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> Mapping:
        """Build a mapping from its JSON object.

        ``source`` says where it came from (``"'/x/mappings.json' entry 2"``) and starts every error message.
        Raises ConfigurationError naming the missing, unknown or invalid field and quoting its value.
        """
        hint = "repair the entry, or remove it and add it again with 'postbridge connector mapping add'"
        if not isinstance(data, dict):
            raise ConfigurationError(f"{source}: expected a JSON object, found {_quote(data)}", hint=hint)
        unknown = sorted(str(key) for key in data if key not in _FIELDS)
        if unknown:
            raise ConfigurationError(
                f"{source}: unknown field(s) {', '.join(repr(key) for key in unknown)}",
                hint=f"a mapping has the fields {', '.join(_FIELDS)}",
            )
        missing = [key for key in _REQUIRED if data.get(key) in (None, "")]
        if missing:
            raise ConfigurationError(f"{source}: missing field(s) {', '.join(missing)}", hint=hint)
        for key in ("virtual", "internal", "protocol"):
            _expect(data, key, str, source, hint)
        _expect(data, "tls_server_name", (str, type(None)), source, hint)
        _expect(data, "description", str, source, hint)
        _expect(data, "enabled", bool, source, hint)
        try:
            return cls(
                virtual=parse_host_port(data["virtual"], what="virtual address"),
                internal=parse_host_port(data["internal"], what="internal address"),
                protocol=parse_protocol(data["protocol"]),
                tls_server_name=data.get("tls_server_name") or None,
                description=data.get("description", ""),
                enabled=data.get("enabled", True),
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc.message}", hint=exc.hint or hint) from exc


def _expect(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, hint: str) -> None:
    if key in data and not isinstance(data[key], kind):
        raise ConfigurationError(f"{source}: field '{key}' has the wrong type: {_quote(data[key])}", hint=hint)


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class MappingStore:
    """The mappings file (``HOME/connector/mappings.json``). Every change rewrites it atomically.

    The file is re-read on every call, so a running connector sees CLI changes; :meth:`version` tells cheaply
    whether it changed. Two processes changing mappings at the same instant may lose one change (last write
    wins).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[HostPort, Mapping]:
        """Return all mappings keyed by virtual address ({} when the file does not exist).

        Raises ConfigurationError naming the file and the broken entry when the file cannot be used.
        """
        document = read_json(self.path, default=None)
        if document is None:
            return {}
        hint = f"repair '{self.path}' or restore it from a backup"
        if not isinstance(document, dict) or not isinstance(document.get("mappings"), list):
            raise ConfigurationError(
                f"'{self.path}' does not hold a mappings file (expected {{\"mappings\": [...]}})", hint=hint
            )
        result: dict[HostPort, Mapping] = {}
        for index, entry in enumerate(document["mappings"], start=1):
            mapping = Mapping.from_json(entry, source=f"'{self.path}' entry {index}")
            if mapping.virtual in result:
                raise ConfigurationError(
                    f"'{self.path}' entry {index}: virtual address {mapping.virtual} is mapped twice",
                    hint=hint,
                )
            result[mapping.virtual] = mapping
        return result

    def add(self, mapping: Mapping) -> None:
        """Add ``mapping``; raise ConfigurationError when its virtual address is already mapped."""
        mappings = self.load()
        existing = mappings.get(mapping.virtual)
        if existing is not None:
            raise ConfigurationError(
                f"virtual address {mapping.virtual} is already mapped to {existing.internal} ({existing.protocol})",
                hint=f"remove it first with 'postbridge connector mapping remove {mapping.virtual}'",
            )
        mappings[mapping.virtual] = mapping
        self._save(mappings)

    def replace(self, mapping: Mapping) -> Mapping:
        """Put ``mapping`` in place of the one with its virtual address and return the old one.

        Raises ConfigurationError listing the existing virtual addresses when that address is not mapped.
        """
        mappings = self.load()
        old = mappings.get(mapping.virtual)
        if old is None:
            raise self._not_mapped(mapping.virtual, mappings)
        mappings[mapping.virtual] = mapping
        self._save(mappings)
        return old

    def remove(self, virtual: HostPort) -> Mapping:
        """Remove and return the mapping of ``virtual``.

        Raises ConfigurationError listing the existing virtual addresses when ``virtual`` is not mapped.
        """
        key = normalize_virtual(virtual)
        mappings = self.load()
        removed = mappings.pop(key, None)
        if removed is None:
            raise self._not_mapped(key, mappings)
        self._save(mappings)
        return removed

    @staticmethod
    def _not_mapped(key: HostPort, mappings: dict[HostPort, Mapping]) -> ConfigurationError:
        existing = ", ".join(str(address) for address in sorted(mappings)) or "none"
        return ConfigurationError(
            f"no mapping for virtual address {key} (existing: {existing})",
            hint="list them with 'postbridge connector mapping list'",
        )

    def version(self) -> tuple[int, int]:
        """``(st_mtime_ns, st_size)`` of the file, ``(0, 0)`` when it is missing: changes with the file."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0)
        return (status.st_mtime_ns, status.st_size)

    def _save(self, mappings: dict[HostPort, Mapping]) -> None:
        entries = [mappings[key].to_json() for key in sorted(mappings)]
        write_json(self.path, {"mappings": entries})
