"""The cloud hub service: tunnel listener, SOCKS5 listener and HTTP API (with the cockpit) wired together.

The hub is the :class:`SocksGate` of the SOCKS listener (authentication and routing) and the owner of the connector
registry. Start it with :meth:`Hub.start` inside an ``AsyncExitStack``; the stack's exit drains and closes all.

For the cockpit the hub also knows which certificate each tunnel was opened with (to close the tunnel of a revoked
certificate at once), and has its own binding per subaccount: the cockpit's connection test goes through this
hub's SOCKS5 proxy like any cloud application, authenticated with a random secret that lives only in this
process's memory (it is never written, logged or shown) instead of the subaccount's client secret, which the hub
does not know (it keeps a digest).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbridge.addresses import HostPort
from postbridge.cloud import tokens
from postbridge.cloud.registry import ConnectedConnector, Registry
from postbridge.cloud.state import EnrollmentToken, HubState
from postbridge.cloud.tunnel_listener import EnrollmentService, TunnelAcceptor, server_context
from postbridge.errors import AuthenticationError, PostbridgeError, StreamRefused, TrustError
from postbridge.mail.settings import Binding
from postbridge.socks.listener import Principal, SocksConnection
from postbridge.trust import pki
from postbridge.tunnel.protocol import Role
from postbridge.tunnel.session import TunnelSession

log = logging.getLogger("postbridge.hub")

BACKLOG = 4096  # bursts of thousands of cloud clients must not see dropped SYNs (asyncio's default is 100)


@dataclass(frozen=True)
class HubConfig:
    tunnel_listen: HostPort
    socks_listen: HostPort
    api_listen: HostPort | None = None
    handshake_timeout: float = 10.0
    ping_interval: float = 10.0
    dead_after: float = 30.0
    drain_grace: float = 10.0
    flows_file: Path | None = None  # the cockpit shows this runtime's flows and message log


class Hub:
    """One running hub."""

    def __init__(self, state: HubState, config: HubConfig) -> None:
        self.state = state
        self.config = config
        self.registry = Registry()
        self.tunnel_address: HostPort | None = None
        self.socks_address: HostPort | None = None
        self.api_address: HostPort | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serials: dict[TunnelSession, int] = {}  # the certificate each open tunnel was opened with
        self._own_secret = secrets.token_urlsafe(32)  # the own binding's password: in memory only

    # -- SocksGate ----------------------------------------------------------------------------------------------

    def authenticate_password(self, username: str, password: str) -> Principal:
        subaccount, _, location = username.partition("/")
        self._verify_client(subaccount, password)
        return Principal(subaccount, location)

    def _verify_client(self, client_id: str, secret: str) -> str:
        """The subaccount's client secret, or this process's own secret for an existing subaccount."""
        if hmac.compare_digest(secret.encode(), self._own_secret.encode()):
            if client_id in self.state.subaccounts():
                return client_id
            raise AuthenticationError(f"client id '{client_id}' or its secret is wrong", hint="check the subaccount")
        return self.state.verify_client(client_id, secret)

    def own_binding(self, subaccount: str) -> Binding:
        """How a client inside this process reaches this hub for ``subaccount`` (the cockpit's connection test):
        the SOCKS5 and API addresses on loopback when the hub listens on all addresses, and the in-memory secret.
        Raises PostbridgeError when the hub is not started."""
        if self.socks_address is None:
            raise PostbridgeError("the hub is not running", hint="start it with 'postbridge cloud serve'")
        api = _reachable(self.api_address) if self.api_address else None
        return Binding(
            socks=_reachable(self.socks_address),
            subaccount=subaccount,
            client_secret=self._own_secret,
            ca_certificate=self.state.ca_pem().decode(),
            token_url=f"https://{api}/oauth/token" if api else "",
        )

    def serial_of(self, entry: ConnectedConnector) -> str:
        """The serial (hex) of the certificate ``entry``'s tunnel was opened with ("" when unknown)."""
        serial = self._serials.get(entry.session)
        return "" if serial is None else format(serial, "x")

    def connected_serials(self) -> set[str]:
        return {format(serial, "x") for session, serial in self._serials.items() if session.is_open}

    def disconnect_certificate(self, serial: int, reason: str) -> int:
        """Close every tunnel opened with certificate ``serial`` now; returns how many were closed."""
        sessions = [session for session, known in self._serials.items() if known == serial and session.is_open]
        for session in sessions:
            log.warning("closing the tunnel of %s: %s", session.peer, reason)
            session.close(reason)
        return len(sessions)

    def authenticate_jwt(self, token: str, location: str) -> Principal:
        return Principal(tokens.verify(self.state.jwt_key(), token), location)

    def route(self, principal: Principal, target: HostPort) -> TunnelSession:
        entry = self.registry.pick(principal.subaccount, principal.location)
        if entry is not None:
            return entry.session
        connected = self.registry.locations(principal.subaccount)
        where = f"location ID '{principal.location}'" if principal.location else "the default location (no location ID)"
        if connected:
            listed = ", ".join(repr(loc) if loc else "(default)" for loc in connected)
            hint = f"connected locations of subaccount '{principal.subaccount}': {listed} — check the location ID"
        else:
            hint = (
                f"no connector of subaccount '{principal.subaccount}' is connected — start 'postbridge connector run'"
            )
        raise StreamRefused(
            f"no connector connected for subaccount '{principal.subaccount}' at {where}",
            reason="no-connector",
            socks_reply=0x03,
            hint=hint,
        )

    # -- tunnels ------------------------------------------------------------------------------------------------

    def _on_tunnel(
        self, acceptor: TunnelAcceptor, transport: asyncio.Transport, peer_cert: dict[str, Any], serial: int
    ) -> None:
        try:
            identity = pki.ConnectorIdentity.from_peercert(peer_cert)
        except TrustError as exc:
            log.warning("tunnel from %s refused: %s", acceptor.peer, exc)
            transport.abort()
            return
        if self.state.certificate_revoked(serial):
            refused = TunnelSession(Role.HUB, peer=acceptor.peer)
            acceptor.hand_over(transport, refused)
            refused.close("connector certificate is revoked or unknown to this hub - enroll the connector again")
            log.warning(
                "tunnel from %s refused: certificate %x of connector %s is revoked or unknown",
                acceptor.peer,
                serial,
                identity.connector_id,
            )
            return
        session = TunnelSession(
            Role.HUB,
            peer=f"{identity.connector_id}@{acceptor.peer}",
            ping_interval=self.config.ping_interval,
            dead_after=self.config.dead_after,
        )
        entry = ConnectedConnector(identity, session, acceptor.peer)
        acceptor.hand_over(transport, session)
        self.registry.register(entry)
        self._serials[session] = serial
        session.closed.add_done_callback(lambda _: self._forget(entry))
        self._spawn(self.refresh_info(entry), f"info {identity.connector_id}")

    def _forget(self, entry: ConnectedConnector) -> None:
        self.registry.unregister(entry)
        self._serials.pop(entry.session, None)

    async def refresh_info(self, entry: ConnectedConnector, *, timeout: float = 15.0) -> dict[str, Any]:
        """Ask a connector for its version, location and mappings (cached for the API); on failure keep the cache."""
        try:
            answer = await entry.session.control("GET", "/v1/info", timeout=timeout)
            entry.info = json.loads(answer.body)
        except (PostbridgeError, ValueError) as exc:
            log.warning("could not read info of connector %s: %s", entry.identity.connector_id, exc)
        return entry.info

    def _issue(self, csr: bytes, identity: pki.ConnectorIdentity) -> bytes:
        ca_key, ca_cert = self.state.ca()
        cert = pki.issue_connector_certificate(ca_key, ca_cert, csr, identity)
        self.state.record_certificate(cert, identity)
        return pki.cert_pem(cert)

    def _redeem(self, text: str) -> tuple[str, str]:
        return self.state.redeem_enrollment(EnrollmentToken.decode(text))

    # -- service ------------------------------------------------------------------------------------------------

    async def start(self, stack: AsyncExitStack) -> None:
        """Open all listeners; they close when ``stack`` exits."""
        loop = asyncio.get_running_loop()
        state = self.state
        context = server_context(str(state.server_chain_path), str(state.server_key_path), str(state.ca_cert_path))
        enrollment = EnrollmentService(state.ca_pem, self._redeem, self._issue, state.certificate_revoked)
        tunnel_server = await loop.create_server(
            lambda: TunnelAcceptor(context, enrollment, self._on_tunnel, self.config.handshake_timeout),
            self.config.tunnel_listen.host,
            self.config.tunnel_listen.port,
            backlog=BACKLOG,
        )
        stack.push_async_callback(_close_server, tunnel_server)
        self.tunnel_address = _bound(tunnel_server, self.config.tunnel_listen)
        # exit runs in reverse: API, then the SOCKS listener (no new clients), then draining the tunnels
        stack.push_async_callback(self._shutdown_sessions)
        socks_server = await loop.create_server(
            lambda: SocksConnection(self, handshake_timeout=self.config.handshake_timeout),
            self.config.socks_listen.host,
            self.config.socks_listen.port,
            backlog=BACKLOG,
        )
        stack.push_async_callback(_close_server, socks_server)
        self.socks_address = _bound(socks_server, self.config.socks_listen)
        if self.config.api_listen is not None:
            from postbridge.cloud.api import serve_api

            self.api_address = await serve_api(self, self.config.api_listen, stack)
        log.info(
            "hub listening: tunnel %s, SOCKS5 %s, API %s",
            self.tunnel_address,
            self.socks_address,
            f"https://{self.api_address}" if self.api_address else "off",
        )

    async def _shutdown_sessions(self) -> None:
        """Drain: no new streams, running ones get ``drain_grace`` seconds, then GOAWAY."""
        for task in list(self._tasks):
            task.cancel()
        entries = self.registry.all()
        if entries:
            streams = sum(len(e.session.sinks) for e in entries)
            log.info(
                "draining %d tunnel(s) with %d open stream(s), up to %g s",
                len(entries),
                streams,
                self.config.drain_grace,
            )
        await asyncio.gather(
            *(e.session.shutdown("hub is shutting down", grace=self.config.drain_grace) for e in entries)
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def token_for(self, client_id: str, secret: str) -> tuple[str, int]:
        subaccount = self._verify_client(client_id, secret)
        return tokens.issue(self.state.jwt_key(), subaccount), tokens.DEFAULT_TTL

    def subaccount_of_bearer(self, token: str) -> str:
        """The subaccount of a valid bearer JWT; raises AuthenticationError otherwise."""
        return tokens.verify(self.state.jwt_key(), token)


def _reachable(address: HostPort) -> HostPort:
    """``address`` as a client on this machine dials it: the wildcard addresses become loopback."""
    loopback = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    return HostPort(loopback.get(address.host, address.host), address.port)


def _bound(server: asyncio.Server, wanted: HostPort) -> HostPort:
    sockname = server.sockets[0].getsockname()
    return HostPort(wanted.host, int(sockname[1]))


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()
