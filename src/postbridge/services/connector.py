"""Every operation on a connector, for the CLI (``postbridge connector …``), the connector web UI and its JSON API.

Owns the rules of each change and its audit entry (``config-change`` in ``HOME/connector/audit.log``, with the
``actor``: ``cli`` or ``web:admin``):

* mappings: list, add, update (target, protocol, TLS server name, description), enable/disable, remove; a running
  connector re-reads ``mappings.json`` when it changed (one ``stat`` per tunneled CONNECT, see
  :meth:`postbridge.connector.agent.Connector.mappings`), so changes apply at once without touching the tunnel;
* availability checks of one or all mappings;
* the backend trust store: list with expiry warnings, add (PEM or DER, at most 1 MiB), remove;
* (reading the audit log with filters, page by page or as CSV, is :mod:`postbridge.services.connector_audit`);
* the running process: tunnel state, live counters, the log (trace) level;
* the web UI administrator's password (``HOME/connector/admin.json``, see :mod:`postbridge.web.auth`).

Every function validates its input first and saves only when everything is valid, so a refused change leaves
nothing half-saved. Errors are the classes of :mod:`postbridge.services` (InvalidInput 422, NotFound 404, Conflict
409, TooLarge 413) or the store's own (TrustError for an unreadable certificate, ConfigurationError for a broken
file). Mapping changes of this process are serialised by a lock; another process (the CLI) writing at the same
instant may still lose one change (last write wins, as :class:`MappingStore` documents).

Must not: print, know about HTTP (it uses only the password file of :mod:`postbridge.web.auth`, never the web app),
or put a secret into a result or an audit entry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from postbridge import __version__
from postbridge.addresses import HostPort, parse_host_port
from postbridge.connector.agent import RENEW_BELOW, Connector
from postbridge.connector.check import CheckResult, check_mapping
from postbridge.connector.mappings import Mapping, parse_protocol
from postbridge.connector.state import ConnectorState
from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.services import Conflict, InvalidInput, NotFound, TooLarge, invalid, virtual_address
from postbridge.trust.listing import days_left, entry_json, expiry_warning
from postbridge.trust.pki import describe, remaining_lifetime_fraction
from postbridge.trust.truststore import TrustEntry, validate_alias
from postbridge.web.auth import AdminStore

ACTOR_CLI = "cli"
ADMIN_COMMAND = "postbridge connector admin set-password"
MAX_CERTIFICATE_BYTES = 1024 * 1024
CHECK_CONCURRENCY = 16  # availability checks of "check all" running at the same time
LOG_LEVELS = ("debug", "info", "warning", "error")
_NOISY_LOGGERS = ("hpack", "h2", "uvicorn", "uvicorn.error", "asyncio")  # as postbridge.cli.common.setup_logging
_mapping_lock = threading.Lock()


# -- mappings -------------------------------------------------------------------------------------------------------


def list_mappings(state: ConnectorState) -> list[Mapping]:
    """All mappings sorted by virtual address. Raises ConfigurationError when the file is broken."""
    return sorted(state.mappings.load().values(), key=lambda mapping: mapping.virtual)


def get_mapping(state: ConnectorState, virtual: str | HostPort) -> Mapping:
    """The mapping of ``virtual``; raises InvalidInput for a bad address, NotFound when it is not mapped."""
    key = virtual_address(virtual)
    mapping = state.mappings.load().get(key)
    if mapping is None:
        raise NotFound(f"no mapping for virtual host '{key}'", hint="see 'postbridge connector mapping list'")
    return mapping


def add_mapping(
    state: ConnectorState,
    virtual: str | HostPort,
    internal: str | HostPort,
    *,
    protocol: str = "tcp",
    tls_server_name: str = "",
    description: str = "",
    enabled: bool = True,
    actor: str,
) -> Mapping:
    """Add a mapping and audit it (``mapping-add``).

    Raises InvalidInput naming the bad value (host:port, protocol, TLS server name), Conflict when the virtual
    address is mapped already (nothing is changed).
    """
    mapping = _build(virtual, internal, protocol, tls_server_name, description, enabled)
    with _mapping_lock:
        existed = mapping.virtual in state.mappings.load()
        try:
            state.mappings.add(mapping)
        except ConfigurationError as exc:
            if existed:
                raise Conflict(exc.message, hint=exc.hint) from exc
            raise
        state.audit.config_change(action="mapping-add", detail=mapping.to_json(), actor=actor)
    return mapping


def update_mapping(
    state: ConnectorState,
    virtual: str | HostPort,
    *,
    internal: str | HostPort | None = None,
    protocol: str | None = None,
    tls_server_name: str | None = None,
    description: str | None = None,
    enabled: bool | None = None,
    actor: str,
    action: str = "mapping-update",
) -> Mapping:
    """Change the given fields of the mapping of ``virtual`` (None = keep; ``tls_server_name=""`` clears it) and
    audit the change with the mapping before and after.

    Raises InvalidInput for a bad value, NotFound when ``virtual`` is not mapped.
    """
    key = virtual_address(virtual)
    with _mapping_lock:
        mappings = state.mappings.load()
        before = mappings.get(key)
        if before is None:
            raise NotFound(_no_mapping(key, mappings), hint="see the list of mappings")
        after = _build(
            before.virtual,
            internal if internal is not None else before.internal,
            protocol if protocol is not None else before.protocol.value,
            tls_server_name if tls_server_name is not None else (before.tls_server_name or ""),
            description if description is not None else before.description,
            enabled if enabled is not None else before.enabled,
        )
        if after == before:
            return before
        mappings[key] = after
        state.mappings.replace(after)
        state.audit.config_change(
            action=action,
            detail={"virtual": str(key), "before": before.to_json(), "after": after.to_json()},
            actor=actor,
        )
    return after


def set_mapping_enabled(state: ConnectorState, virtual: str | HostPort, enabled: bool, *, actor: str) -> Mapping:
    """Enable or disable a mapping (a disabled one is denied like an unmapped address); audited as
    ``mapping-enable`` / ``mapping-disable``. Raises as :func:`update_mapping`."""
    action = "mapping-enable" if enabled else "mapping-disable"
    return update_mapping(state, virtual, enabled=enabled, actor=actor, action=action)


def remove_mapping(state: ConnectorState, virtual: str | HostPort, *, actor: str) -> Mapping:
    """Remove the mapping of ``virtual`` and audit it (``mapping-remove``); new connections to it are denied.

    Raises InvalidInput for a bad address, NotFound (listing the existing ones) when it is not mapped.
    """
    key = virtual_address(virtual)
    with _mapping_lock:
        existed = key in state.mappings.load()
        try:
            removed = state.mappings.remove(key)
        except ConfigurationError as exc:
            if not existed:
                raise NotFound(exc.message, hint=exc.hint) from exc
            raise
        state.audit.config_change(action="mapping-remove", detail=removed.to_json(), actor=actor)
    return removed


def mapping_warnings(state: ConnectorState, mapping: Mapping) -> list[str]:
    """What may keep ``mapping`` from working although it was saved (e.g. tcp-tls with an empty trust store)."""
    if mapping.protocol.value != "tcp-tls":
        return []
    try:
        empty = not state.truststore.list()
    except PostbridgeError as exc:
        return [f"the backend trust store cannot be used: {exc.message}"]
    if empty:
        return ["the backend trust store is empty; add the internal CA with 'postbridge connector truststore add FILE'"]
    return []


def _build(
    virtual: str | HostPort,
    internal: str | HostPort,
    protocol: str,
    tls_server_name: str,
    description: str,
    enabled: bool,
) -> Mapping:
    try:
        return Mapping(
            virtual=virtual_address(virtual),
            internal=internal if isinstance(internal, HostPort) else parse_host_port(internal, what="internal host"),
            protocol=parse_protocol(protocol),
            tls_server_name=tls_server_name.strip() or None,
            description=description.strip(),
            enabled=enabled,
        )
    except ConfigurationError as exc:
        raise invalid(exc) from exc


def _no_mapping(key: HostPort, mappings: dict[HostPort, Mapping]) -> str:
    existing = ", ".join(str(address) for address in sorted(mappings)) or "none"
    return f"no mapping for virtual address {key} (existing: {existing})"


# -- availability checks --------------------------------------------------------------------------------------------


async def check(state: ConnectorState, virtual: str | HostPort, *, timeout: float = 5.0) -> CheckResult:
    """Check the mapping of ``virtual`` (TCP, TLS for tcp-tls, the mail greeting). A failed check is a result.

    Raises InvalidInput for a bad address, NotFound when it is not mapped.
    """
    mapping = get_mapping(state, virtual)
    return await check_mapping(mapping, tls_context=state.truststore.ssl_context, timeout=timeout)


async def check_all(state: ConnectorState, *, timeout: float = 5.0) -> list[CheckResult]:
    """Check every mapping (disabled ones too), at most :data:`CHECK_CONCURRENCY` at a time; results in the order
    of :func:`list_mappings`. Raises ConfigurationError when the mappings file is broken."""
    limit = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one(mapping: Mapping) -> CheckResult:
        async with limit:
            return await check_mapping(mapping, tls_context=state.truststore.ssl_context, timeout=timeout)

    return list(await asyncio.gather(*(one(mapping) for mapping in list_mappings(state))))


# -- backend trust store --------------------------------------------------------------------------------------------


def list_trusted(state: ConnectorState, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """The trust store as the CLI's ``--json`` listing shows it (alias, subject, validity, ``warning``, ...).

    Raises TrustError when the store holds an unreadable file.
    """
    moment = now or datetime.now(UTC)
    return [entry_json(entry, moment) for entry in state.truststore.list()]


def add_trusted(
    state: ConnectorState, data: bytes, *, alias: str = "", source: str = "upload", actor: str
) -> list[TrustEntry]:
    """Trust the CA certificate(s) in ``data`` (PEM, one or several, or DER) and audit each (``truststore-add``).

    Raises TooLarge above 1 MiB, TrustError when ``data`` holds no readable certificate or one that cannot be a
    trust anchor, InvalidInput for a bad alias, Conflict when a certificate or the alias is stored already.
    All-or-nothing: nothing is stored unless every certificate is accepted.
    """
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise TooLarge(
            f"'{source}' has {len(data)} bytes; a certificate file may have at most {MAX_CERTIFICATE_BYTES} bytes "
            "(1 MiB)",
            hint="upload only the CA certificate(s) of the internal mail server, PEM or DER",
        )
    if alias:
        try:
            validate_alias(alias)
        except ConfigurationError as exc:
            raise invalid(exc) from exc
    try:
        entries = state.truststore.add(data, alias=alias or None, source=source)
    except ConfigurationError as exc:
        if isinstance(exc.__cause__, OSError):
            raise  # the folder cannot be written: not the user's input
        raise Conflict(exc.message, hint=exc.hint) from exc  # stored already, alias taken, repeated in the file
    for entry in entries:
        state.audit.config_change(
            action="truststore-add", detail={"alias": entry.alias, "fingerprint": entry.info.fingerprint}, actor=actor
        )
    return entries


def remove_trusted(state: ConnectorState, alias: str, *, actor: str) -> TrustEntry:
    """Stop trusting the certificate with this alias or SHA-256 fingerprint; audited as ``truststore-remove``.

    Raises NotFound (naming the aliases) when there is none, TrustError when the alias names an unreadable file.
    """
    try:
        entry = state.truststore.remove(alias)
    except ConfigurationError as exc:
        if isinstance(exc.__cause__, OSError):
            raise
        raise NotFound(exc.message, hint=exc.hint) from exc
    state.audit.config_change(
        action="truststore-remove", detail={"alias": entry.alias, "fingerprint": entry.info.fingerprint}, actor=actor
    )
    return entry


# -- the running connector ------------------------------------------------------------------------------------------


def tunnel_status(connector: Connector) -> dict[str, Any]:
    """What the overview shows: the tunnel (hub, since when, RTT of the last PING, reconnects), the identity and
    the certificate's expiry. Never raises: an unreadable certificate is reported in ``certificate.error``."""
    session = connector.session
    up = session is not None and session.is_open
    last = connector.last_disconnect
    return {
        "connected": up,
        "hub": str(connector.cloud),
        "egress_proxy": connector.config.egress_proxy,
        "connected_since": _iso(session.connected_at) if session is not None and up else None,
        "rtt_ms": round(session.rtt_ms, 1) if session is not None and up and session.rtt_ms is not None else None,
        "active_streams": len(session.sinks) if session is not None and up else 0,
        "reconnects": connector.reconnects,
        "last_disconnect": {"time": _iso(last[0]), "reason": last[1]} if last else None,
        "started": _iso(connector.started_at),
        "connector_id": connector.identity.connector_id,
        "subaccount": connector.identity.subaccount,
        "location": connector.identity.location,
        "version": __version__,
        "log_level": log_level(),
        "certificate": _certificate_status(connector.state),
    }


def monitoring(connector: Connector) -> dict[str, Any]:
    """The live counters per virtual host (see :mod:`postbridge.connector.stats`)."""
    connector.mappings()  # so that mappings added a moment ago are listed, with zero counts
    return connector.stats.snapshot()


def log_level() -> str:
    """The running process's log level (debug, info, warning, error)."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


def set_log_level(state: ConnectorState, level: str, *, actor: str) -> str:
    """Change the running process's log level (stderr and ``trace.log``) and audit it (``trace-level``).

    Raises InvalidInput for a level that is not debug, info, warning or error. Not saved: a restart uses
    ``--log-level`` again.
    """
    name = (level or "").strip().lower()
    if name not in LOG_LEVELS:
        raise InvalidInput(f"unknown log level '{level}'", hint=f"use one of {', '.join(LOG_LEVELS)}")
    numeric = logging.getLevelName(name.upper())
    before = log_level()
    logging.getLogger().setLevel(numeric)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    if before != name:
        state.audit.config_change(action="trace-level", detail={"from": before, "to": name}, actor=actor)
    return name


def _certificate_status(state: ConnectorState) -> dict[str, Any]:
    try:
        certificate = state.certificate()
    except (OSError, PostbridgeError) as exc:
        return {"error": f"cannot read '{state.credentials_path}': {getattr(exc, 'message', exc)}"}
    info = describe(certificate)
    now = datetime.now(UTC)
    warning = expiry_warning(info, now) if info.not_after <= now else ""
    if not warning and remaining_lifetime_fraction(certificate, now) < RENEW_BELOW * 0.9:
        warning = (
            f"renewal is overdue (expires {info.not_after:%Y-%m-%d %H:%M} UTC): the connector renews by itself; "
            "look for 'certificate renewal failed' in its log"
        )
    return {
        "subject": info.subject,
        "not_after": info.not_after.isoformat(),
        "days_left": days_left(info, now),
        "warning": warning or None,
    }


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the web UI's administrator -------------------------------------------------------------------------------------


def admin_store(state: ConnectorState) -> AdminStore:
    """The connector UI's administrator password file, ``HOME/connector/admin.json``."""
    return AdminStore(state.dir / "admin.json", command=ADMIN_COMMAND)


def set_admin_password(state: ConnectorState, password: str, *, actor: str) -> None:
    """Set the web UI administrator's password (argon2id hash, file mode 0600) and audit that it changed.

    Raises ConfigurationError for a password shorter than 8 characters (nothing is changed then).
    """
    admin_store(state).set_password(password)
    state.audit.config_change(action="admin-password-set", detail={"user": "admin"}, actor=actor)
