"""Flow targets: where a flow hands each message it fetched, and the one door that builds them from TOML.

Owns :class:`Delivery` (one message handed to a target), :class:`DeliveryResult`, :class:`TargetError` (its
``retryable`` tells the engine to try again later or to quarantine the message), the :class:`Target` protocol,
:class:`TargetTable` (the typed reader every kind validates its table with) and :func:`build_target`::

    kind        what it does with a message                                   module
    http        POST it (raw RFC 5322 or JSON) to a URL                        targets_http.py (+ targets_json.py)
    directory   write <idempotency_key>.eml and .json atomically into a folder  targets_directory.py
    smtp        forward it through an SMTP receiver channel                    targets_smtp.py
    python      call package.module:function(delivery)                         targets_python.py

Every kind carries the delivery's idempotency key to the other side (a request header, the file name, a mail
header), so a delivery repeated after a crash or an unclear failure can be recognised there. Retryable are the
failures that may pass by themselves (network, timeouts, busy servers, a full disk); permanent are refusals of
this message and configuration problems (an untrusted certificate, a folder that cannot be written).

Must not: do network I/O while building (bad settings are found before the first message), touch a mailbox or
the runtime store, or put a header value, password or token into a message, a log record or a repr.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.mail.settings import CredentialResolver

KINDS = ("http", "directory", "smtp", "python")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
"""What an idempotency key may look like: it becomes a file name and a header value, so no '/', '.' or space."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to a target; ``attempt`` 1 is the first try, ``received_at`` epoch seconds."""

    flow: str
    key: str
    idempotency_key: str
    raw: bytes = field(repr=False)
    mailbox: str
    uid: int | None
    received_at: float
    attempt: int


@dataclass(frozen=True)
class DeliveryResult:
    """Where the message went (``ref``: a file path, ``HTTP 201 <Location>``, the SMTP reply, ...).

    ``duplicate``: the target already had a message with this idempotency key (nothing new was stored).
    """

    ref: str
    duplicate: bool = False


class TargetError(PostbridgeError):
    """A target did not take the message. ``retryable``: try again later; otherwise quarantine it."""

    def __init__(self, message: str, *, retryable: bool, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class Target(Protocol):
    """A flow's destination. ``deliver`` is called for one message at a time per flow; ``close`` once."""

    kind: str

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Hand on one message; raises TargetError (``retryable`` says whether to try again)."""
        ...

    def close(self) -> None:
        """Release connections and files; never raises."""
        ...


def check_idempotency_key(key: str) -> str:
    """Return ``key`` if it is safe as a file name and header value; raises TargetError (permanent) otherwise."""
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise TargetError(
            f"idempotency key {key[:80]!r} may only hold letters, digits, '_' and '-' (1 to 200 of them)",
            retryable=False,
            hint="this is a bug in the caller of the target: report it",
        )
    return key


def resolve_path(value: str, home: Path) -> Path:
    """``~`` expanded; a relative path is taken relative to the home folder (a service has no useful cwd)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else home / path


_MISSING: Any = object()


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


class TargetTable:
    """Reads one ``[flow.target]`` table: unknown keys are refused at once, getters quote a wrongly typed value.

    Every ConfigurationError it raises starts with ``source`` (e.g. ``flows.toml [flow.target] of flow 'x'``).
    """

    def __init__(self, table: Mapping[str, Any], source: str, known: Collection[str]) -> None:
        self.table = table
        self.source = source
        unknown = sorted(str(key) for key in table if key not in known)
        if unknown:
            kind = table.get("kind", "?")
            raise self.error(
                f"unknown key(s) {', '.join(repr(key) for key in unknown)} for kind {kind!r}",
                hint=f"known keys: {', '.join(sorted(known))}",
            )

    def error(self, text: str, *, hint: str = "") -> ConfigurationError:
        return ConfigurationError(f"{self.source}: {text}", hint=hint)

    def wrong_type(self, key: str, value: Any, expected: str, *, quote: bool = True) -> ConfigurationError:
        shown = f" {value!r}" if quote else ""
        return self.error(f"{key} must be {expected}, not {_type_name(value)}{shown}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.table:
            return self.table[key]
        if default is _MISSING:
            raise self.error(f"{key!r} is missing", hint=f"add {key} = ... to the table")
        return default

    def text(self, key: str, default: str | None = _MISSING) -> str | None:
        """A string; ``default`` when absent (required when no default is given)."""
        value = self._get(key, default)
        if value is None or isinstance(value, str):
            return value
        raise self.wrong_type(key, value, "a string")

    def required_text(self, key: str) -> str:
        value = self.text(key)
        assert value is not None
        if not value.strip():
            raise self.error(f"{key} is empty", hint=f"give a value for {key}")
        return value

    def choice(self, key: str, allowed: Collection[str], default: str) -> str:
        value = self.text(key, default)
        if value is None or value not in allowed:
            raise self.error(f"{key} {value!r} is not one of: {', '.join(allowed)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if isinstance(value, bool):
            return value
        raise self.wrong_type(key, value, "true or false")

    def seconds(self, key: str, default: float, *, maximum: float = 3600.0) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.wrong_type(key, value, "a number of seconds")
        if not 0 < value <= maximum:
            raise self.error(f"{key} = {value!r} is not between 0 and {maximum:g} seconds")
        return float(value)

    def strings(self, key: str) -> list[str]:
        """A non-empty list of non-empty strings (required)."""
        value = self._get(key, _MISSING)
        if isinstance(value, str) or not isinstance(value, list):
            raise self.wrong_type(key, value, "a list of strings")
        if not value:
            raise self.error(f"{key} is an empty list", hint=f"give at least one value in {key}")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise self.wrong_type(f"every entry of {key}", item, "a non-empty string")
        return list(value)

    def subtable(self, key: str, default: Mapping[str, Any] | None = _MISSING) -> Mapping[str, Any]:
        value = self._get(key, default)
        if isinstance(value, Mapping):
            return value
        raise self.wrong_type(key, value, "a table", quote=False)


def build_target(
    table: Mapping[str, Any], *, source: str, home: Path, credentials: CredentialResolver | None = None
) -> Target:
    """Validate a ``[flow.target]`` table and build its target, without network I/O.

    ``source`` starts every error message; ``home`` anchors relative paths (folder, ca_file, keystore);
    ``credentials`` resolves an smtp channel's ``credential`` name. Raises ConfigurationError naming the key and
    quoting the bad value (never a header value or a secret): an unknown kind or key, a wrong type, a missing
    environment variable, a python callable that cannot be imported, an unreadable ca_file, ...
    """
    # the kinds import this module for Delivery and TargetError, so they are imported when a target is built
    from postbridge.runtime import targets_directory, targets_http, targets_python, targets_smtp

    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{source} must be a table, not {_type_name(table)}", hint='e.g. kind = "directory"')
    kind = table.get("kind", _MISSING)
    if kind is _MISSING:
        raise ConfigurationError(f"{source}: 'kind' is missing", hint=f"set kind to one of: {', '.join(KINDS)}")
    if kind == "http":
        return targets_http.build(table, source=source, home=home)
    if kind == "directory":
        return targets_directory.build(table, source=source, home=home)
    if kind == "smtp":
        return targets_smtp.build(table, source=source, home=home, credentials=credentials)
    if kind == "python":
        return targets_python.build(table, source=source)
    raise ConfigurationError(f"{source}: kind {kind!r} is not one of: {', '.join(KINDS)}")
