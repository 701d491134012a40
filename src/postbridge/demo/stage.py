"""The demo's running parts: the lab mail server, a cloud hub with its cockpit, and a connector with its web UI.

Owns starting them in the caller's event loop on 127.0.0.1 (every one registered on the caller's
``AsyncExitStack``), the demo home's layout (``lab/``, ``cloud/`` and ``connector/``; the last two are ordinary
postbridge homes a user may point ``--home`` at), the subaccount, its binding file, the credential store entries of
the lab users, the two web administrators' passwords, and :meth:`Stage.channel`: the settings of a mail channel
that reaches the lab through the hub and the connector, as a cloud application configures it.

Must not: print (it returns what it did), listen anywhere but loopback, or touch a folder outside the demo home.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from postbridge.addresses import HostPort
from postbridge.cloud.hub import Hub, HubConfig
from postbridge.cloud.state import HubState
from postbridge.connector.agent import Connector, ConnectorConfig
from postbridge.connector.enroll import enroll
from postbridge.connector.state import ConnectorState
from postbridge.demo.cases import LOCATION, PASSWORDS, SUBACCOUNT
from postbridge.errors import PostbridgeError
from postbridge.home import private_dir, write_json
from postbridge.lab.server import LabServer
from postbridge.mail.settings import AuthMethod, Binding, ChannelSettings, Protection, Proxy
from postbridge.services import connector as connector_service
from postbridge.services.cloud import CloudService, admin_path, binding_document
from postbridge.trust.credentials import CredentialStore, PasswordEntry
from postbridge.web.auth import AdminStore

log = logging.getLogger("postbridge.demo")

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT = 5.0
LISTED_TIMEOUT = 8.0
ENROLL_TTL = 15 * 60.0
CHANNEL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
ACTOR = "demo"
FLOWS_NAME = "flows.toml"
BINDING_NAME = "binding.json"


@dataclass(frozen=True)
class Enrolled:
    connector_id: str
    seconds: float  # redeeming the token
    listed_after: float  # from starting the connector until the hub's registry lists it


async def stop_task(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Set ``stop`` and give ``task`` a moment to finish by itself; cancel it when it does not."""
    stop.set()
    await asyncio.wait([task], timeout=CLOSE_TIMEOUT)
    if not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CLOSE_TIMEOUT)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("%s ended with an error", task.get_name(), exc_info=task.exception())


class Stage:
    """The parts of the demo, started one after the other by the story's first step."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.cloud_home = home / "cloud"
        self.connector_home = home / "connector"
        self.lab = LabServer(home / "lab")
        self.hub_state = HubState(self.cloud_home)
        self.connector_state = ConnectorState(self.connector_home)
        self.secret = ""
        self.connector_password = secrets.token_urlsafe(12)
        self.cockpit_password = secrets.token_urlsafe(12)
        self._hub: Hub | None = None
        self._connector: Connector | None = None
        self._binding: Binding | None = None

    # -- the parts ------------------------------------------------------------------------------------------------

    async def start_lab(self, stack: AsyncExitStack) -> LabServer:
        """Start the lab mail server. Raises ConfigurationError (a port taken, the folder not writable)."""
        await self.lab.start()
        stack.push_async_callback(self.lab.aclose)
        return self.lab

    async def start_hub(self, stack: AsyncExitStack) -> Hub:
        """Initialise the hub's home (CA, server certificate, subaccount, cockpit password) and start it with its
        tunnel, SOCKS5 and API (cockpit) listeners on free loopback ports, and write the binding file."""
        private_dir(self.cloud_home)
        self.hub_state.init(["localhost", LOOPBACK])
        _, self.secret = self.hub_state.add_subaccount(SUBACCOUNT)
        AdminStore(admin_path(self.cloud_home)).set_password(self.cockpit_password)
        any_port = HostPort(LOOPBACK, 0)
        config = HubConfig(
            tunnel_listen=any_port, socks_listen=any_port, api_listen=any_port, flows_file=self.flows_path
        )
        hub = Hub(self.hub_state, config)
        await hub.start(stack)
        self._hub = hub
        document = binding_document(self.hub_state, SUBACCOUNT, self.secret, self.socks_address, self.api_address)
        write_json(self.binding_path, document)
        self._binding = Binding.from_json(document, source=str(self.binding_path))
        return hub

    async def start_connector(self, stack: AsyncExitStack) -> Enrolled:
        """Enroll a connector with a one-time token and run it (with its web UI) until ``stack`` exits; returns
        once the hub lists it. Raises PostbridgeError when enrolling fails or the hub does not list it in time."""
        hub = self.hub
        assert hub.tunnel_address is not None
        token = self.hub_state.create_enrollment(SUBACCOUNT, LOCATION, ENROLL_TTL)
        private_dir(self.connector_home)
        started = time.monotonic()
        identity = await enroll(self.connector_state, hub.tunnel_address, token.encode(), timeout=CONNECT_TIMEOUT)
        enrolled_in = time.monotonic() - started
        connector_service.set_admin_password(self.connector_state, self.connector_password, actor=ACTOR)
        config = ConnectorConfig(backoff_cap=1.0, connect_timeout=CONNECT_TIMEOUT, ui_listen=HostPort(LOOPBACK, 0))
        connector = self._connector = Connector(self.connector_state, config)
        stop = asyncio.Event()
        started = time.monotonic()
        task = asyncio.create_task(connector.run(stop), name="demo connector")
        stack.push_async_callback(stop_task, stop, task)
        deadline = started + LISTED_TIMEOUT
        while not self._listed(identity.connector_id) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            task.result()  # raises what stopped it
        if not self._listed(identity.connector_id):
            raise PostbridgeError(
                f"the hub does not list connector '{identity.connector_id}' after {LISTED_TIMEOUT:g} s",
                hint="see the demo's log",
            )
        return Enrolled(identity.connector_id, enrolled_in, time.monotonic() - started)

    def _listed(self, connector_id: str) -> bool:
        return any(e.identity.connector_id == connector_id for e in self.hub.registry.at(SUBACCOUNT, LOCATION))

    def add_lab_credentials(self) -> list[str]:
        """Store the lab users' passwords in the cloud side's credential store; returns the names."""
        store = CredentialStore(self.cloud_home)
        for user, password in PASSWORDS.items():
            store.add(PasswordEntry(name=user, user=user, password=password), replace=True)
        return list(PASSWORDS)

    # -- what the steps use ---------------------------------------------------------------------------------------

    def channel(
        self,
        target: HostPort,
        protection: Protection,
        *,
        credential: str = "",
        timeout: float = CHANNEL_TIMEOUT,
    ) -> ChannelSettings:
        """A channel to ``target`` (a virtual host) through the hub at location ``dc1``, trusting the cloud side's
        keystore; with ``credential`` it logs in with that entry of the credential store."""
        credentials = CredentialStore(self.cloud_home).resolve(credential) if credential else None
        return ChannelSettings(
            address=target,
            proxy=Proxy.ON_PREMISE,
            location_id=LOCATION,
            binding=self.binding,
            timeout=timeout,
            protection=protection,
            auth=AuthMethod.PLAIN if credentials else AuthMethod.NONE,
            credentials=credentials,
            keystore=self.keystore_path,
        )

    @property
    def cloud_service(self) -> CloudService:
        return CloudService(self.hub_state, hub=self.hub, flows_file=self.flows_path)

    @property
    def keystore_path(self) -> Path:
        return self.cloud_service.keystore_path

    @property
    def flows_path(self) -> Path:
        return self.cloud_home / FLOWS_NAME

    @property
    def binding_path(self) -> Path:
        return self.cloud_home / BINDING_NAME

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise PostbridgeError("the hub is not running (the first step did not finish)")
        return self._hub

    @property
    def connector(self) -> Connector:
        if self._connector is None:
            raise PostbridgeError("the connector is not running (the first step did not finish)")
        return self._connector

    @property
    def binding(self) -> Binding:
        if self._binding is None:
            raise PostbridgeError("the hub's binding was not written (the first step did not finish)")
        return self._binding

    @property
    def socks_address(self) -> HostPort:
        return _address(self.hub.socks_address, "SOCKS5")

    @property
    def api_address(self) -> HostPort:
        return _address(self.hub.api_address, "API")

    @property
    def cockpit_url(self) -> str:
        return f"https://{self.api_address}/cockpit/"

    @property
    def connector_ui_url(self) -> str:
        return f"http://{_address(self.connector.ui_address, 'connector UI')}/"


def _address(address: HostPort | None, what: str) -> HostPort:
    if address is None:
        raise PostbridgeError(f"the {what} listener is not open")
    return address
