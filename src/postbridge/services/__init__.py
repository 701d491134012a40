"""services room of postbridge: every operation the CLI, the web pages and the JSON API perform, in one place.

``services/connector.py`` (mappings, backend trust store, checks, audit log, trace level) and ``services/cloud.py``
(the cockpit's operations) validate input, save, and write the audit entries; the CLI and the web routes only
parse arguments, call one service function and show its result. So there is one implementation of each rule.

This module owns the errors a service raises for user input, each a :class:`ConfigurationError` (local: the fix is
to change the input) that knows its HTTP status (``http_status``)::

    InvalidInput   422  a value does not parse or is not allowed (an invalid host:port, an unknown protocol)
    NotFound       404  the thing named does not exist (no mapping for that virtual host, no such alias)
    Conflict       409  the change collides with what exists (a virtual host already mapped)
    TooLarge       413  an upload is larger than allowed

Other PostbridgeErrors keep their meaning: a plain ConfigurationError or TrustError (an unreadable certificate) is
a 400, an AuthenticationError a 401/403 (see :func:`postbridge.web.pages.http_status`).

Must not: import anything from ``postbridge.web`` (services work without a web server) or print.
"""

from __future__ import annotations

from typing import ClassVar

from postbridge.addresses import HostPort, parse_host_port
from postbridge.connector.mappings import normalize_virtual
from postbridge.errors import ConfigurationError


class InvalidInput(ConfigurationError):
    """A value given by the user does not parse or is not allowed; the message quotes it."""

    http_status: ClassVar[int] = 422


class NotFound(ConfigurationError):
    """The mapping, certificate or entry named does not exist; the message names what was looked for."""

    http_status: ClassVar[int] = 404


class Conflict(ConfigurationError):
    """The change collides with what exists (e.g. a virtual host that is already mapped); nothing was saved."""

    http_status: ClassVar[int] = 409


class TooLarge(ConfigurationError):
    """An upload exceeds its size limit; nothing was read into the store."""

    http_status: ClassVar[int] = 413


def invalid(exc: ConfigurationError) -> InvalidInput:
    """The same message and hint as an :class:`InvalidInput` (for errors of the parsers: ``raise invalid(exc)``)."""
    return InvalidInput(exc.message, hint=exc.hint)


def virtual_address(virtual: str | HostPort) -> HostPort:
    """A virtual host:port as mappings key it (host lower-cased); raises InvalidInput quoting a bad one."""
    if isinstance(virtual, HostPort):
        return normalize_virtual(virtual)
    try:
        return normalize_virtual(parse_host_port(virtual, what="virtual host"))
    except ConfigurationError as exc:
        raise invalid(exc) from exc
