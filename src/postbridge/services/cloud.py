"""The hub operator's operations, once: the CLI (``postbridge cloud …``), the cockpit's pages and its JSON API all
call :class:`CloudService`.

Owns: subaccounts (create, list, each with its connected connectors as the registry knows them), enrollment tokens
(create, list with expiry and use, revoke), issued connector certificates (list, revoke — a revoked connector's
tunnel is closed at once and refused when it comes back), the mail adapter's keystore (``HOME/keystore``: list,
upload, remove), credential names (never a secret), the connection test of a channel (directly or through this hub
with the hub's own binding) with "add the chain's anchor to the keystore" after a confirmed fingerprint, and the
flows runtime's health and message log read from its state store (``cloud serve --flows FILE``).

Every operation validates its input and raises the project's errors with the cause and the fix:
ConfigurationError (bad input; :class:`NotFound` and :class:`Conflict` refine it), TrustError (an unreadable or
unusable certificate), :class:`TooLarge` (an upload over the limit). Nothing here returns, logs or puts into a
message a secret — the client secret of a new subaccount and the text of a new enrollment token are handed back
once, to be shown once, and are never stored.

Must not: render HTML or JSON (the web layer does), print (the CLI does), or block the event loop with network I/O:
:meth:`CloudService.connection_test` and :meth:`CloudService.add_test_anchor` are blocking and must run in a thread.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError, HomeError
from postbridge.home import locked_update, read_json
from postbridge.mail.probe import ProbeReport, run_probe
from postbridge.mail.settings import (
    ChannelSettings,
    Proxy,
    channel_from_mapping,
)
from postbridge.runtime.config import RuntimeConfig
from postbridge.runtime.engine import flow_health_rows
from postbridge.runtime.flows_file import load_flows
from postbridge.runtime.launch import NamesOnly
from postbridge.runtime.store import MessageRecord, MessageStatus, RuntimeStore, open_store
from postbridge.services import Conflict, InvalidInput, NotFound, TooLarge, invalid
from postbridge.services.cloud_views import (
    AnchorAdded,
    CertificateView,
    ConnectionTestRequest,
    FlowView,
    KeystoreEntry,
    MessageDetail,
    NewSubaccount,
    NewToken,
    SubaccountView,
    TokenView,
)
from postbridge.trust import pki
from postbridge.trust.credentials import CredentialStore, summary
from postbridge.trust.server_chain import PresentedCertificate
from postbridge.trust.truststore import TrustStore

if TYPE_CHECKING:
    from postbridge.cloud.hub import Hub
    from postbridge.cloud.state import HubState

KEYSTORE_COMMAND = "postbridge keystore"
ADMIN_COMMAND = "postbridge cloud admin set-password"
MAX_CERTIFICATE_UPLOAD = 1024 * 1024  # bytes: a CA bundle of several hundred certificates still fits
MAX_TOKEN_TTL_MINUTES = 7 * 24 * 60
INFO_TIMEOUT = 1.0  # seconds to wait for a connector's fresh info before showing the cached one
MAX_MESSAGES = 1000
_ADDABLE_PROBLEMS = ("unknown-ca", "issuer-missing")


def admin_path(home: Path) -> Path:
    """The cockpit administrator's password file (its argon2id hash; written by ``cloud admin set-password``)."""
    return home / "cloud" / "admin.json"


def binding_document(state: HubState, subaccount: str, secret: str, socks: HostPort, api: HostPort) -> dict[str, Any]:
    """The JSON binding a cloud application needs (what ``postbridge cloud binding`` prints): the SOCKS5 address,
    the token URL, the client id and secret (a placeholder when ``secret`` is empty) and the hub's CA certificate.
    Raises HomeError when the hub was never initialised."""
    return {
        "subaccount": subaccount,
        "onpremise_proxy_host": socks.host,
        "onpremise_socks5_proxy_port": socks.port,
        "token_service_url": f"https://{api}/oauth/token",
        "clientid": subaccount,
        "clientsecret": secret or "<the secret printed by 'postbridge cloud subaccount add'>",
        "ca_certificate": state.ca_pem().decode(),
    }


def anchor_candidates(report: ProbeReport) -> list[PresentedCertificate]:
    """What 'add to keystore' would trust after this test: the anchor the server sent when the chain failed only
    for want of a trusted CA; empty otherwise."""
    chain = report.chain
    if chain is None or chain.trusted or chain.problem not in _ADDABLE_PROBLEMS:
        return []
    return chain.anchor_candidates()


def parse_since(text: str, now: float) -> float:
    """'30m', '2h', '1d', '45s' ago, or an ISO date/time (UTC unless it names a zone). Raises ConfigurationError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        return now - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"since '{text}' is neither a duration nor a date", hint="e.g. 30m, 2h, 1d or 2026-11-29T10:00"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class CloudService:
    """The operations on one hub home; ``hub`` is the running hub (connectors, revocation, the own binding) and
    ``flows_file`` the flows file whose runtime state the cockpit shows. Methods say what they raise."""

    def __init__(self, state: HubState, *, hub: Hub | None = None, flows_file: Path | None = None) -> None:
        self.state = state
        self.home = state.dir.parent
        self.hub = hub
        self.flows_file = flows_file

    # -- subaccounts ----------------------------------------------------------------------------------------------

    def add_subaccount(self, name: str) -> NewSubaccount:
        """Create a subaccount. Raises ConfigurationError for a bad name, Conflict for a taken one, HomeError when
        the hub was not initialised."""
        try:
            client_id, secret = self.state.add_subaccount(name.strip())
        except HomeError:
            raise
        except ConfigurationError as exc:
            if "already exists" in exc.message:
                raise Conflict(exc.message, hint=exc.hint) from exc
            raise invalid(exc) from exc
        return NewSubaccount(client_id, client_id, secret)

    def subaccounts(self) -> list[SubaccountView]:
        """Every subaccount, sorted, without connectors. Raises HomeError when the hub was never initialised."""
        subaccounts = self.state.subaccounts()
        return [SubaccountView(name, str(entry.get("created", ""))) for name, entry in sorted(subaccounts.items())]

    async def subaccounts_with_connectors(self) -> list[SubaccountView]:
        """Every subaccount with the connectors connected now, each with its mappings as it reports them (asked
        afresh, at most :data:`INFO_TIMEOUT` seconds; else the last answer). Call on the hub's event loop."""
        views = self.subaccounts()
        if self.hub is None:
            return views
        hub = self.hub
        entries = {view.name: hub.registry.of_subaccount(view.name) for view in views}
        everyone = [entry for listed in entries.values() for entry in listed]
        await asyncio.gather(*(hub.refresh_info(entry, timeout=INFO_TIMEOUT) for entry in everyone))
        return [
            replace(
                view,
                connectors=tuple(
                    {**entry.describe(), "certificate_serial": hub.serial_of(entry)} for entry in entries[view.name]
                ),
            )
            for view in views
        ]

    def _require_subaccount(self, name: str) -> None:
        if name not in self.state.subaccounts():
            raise NotFound(
                f"unknown subaccount '{name}'", hint=f"create it with 'postbridge cloud subaccount add {name}'"
            )

    # -- enrollment tokens ----------------------------------------------------------------------------------------

    def create_token(self, subaccount: str, location: str = "", ttl_minutes: float = 15) -> NewToken:
        """A one-time enrollment token valid for ``ttl_minutes`` (0 makes one that is expired at once, for tests).
        Raises ConfigurationError for a bad lifetime or location, NotFound for an unknown subaccount."""
        if not 0 <= ttl_minutes <= MAX_TOKEN_TTL_MINUTES:
            raise InvalidInput(
                f"token lifetime {ttl_minutes:g} minutes is not between 0 and {MAX_TOKEN_TTL_MINUTES} (7 days)",
                hint="tokens are meant to be used at once: 15 minutes is the default",
            )
        subaccount, location = subaccount.strip(), location.strip()
        self._require_subaccount(subaccount)
        token = self.state.create_enrollment(subaccount, location, ttl_minutes * 60)
        return NewToken(token.token_id, token.encode(), subaccount, location, token.expires_at)

    def tokens(self, *, now: float | None = None) -> list[TokenView]:
        """Enrollment tokens the hub remembers (expired ones are forgotten a day after expiry), newest expiry
        first; never their secret."""
        moment = time.time() if now is None else now
        stored: dict[str, Any] = read_json(self.state.enrollments_path, {}) or {}
        views = [_token_view(token_id, entry, moment) for token_id, entry in stored.items()]
        return sorted(views, key=lambda view: (-view.expires_at, view.token_id))

    def revoke_token(self, token_id: str) -> TokenView:
        """Make an unused token unusable at once (it then counts as expired when a connector presents it).
        Raises NotFound for an unknown id, Conflict for a token already used."""
        token_id = token_id.strip()
        result: dict[str, Any] = {}

        def update(current: dict[str, Any]) -> dict[str, Any]:
            entry = current.get(token_id)
            if entry is None:
                raise NotFound(
                    f"no enrollment token with id '{token_id}'", hint="the token list shows the ids of known tokens"
                )
            if entry.get("used"):
                raise Conflict(
                    f"enrollment token '{token_id}' was already used, so there is nothing to revoke",
                    hint="revoke the certificate of the connector it enrolled instead",
                )
            if not entry.get("revoked"):
                now = time.time()
                entry["revoked"] = True
                entry["expires_at"] = min(float(entry["expires_at"]), now)
            result.update(entry)
            return current

        locked_update(self.state.enrollments_path, update, default={})
        return _token_view(token_id, result, time.time())

    # -- connector certificates -----------------------------------------------------------------------------------

    def certificates(self) -> list[CertificateView]:
        """Issued connector certificates, newest first."""
        stored: dict[str, Any] = read_json(self.state.certificates_path, {}) or {}
        connected = self.hub.connected_serials() if self.hub is not None else set()
        views = [_certificate_view(serial, entry, serial in connected) for serial, entry in stored.items()]
        return sorted(views, key=lambda view: (view.issued, view.serial), reverse=True)

    def revoke_certificate(self, serial: str) -> CertificateView:
        """Revoke a connector certificate: its tunnel (when up) is closed now, and the hub refuses it from then on
        (connecting and renewing). Raises NotFound for a serial the hub never issued."""
        key = serial.strip().lower().removeprefix("0x").replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{1,40}", key):
            raise InvalidInput(
                f"certificate serial '{serial}' is not a hexadecimal number", hint="copy it from the certificate list"
            )
        key = key.lstrip("0") or "0"
        result: dict[str, Any] = {}

        def update(current: dict[str, Any]) -> dict[str, Any]:
            entry = current.get(key)
            if entry is None:
                raise NotFound(
                    f"this hub issued no connector certificate with serial '{serial}'",
                    hint="the certificate list shows the serials of issued certificates",
                )
            if not entry.get("revoked"):
                entry["revoked"] = True
                entry["revoked_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            result.update(entry)
            return current

        locked_update(self.state.certificates_path, update, default={})
        if self.hub is not None:
            self.hub.disconnect_certificate(int(key, 16), "its certificate was revoked by the hub operator")
        return _certificate_view(key, result, False)

    # -- keystore and credentials ---------------------------------------------------------------------------------

    @property
    def keystore_path(self) -> Path:
        return self.home / "keystore"

    def _keystore(self) -> TrustStore:
        return TrustStore(self.keystore_path, command=KEYSTORE_COMMAND)

    def keystore(self) -> list[KeystoreEntry]:
        """The certificates the mail adapter trusts. Raises TrustError naming a file that is not a certificate."""
        return [KeystoreEntry.of(entry) for entry in self._keystore().list()]

    def keystore_add(self, data: bytes, *, alias: str = "", source: str = "the upload") -> list[KeystoreEntry]:
        """Trust the CA certificate(s) in ``data`` (PEM, several PEM, or DER); all or nothing.

        Raises TooLarge over :data:`MAX_CERTIFICATE_UPLOAD` bytes, TrustError for data that holds no readable
        certificate or one that cannot be an anchor, ConfigurationError for a bad alias, Conflict for an alias
        or certificate that is there already."""
        if len(data) > MAX_CERTIFICATE_UPLOAD:
            raise TooLarge(
                f"{source} is {len(data)} bytes, more than the limit of {MAX_CERTIFICATE_UPLOAD} bytes",
                hint="upload the CA certificate(s) only (PEM or DER), not a whole bundle or archive",
            )
        if not data.strip():
            raise InvalidInput(f"{source} is empty", hint="choose a PEM or DER certificate file")
        try:
            added = self._keystore().add(data, alias=alias.strip() or None, source=source)
        except ConfigurationError as exc:
            if "already" in exc.message:
                raise Conflict(exc.message, hint=exc.hint) from exc
            raise
        return [KeystoreEntry.of(entry) for entry in added]

    def keystore_remove(self, alias: str) -> KeystoreEntry:
        """Stop trusting an entry (alias or SHA-256 fingerprint). Raises NotFound when there is none."""
        store = self._keystore()
        try:
            entry, _ = store.get(alias.strip())
        except ConfigurationError as exc:
            raise NotFound(exc.message, hint=exc.hint) from exc
        return KeystoreEntry.of(store.remove(entry.alias))

    def credentials(self) -> list[dict[str, str]]:
        """Names, kinds, users and dates of the credential store — never a secret. Raises ConfigurationError when
        the store cannot be opened (wrong or missing key)."""
        return [summary(entry) for entry in CredentialStore(self.home).list()]

    # -- connection test ------------------------------------------------------------------------------------------

    def test_channel(self, request: ConnectionTestRequest) -> ChannelSettings:
        """The channel a test request describes (the credential looked up by name; on-premise through this hub).
        Raises ConfigurationError for bad settings, an unknown credential or subaccount, or no running hub."""
        if not request.address:
            raise InvalidInput("the server address is missing", hint="e.g. mail.corp.example:143")
        if request.auth not in ("", "none") and not request.credential:
            raise InvalidInput(
                f"authentication '{request.auth}' needs a credential name",
                hint="choose one of the credential store's names, or set auth to 'none'",
            )
        data: dict[str, Any] = {
            "address": request.address, "protection": request.protection, "auth": request.auth,
            "credential": request.credential, "tls_server_name": request.tls_server_name,
            "keystore": str(self.keystore_path), "timeout": request.timeout,
        }  # fmt: skip
        store = CredentialStore(self.home)
        if request.credential and request.credential not in {entry.name for entry in store.list()}:
            raise NotFound(
                f"no credential named '{request.credential}' in the hub's credential store",
                hint=f"add it on the hub with 'postbridge credentials add {request.credential} --user USER'",
            )
        try:
            channel = channel_from_mapping(
                {key: value for key, value in data.items() if value not in ("", None)},
                source="the connection test",
                credentials=store,
            )
        except ConfigurationError as exc:
            raise invalid(exc) from exc
        if request.proxy != Proxy.ON_PREMISE.value:
            return channel
        if self.hub is None:
            raise ConfigurationError(
                "an on-premise test needs the running hub", hint="run the test from the cockpit of 'cloud serve'"
            )
        if not request.subaccount:
            raise InvalidInput(
                "an on-premise test needs the subaccount whose connectors to use", hint="choose a subaccount"
            )
        self._require_subaccount(request.subaccount)
        try:
            location = pki.validate_name(request.location_id, "location ID", allow_empty=True)
        except ConfigurationError as exc:
            raise invalid(exc) from exc
        binding = self.hub.own_binding(request.subaccount)
        return replace(channel, proxy=Proxy.ON_PREMISE, location_id=location, binding=binding)

    def connection_test(self, request: ConnectionTestRequest) -> ProbeReport:
        """Run the connection test step by step (blocking: call it in a thread). What the test finds is in the
        report; raises ConfigurationError only for settings that cannot describe a channel."""
        return run_probe(request.kind, self.test_channel(request), check_auth=request.check_auth)

    def add_test_anchor(self, request: ConnectionTestRequest, fingerprint: str) -> AnchorAdded:
        """Fetch the server's chain again and trust its anchor — only if it still has the SHA-256 ``fingerprint``
        the operator confirmed — then run the test again (blocking: call it in a thread).

        Raises ConfigurationError for a bad fingerprint or when adding would not help (the test did not reach TLS,
        or the chain fails for another reason), Conflict when the chain is trusted already or the server now sends
        a different certificate."""
        wanted = pki.parse_fingerprint(fingerprint)
        report = self.connection_test(request)
        _check_addable(report)
        candidates = anchor_candidates(report)
        if not candidates:
            raise ConfigurationError(
                "the server sent only its own certificate, so there is no CA certificate to add",
                hint="get the root CA certificate from the mail server's administrator and upload it to the keystore",
            )
        chosen = [cert for cert in candidates if cert.info.fingerprint == wanted]
        if not chosen:
            shown = ", ".join(cert.info.fingerprint for cert in candidates)
            raise Conflict(
                f"the server now presents a CA certificate with SHA-256 {shown}, not the confirmed {wanted}",
                hint="run the test again and compare the new fingerprint with the server's administrator",
            )
        added: list[KeystoreEntry] = []
        for cert in chosen:
            source = f"the chain of {request.address}"
            added += self.keystore_add(cert.pem.encode("ascii"), source=source)
        return AnchorAdded(tuple(added), self.connection_test(request))

    # -- flows runtime --------------------------------------------------------------------------------------------

    def flows_config(self) -> RuntimeConfig:
        """The flows file given to ``cloud serve --flows``. Raises NotFound when none was given, and what
        :func:`load_flows` raises (FlowsFileError lists every problem)."""
        if self.flows_file is None:
            raise NotFound(
                "the cockpit shows no flows: the hub was started without a flows file",
                hint="start it with 'postbridge cloud serve --flows FLOWS.toml'",
            )
        return load_flows(self.flows_file, credentials=NamesOnly(CredentialStore(self.home)))

    def _store(self) -> RuntimeStore:
        return open_store(self.flows_config().state, home=self.home)

    def flows(self, *, now: float | None = None) -> list[FlowView]:
        """Health of every flow from the shared state store (as ``postbridge flows status`` judges it)."""
        config = self.flows_config()
        store = open_store(config.state, home=self.home)
        try:
            rows = flow_health_rows(config, store, time.time() if now is None else now)
        finally:
            store.close()
        return [_flow_view(row) for row in rows]

    def messages(
        self, *, flow: str = "", status: str = "", since: str = "", search: str = "", limit: int = 100
    ) -> list[MessageRecord]:
        """The message processing log, newest first, filtered. Raises ConfigurationError for a bad status,
        since or limit."""
        wanted = None
        if status.strip():
            try:
                wanted = MessageStatus(status.strip())
            except ValueError:
                raise InvalidInput(
                    f"status '{status}' is not one of: {', '.join(s.value for s in MessageStatus)}"
                ) from None
        if not 1 <= limit <= MAX_MESSAGES:
            raise InvalidInput(f"limit {limit} is not between 1 and {MAX_MESSAGES}")
        moment = parse_since(since, time.time()) if since.strip() else None
        store = self._store()
        try:
            return store.list(
                flow=flow.strip() or None, status=wanted, since=moment, text=search.strip() or None, limit=limit
            )
        finally:
            store.close()

    def message(self, key: str) -> list[MessageDetail]:
        """Every message (of any flow) with this key or idempotency key, with its attempts. Raises NotFound."""
        store = self._store()
        try:
            details = [
                MessageDetail(record, tuple(store.attempts(record.flow, record.key))) for record in store.find(key)
            ]
        finally:
            store.close()
        if not details:
            raise NotFound(
                f"no message with key or idempotency key '{key}' in the log",
                hint="pick one from the message log",
            )
        return details


def _check_addable(report: ProbeReport) -> None:
    if report.chain is None:
        raise ConfigurationError(
            "no certificate chain: the test did not get as far as a TLS handshake", hint="fix the failing step first"
        )
    if report.chain.trusted:
        raise Conflict("the chain is already trusted: nothing to add", hint="run the connection test again")
    if report.chain.problem not in _ADDABLE_PROBLEMS:
        raise ConfigurationError(
            f"adding a certificate would not help: {report.chain.cause}",
            hint=report.chain.fix or "see the failing step",
        )


def _token_view(token_id: str, entry: Mapping[str, Any], now: float) -> TokenView:
    used, revoked = bool(entry.get("used")), bool(entry.get("revoked"))
    expires_at = float(entry.get("expires_at", 0))
    status = "revoked" if revoked else "used" if used else "expired" if expires_at < now else "unused"
    return TokenView(
        token_id, str(entry.get("subaccount", "")), str(entry.get("location", "")), expires_at, used, revoked, status
    )


def _certificate_view(serial: str, entry: Mapping[str, Any], connected: bool) -> CertificateView:
    return CertificateView(
        serial, str(entry.get("subaccount", "")), str(entry.get("location", "")), str(entry.get("connector_id", "")),
        str(entry.get("not_after", "")), str(entry.get("issued", "")), bool(entry.get("revoked")),
        str(entry.get("revoked_at", "")), connected,
    )  # fmt: skip


def _flow_view(row: Mapping[str, Any]) -> FlowView:
    counts = {status.value: int(row.get(status.value.replace("-", "_"), 0)) for status in MessageStatus}
    if not row["enabled"]:
        status = "disabled"
    elif row["consecutive_failures"]:
        status = "failing"
    elif not row["healthy"]:
        status = "stale"
    else:
        status = "healthy"
    return FlowView(
        row["flow"], bool(row["enabled"]), status, str(row["owner"]), row["last_poll"], row["last_success"],
        str(row["last_error"]), int(row["consecutive_failures"]), float(row["stale_after"]),
        counts[MessageStatus.RETRYING.value], counts,
    )  # fmt: skip
