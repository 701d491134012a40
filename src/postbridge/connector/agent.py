"""The running connector: keeps the tunnel to the hub up and serves its requests (deny by default).

* Every CONNECT is checked against the mappings (re-read whenever ``mappings.json`` changed, so a mapping added
  with the CLI works at once and the tunnel stays up); unmapped targets are refused with ``not-allowed`` and an
  "Access Denied" audit record; mapped ones are dialled (TCP, or TLS verified against the backend trust store) and
  answered only after the internal host is connected.
* Control requests: ``GET /v1/info`` (version, identity, mappings) and ``POST /v1/check`` (availability check).
* Reconnects with full-jitter exponential backoff (``backoff_base`` .. ``backoff_cap``), renews its certificate when
  a third of its lifetime is left, and drains on shutdown.
* Counts what happens to every CONNECT in :attr:`Connector.stats` (:mod:`postbridge.connector.stats`) and keeps
  the tunnel's state (hub, since when, round-trip time, reconnects) for the web UI, which it serves in the same
  event loop when ``ui_listen`` is set (:mod:`postbridge.web.connector_server`).

This module must not parse SOCKS or HTTP/2 itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbridge import __version__
from postbridge.addresses import HostPort, parse_host_port
from postbridge.connector import enroll as enrollment
from postbridge.connector.check import check_mapping
from postbridge.connector.dialer import BackendError, open_backend
from postbridge.connector.mappings import Mapping, normalize_virtual
from postbridge.connector.state import ConnectorState
from postbridge.connector.stats import ConnectorStats
from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.trust import pki
from postbridge.tunnel import protocol as tp
from postbridge.tunnel.bridge import StreamBridge
from postbridge.tunnel.session import TunnelSession

log = logging.getLogger("postbridge.connector")

RENEW_BELOW = 1 / 3


@dataclass(frozen=True)
class ConnectorConfig:
    cloud: HostPort | None = None  # overrides the address stored at enrollment
    egress_proxy: str | None = None
    connect_timeout: float = 10.0
    backend_timeout: float = 10.0
    ping_interval: float = 10.0
    dead_after: float = 30.0
    backoff_base: float = 0.5
    backoff_cap: float = 5.0
    ui_listen: HostPort | None = None  # serve the web UI here
    ui_tls: bool | None = None  # HTTPS for the UI; None: plain HTTP on a loopback address, HTTPS elsewhere
    ui_cert: Path | None = None  # the UI's server certificate chain (PEM; the key in it or in ui_key)
    ui_key: Path | None = None


class _CountedBridge(StreamBridge):
    """A StreamBridge that reports its backend connection's life to the connector's stats."""

    def __init__(self, stats: ConnectorStats, virtual: str) -> None:
        super().__init__()
        self._stats = stats
        self._virtual = virtual

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._stats.connected(self._virtual, self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._stats.disconnected(self._virtual, self)


class Connector:
    """The connector agent. ``run()`` until ``stop`` is set; it is the SessionHandler of every tunnel session."""

    def __init__(self, state: ConnectorState, config: ConnectorConfig) -> None:
        self.state = state
        self.config = config
        self.enrollment = state.enrollment()
        self.identity = self.enrollment.identity
        self.cloud = config.cloud or self.enrollment.cloud
        self.session: TunnelSession | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.started_at = time.time()
        self.last_disconnect: tuple[float, str] | None = None  # (when, why) the last tunnel ended
        self.stats = ConnectorStats()
        self.ui_address: HostPort | None = None
        self._mappings: dict[HostPort, Mapping] = {}
        self._mappings_version: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- mappings -----------------------------------------------------------------------------------------------

    def mappings(self) -> dict[HostPort, Mapping]:
        """Current mappings; re-read when the file changed (one stat per call). A broken file keeps the old ones."""
        version = self.state.mappings.version()
        if version != self._mappings_version:
            try:
                self._mappings = self.state.mappings.load()
                if self._mappings_version is not None:
                    log.info("mappings reloaded: %d mapping(s)", len(self._mappings))
                self.stats.set_mapped({str(virtual) for virtual in self._mappings})
            except ConfigurationError as exc:
                log.error("mappings file changed but cannot be read, keeping the previous mappings: %s", exc)
            self._mappings_version = version
        return self._mappings

    # -- SessionHandler -----------------------------------------------------------------------------------------

    def connect_requested(self, session: TunnelSession, event: tp.ConnectRequested) -> None:
        mapping = self.mappings().get(event.target)
        audit = {
            "subaccount": self.identity.subaccount,
            "location": self.identity.location,
            "virtual": str(event.target),
            "trace_id": event.trace_id,
        }
        if mapping is None or not mapping.enabled:
            why = "mapping is disabled" if mapping else "no mapping"
            self.state.audit.access(allowed=False, internal=None, reason=why, **audit)
            where = f"location '{self.identity.location}'" if self.identity.location else "the default location"
            message = (
                f"{why} for virtual host '{event.target}' at {where} — add one with "
                f"'postbridge connector mapping add {event.target} --to HOST:PORT'"
            )
            log.warning("Access Denied: %s (trace %s)", message, event.trace_id)
            self.stats.denied(str(normalize_virtual(event.target)), why)
            session.refuse(event.stream_id, "not-allowed", message)
            return
        self.state.audit.access(allowed=True, internal=str(mapping.internal), **audit)
        self._spawn(self._dial(session, event, mapping), f"dial {event.target} {event.trace_id}")

    async def _dial(self, session: TunnelSession, event: tp.ConnectRequested, mapping: Mapping) -> None:
        bridge = _CountedBridge(self.stats, str(mapping.virtual))
        bridge.bind(session, event.stream_id)
        started = time.monotonic()
        try:
            transport, _ = await open_backend(
                mapping,
                lambda: bridge,
                tls_context=self.state.truststore.ssl_context,
                timeout=self.config.backend_timeout,
            )
        except BackendError as exc:
            log.warning("%s -> %s: %s (trace %s)", event.target, mapping.internal, exc, event.trace_id)
            self.stats.failed(str(mapping.virtual), exc.message)
            session.refuse(event.stream_id, exc.reason, str(exc))
            return
        if bridge.stream_closed or not session.is_open:
            transport.close()  # the cloud client gave up while we were connecting
            return
        early, flow = session.accept(event.stream_id)
        log.debug(
            "Access Allowed: %s -> %s (%s) connected in %.1f ms (trace %s)",
            event.target,
            mapping.internal,
            mapping.protocol.value,
            (time.monotonic() - started) * 1000,
            event.trace_id,
        )
        if early or flow:
            bridge.tunnel_data(early, flow)
        bridge.start()

    def control_requested(self, session: TunnelSession, event: tp.ControlRequested) -> None:
        if event.path == "/v1/info":
            session.answer(event.stream_id, 200, json.dumps(self.info()).encode())
        else:
            self._spawn(self._check(session, event), f"check {event.stream_id}")

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "connector_id": self.identity.connector_id,
            "subaccount": self.identity.subaccount,
            "location": self.identity.location,
            "mappings": [m.to_json() for m in sorted(self.mappings().values(), key=lambda m: m.virtual)],
        }

    async def _check(self, session: TunnelSession, event: tp.ControlRequested) -> None:
        try:
            request = json.loads(event.body or b"{}")
            virtual = parse_host_port(str(request.get("virtual", "")), what="virtual host")
        except (ValueError, ConfigurationError) as exc:
            session.answer(event.stream_id, 400, json.dumps({"error": str(exc)}).encode())
            return
        mapping = self.mappings().get(virtual)
        if mapping is None:
            body = {"error": f"no mapping for virtual host '{virtual}'", "mapped": False}
            session.answer(event.stream_id, 404, json.dumps(body).encode())
            return
        result = await check_mapping(mapping, tls_context=self.state.truststore.ssl_context)
        session.answer(event.stream_id, 200, json.dumps(result.to_json()).encode())

    # -- running ------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a tunnel up until ``stop`` is set; then drain and close.

        With ``config.ui_listen`` the web UI is served first (ConfigurationError when it cannot listen there).
        """
        async with AsyncExitStack() as stack:
            config = self.config
            if config.ui_listen is not None:
                # imported here: the web stack (FastAPI, Jinja2) is loaded only by a connector that serves the UI
                from postbridge.web.connector_server import UiCertificate, serve_ui

                certificate = UiCertificate(config.ui_cert, config.ui_key) if config.ui_cert is not None else None
                self.ui_address = await serve_ui(
                    self, config.ui_listen, stack, tls=config.ui_tls, certificate=certificate
                )
            await self._run_tunnel(stop)

    async def _run_tunnel(self, stop: asyncio.Event) -> None:
        attempt = 0
        renewal = self._spawn(self._renewal_loop(stop), "certificate renewal")
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    session = await self._connect()
                except PostbridgeError as exc:
                    log.warning("cannot reach the hub at %s: %s", self.cloud, exc)
                else:
                    attempt = 0
                    await self._serve(session, stop)
                    if stop.is_set():
                        break
                    if time.monotonic() - started < 1.0:
                        attempt += 1  # a session that dies at once counts as a failed attempt
                    self.reconnects += 1
                delay = random.uniform(0, min(self.config.backoff_cap, self.config.backoff_base * 2**attempt))
                attempt += 1
                log.info("reconnecting to %s in %.2f s", self.cloud, delay)
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            renewal.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _connect(self) -> TunnelSession:
        context = self.state.tunnel_context()
        sock = await enrollment.open_socket(self.cloud, self.config.egress_proxy, self.config.connect_timeout)
        loop = asyncio.get_running_loop()
        peer = str(self.cloud)

        def factory() -> TunnelSession:
            return TunnelSession(
                tp.Role.CONNECTOR,
                peer=peer,
                handler=self,
                ping_interval=self.config.ping_interval,
                dead_after=self.config.dead_after,
            )

        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, session = await loop.create_connection(
                    factory, sock=sock, ssl=context, server_hostname=self.cloud.host
                )
        except TimeoutError as exc:
            sock.close()
            raise PostbridgeError(f"TLS handshake with {self.cloud} timed out") from exc
        except OSError as exc:
            sock.close()
            raise PostbridgeError(f"TLS with {self.cloud} failed: {exc}", hint=_tls_hint(exc)) from exc
        return session

    async def _serve(self, session: TunnelSession, stop: asyncio.Event) -> None:
        self.session = session
        self.connected.set()
        via = f" via {self.config.egress_proxy}" if self.config.egress_proxy else ""
        log.info(
            "tunnel up to %s%s as connector %s (subaccount %s, location %r)",
            self.cloud,
            via,
            self.identity.connector_id,
            self.identity.subaccount,
            self.identity.location,
        )
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([session.closed, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and session.is_open:
                log.info("shutting down: draining %d open stream(s)", len(session.sinks))
                await session.shutdown("connector is shutting down")
            else:
                log.warning("tunnel to %s lost: %s", self.cloud, session.close_reason)
                self.last_disconnect = (time.time(), session.close_reason)
        finally:
            stopping.cancel()
            self.connected.clear()
            self.session = None

    async def _renewal_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if pki.remaining_lifetime_fraction(self.state.certificate()) < RENEW_BELOW:
                    await enrollment.renew(self.state, cloud=self.cloud, egress_proxy=self.config.egress_proxy)
            except PostbridgeError as exc:
                log.error("certificate renewal failed, will retry in 10 minutes: %s", exc)
                await asyncio.sleep(600)
                continue
            await asyncio.sleep(3600)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s crashed", task.get_name(), exc_info=task.exception())


def _tls_hint(exc: OSError) -> str:
    text = str(exc)
    if "certificate" in text and "unknown" in text:
        return "the hub no longer accepts this connector's certificate (revoked or expired): enroll again"
    if "verify failed" in text:
        return "the hub's certificate does not match the CA pinned at enrollment or the host name: check --cloud"
    return "check that HOST:PORT is the hub's tunnel port"
