"""The tunnel story of ``postbridge demo``: five steps, each showing one thing and checking that it happened.

1. an "on-premise" mail-like server (plain and implicit TLS) stands in for the mail server in the private network;
2. a hub is initialised and started, a connector is enrolled with a one-time token and connects;
3. two mappings (``tcp`` and ``tcp-tls``), the backend trust store and the availability check;
4. a cloud application reaches both virtual hosts through the hub's SOCKS5 proxy and the tunnel;
5. the four classic errors, each with its SOCKS5 reply, the words clients print, and the diagnosis.

Owns the steps, what each one checks (the error cases and their expected replies live in
:mod:`postbridge.demo.cases`), and :class:`HubMessages`, which keeps the hub's refusal messages so that a diagnosis
can quote them. Everything runs in the caller's event loop on 127.0.0.1;
every service is registered on the caller's ``AsyncExitStack``. Must not print except through the
:class:`Narrator`, set up logging, or touch any folder but the demo home it is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError
from python_socks.async_.asyncio import Proxy
from rich.table import Table

from postbridge.addresses import HostPort
from postbridge.cloud.hub import Hub, HubConfig
from postbridge.cloud.state import HubState
from postbridge.connector.agent import Connector, ConnectorConfig
from postbridge.connector.enroll import enroll
from postbridge.connector.mappings import Mapping, Protocol
from postbridge.connector.state import ConnectorState
from postbridge.demo import cases
from postbridge.demo.cases import DOWN, IMAP, IMAPS, LOCATION, REPLY_WORDS, SUBACCOUNT, ErrorCase
from postbridge.demo.dialogue import CLOSE_TIMEOUT, converse, greet_directly, stop_task
from postbridge.demo.narration import Narrator
from postbridge.demo.onprem import GREETING, LOOPBACK, SERVER_NAME, DemoPki, OnPremServer, make_demo_pki, server_context
from postbridge.errors import PostbridgeError
from postbridge.home import private_dir

log = logging.getLogger("postbridge.demo")
T = TypeVar("T")

STEP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
LISTED_TIMEOUT = 8.0
ENROLL_TTL = 15 * 60.0


_TRACE_PREFIX = re.compile(r"^.*? trace \S+: ")


class HubMessages(logging.Handler):
    """Keeps the hub's SOCKS5 refusal messages (warnings of ``postbridge.socks``) to quote them in diagnoses."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("postbridge.socks"):
            self.messages.append(_TRACE_PREFIX.sub("", record.getMessage(), count=1))

    def mark(self) -> int:
        return len(self.messages)

    def since(self, mark: int) -> list[str]:
        return self.messages[mark:]


class Demo:
    """The running story. :meth:`run` executes every step in order inside the caller's ``AsyncExitStack``."""

    def __init__(self, home: Path, narrator: Narrator, hub_messages: HubMessages) -> None:
        self.home = home
        self.say = narrator
        self.hub_messages = hub_messages
        self.secret = ""
        self._stack: AsyncExitStack | None = None
        self._pki: DemoPki | None = None
        self._onprem: OnPremServer | None = None
        self._hub: Hub | None = None
        self._connector: ConnectorState | None = None

    # -- the run ------------------------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, str, Callable[[], Awaitable[None]]]]:
        return [
            (
                'Start the "on-premise" mail server',
                "A tiny IMAP-like server stands in for the mail server inside the private network: a plain port "
                "and an implicit-TLS twin whose certificate comes from a demo CA. Both are greeted directly here.",
                self._start_onprem,
            ),
            (
                "Start the cloud hub and enroll a connector",
                "The hub gets a CA and a server certificate, a subaccount 'demo' and a one-time enrollment token "
                "for location 'dc1'. The connector (its own home folder) redeems the token for a client "
                "certificate, then dials out to the hub: mutual TLS 1.3, HTTP/2 with the roles reversed.",
                self._start_hub_and_connector,
            ),
            (
                "Map the virtual hosts and check availability",
                "Cloud applications only ever see virtual hosts. 143 is mapped as 'tcp' (bytes pass through); "
                "993 as 'tcp-tls': the connector opens TLS to the internal server and verifies it against its "
                "backend trust store. The hub then asks the connector, through the tunnel, to check both.",
                self._map_and_check,
            ),
            (
                "Act as a cloud application: connect through the tunnel",
                "A SOCKS5 client (python-socks, user 'demo/dc1', remote DNS) asks the hub for each virtual host; "
                "the hub forwards the CONNECT through the tunnel and the server's greeting comes back first.",
                self._connect_through_tunnel,
            ),
            (
                "Reproduce the classic errors",
                "Each failure has its own SOCKS5 reply code, shown with the words Java and curl print for it and "
                "with what the hub logged about it.",
                self._classic_errors,
            ),
        ]

    async def run(self, stack: AsyncExitStack) -> None:
        """Run every step; a step that raises stops the story (the rest is reported as skipped)."""
        self._stack = stack
        broken = ""
        for number, (title, what, body) in enumerate(self.steps(), start=1):
            if broken:
                self.say.skip(number, title, broken)
                continue
            self.say.begin(number, title, what)
            error: str | None = None
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await body()
            except TimeoutError:
                error = f"the step did not finish within {STEP_TIMEOUT:g} s (see the log)"
            except PostbridgeError as exc:
                error = str(exc)
            except Exception as exc:  # a bug or an unforeseen failure: tell it, keep the traceback in the log
                log.exception("demo step %d failed", number)
                error = f"unexpected {type(exc).__name__}: {exc}"
            self.say.end(error)
            if error is not None:
                broken = f"step {number} did not finish"

    @property
    def ready_to_serve(self) -> bool:
        """True when the tunnel story worked (steps 1-4), so a user can try the proxy by hand."""
        return len(self.say.outcomes) >= 4 and all(outcome.passed for outcome in self.say.outcomes[:4])

    @property
    def socks_address(self) -> HostPort:
        address = self.hub.socks_address
        if address is None:
            raise PostbridgeError("the hub's SOCKS5 listener is not open")
        return address

    # -- step 1 -------------------------------------------------------------------------------------------------

    async def _start_onprem(self) -> None:
        self._pki = made = make_demo_pki(self.home / "onprem")
        self.say.passed(
            f"demo CA (SHA-256 {made.ca_fingerprint[:23]}…) issued a certificate for {SERVER_NAME}, {LOOPBACK}"
        )
        self._onprem = server = OnPremServer(server_context(made))
        await server.start(self.stack)
        for label, address, tls in (("plain", server.plain, False), ("TLS  ", server.tls, True)):
            assert address is not None
            started = time.monotonic()
            greeting, _ = await greet_directly(address, made if tls else None, SERVER_NAME, CONNECT_TIMEOUT)
            took = _ms(started)
            self.say.expect(
                greeting == GREETING,
                f"{label} {address} greets ({took}): {greeting}",
                f"{label} {address} greeted {greeting!r} instead of {GREETING!r}",
            )

    # -- step 2 -------------------------------------------------------------------------------------------------

    async def _start_hub_and_connector(self) -> None:
        state = HubState(private_dir(self.home / "hub"))
        created = state.init(["localhost", LOOPBACK])
        self.say.passed(f"hub initialised in {state.dir} (CA SHA-256 {created['ca_fingerprint'][:23]}…)")
        client_id, self.secret = state.add_subaccount(SUBACCOUNT)
        self.say.passed(
            f"subaccount '{SUBACCOUNT}' created (client id '{client_id}'; the secret goes to the cloud app)"
        )
        hub = Hub(state, HubConfig(tunnel_listen=HostPort(LOOPBACK, 0), socks_listen=HostPort(LOOPBACK, 0)))
        await hub.start(self.stack)
        self._hub = hub
        self.say.passed(f"hub running in this process: tunnel {hub.tunnel_address}, SOCKS5 {hub.socks_address}")
        token = state.create_enrollment(SUBACCOUNT, LOCATION, ENROLL_TTL)
        self.say.passed(
            f"one-time enrollment token for {SUBACCOUNT}/{LOCATION}, valid {ENROLL_TTL / 60:g} minutes, pins the hub CA"
        )
        assert hub.tunnel_address is not None
        self._connector = connector_state = ConnectorState(private_dir(self.home / "connector"))
        started = time.monotonic()
        identity = await enroll(connector_state, hub.tunnel_address, token.encode(), timeout=CONNECT_TIMEOUT)
        self.say.passed(
            f"connector enrolled in {_ms(started)} as '{identity.connector_id}' "
            f"(certificate bound to {identity.subaccount}/{identity.location}, home {connector_state.dir})"
        )
        connector = Connector(connector_state, ConnectorConfig(backoff_cap=1.0, connect_timeout=CONNECT_TIMEOUT))
        stop = asyncio.Event()
        started = time.monotonic()
        task = asyncio.create_task(connector.run(stop), name="demo connector")
        self.stack.push_async_callback(stop_task, stop, task)
        deadline = started + LISTED_TIMEOUT
        while not self._listed(identity.connector_id) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        self.say.expect(
            self._listed(identity.connector_id),
            f"connector started; the hub's registry lists it at {SUBACCOUNT}/{LOCATION} after {_ms(started)}",
            f"the hub's registry does not list connector '{identity.connector_id}' after {_ms(started)} (see the log)",
        )

    def _listed(self, connector_id: str) -> bool:
        return any(e.identity.connector_id == connector_id for e in self.hub.registry.at(SUBACCOUNT, LOCATION))

    # -- step 3 -------------------------------------------------------------------------------------------------

    async def _map_and_check(self) -> None:
        connector, onprem, made = self.connector_state, self.onprem, self.pki
        assert onprem.plain is not None and onprem.tls is not None
        for entry in connector.truststore.add(made.ca_pem, alias="demo-ca", source=str(made.ca_path)):
            connector.audit.config_change(
                action="truststore-add", detail={"alias": entry.alias, "fingerprint": entry.info.fingerprint}
            )
            self.say.passed(f"connector's backend trust store now trusts '{entry.info.subject}' as '{entry.alias}'")
        mappings = (
            Mapping(IMAP, onprem.plain, Protocol.TCP, description="IMAP; STARTTLS would run end to end"),
            Mapping(
                IMAPS, onprem.tls, Protocol.TCP_TLS, tls_server_name=SERVER_NAME, description="IMAPS; TLS by connector"
            ),
        )
        for mapping in mappings:
            connector.mappings.add(mapping)
            connector.audit.config_change(action="mapping-add", detail=mapping.to_json())
        table = Table("virtual", "internal", "protocol", "TLS server name", "description")
        for mapping in sorted(connector.mappings.load().values(), key=lambda m: m.virtual):
            table.add_row(
                str(mapping.virtual),
                str(mapping.internal),
                mapping.protocol.value,
                mapping.tls_server_name or "",
                mapping.description,
            )
        self.say.show(table)
        entries = self.hub.registry.at(SUBACCOUNT, LOCATION)
        if not entries:
            raise PostbridgeError(f"no connector is connected at {SUBACCOUNT}/{LOCATION} any more (see the log)")
        for mapping in mappings:
            body = json.dumps({"virtual": str(mapping.virtual)}).encode()
            answer = await entries[0].session.control("POST", "/v1/check", body, timeout=STEP_TIMEOUT / 2)
            result = json.loads(answer.body or b"{}")
            summary = str(result.get("summary") or result.get("error") or f"HTTP {answer.status}")
            tls_ok = mapping.protocol is Protocol.TCP or bool(result.get("tls_version"))
            self.say.expect(
                answer.status == 200
                and bool(result.get("reachable"))
                and result.get("protocol_seen") == "IMAP"
                and tls_ok,
                f"availability check {mapping.virtual}: {summary}",
                f"availability check {mapping.virtual}: {summary} {result.get('hint') or ''}".rstrip(),
            )

    # -- step 4 -------------------------------------------------------------------------------------------------

    async def _connect_through_tunnel(self) -> None:
        user = f"{SUBACCOUNT}/{LOCATION}"
        self.say.info(f'Proxy.from_url("socks5://{quote(user, safe="")}:SECRET@{self.socks_address}", rdns=True)')
        for target, protocol in ((IMAP, Protocol.TCP), (IMAPS, Protocol.TCP_TLS)):
            started = time.monotonic()
            reader, writer = await self._socks_open(user, self.secret, target)
            greeting, goodbye = await converse(reader, writer, CONNECT_TIMEOUT)
            took = _ms(started)
            self.say.expect(
                greeting == GREETING,
                f"{target} ({protocol.value}) through the tunnel: {greeting}",
                f"{target} ({protocol.value}) through the tunnel: got {greeting!r}, expected {GREETING!r}",
            )
            self.say.info(f"  then 'a LOGOUT' -> '{goodbye}' ({took} for SOCKS5, tunnel, greeting and goodbye)")

    async def _socks_open(
        self, username: str, secret: str, target: HostPort
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``target`` through the hub's SOCKS5 proxy. Raises python-socks' ProxyError family."""
        url = f"socks5://{quote(username, safe='')}:{quote(secret, safe='')}@{self.socks_address}"
        proxy = Proxy.from_url(url, rdns=True)
        sock = await proxy.connect(dest_host=target.host, dest_port=target.port, timeout=CONNECT_TIMEOUT)
        try:
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    # -- step 5 -------------------------------------------------------------------------------------------------

    async def _classic_errors(self) -> None:
        nobody = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening: connecting is refused
        self.stack.callback(nobody.close)
        nobody.bind((LOOPBACK, 0))
        internal = HostPort(LOOPBACK, int(nobody.getsockname()[1]))
        mapping = Mapping(DOWN, internal, Protocol.TCP, description="nothing listens there")
        self.connector_state.mappings.add(mapping)
        self.connector_state.audit.config_change(action="mapping-add", detail=mapping.to_json())
        self.say.info(f"mapped {DOWN} -> {internal}, where nothing listens (for the host-is-down case)")
        for case in cases.ERROR_CASES:
            await self._error_case(case)

    async def _error_case(self, case: ErrorCase) -> None:
        user = f"{SUBACCOUNT}/{case.location}" if case.location else SUBACCOUNT
        secret = "not-the-secret" if case.wrong_secret else self.secret
        shown = "a wrong secret" if case.wrong_secret else "the right secret"
        self.say.line("")
        self.say.line(f"{case.title}: CONNECT {case.target} as '{user}' with {shown}", style="bold", indent=3)
        mark = self.hub_messages.mark()
        code: int | None
        try:
            _reader, writer = await self._socks_open(user, secret, case.target)
        except ProxyError as exc:
            code = exc.error_code
        except (ProxyTimeoutError, ProxyConnectionError) as exc:
            self.say.failed(f"no SOCKS5 reply: {exc}")
            return
        else:
            code = 0x00
            writer.close()
            await _quietly_closed(writer)
        expected = case.expected_reply
        self.say.expect(
            code == expected,
            f"reply 0x{expected:02x}: {REPLY_WORDS[expected]}",
            f"reply {_reply_text(code)}, but expected 0x{expected:02x} ({REPLY_WORDS.get(expected, '?')})",
        )
        self.say.info(f"  why: {case.diagnosis}")
        for message in self.hub_messages.since(mark):
            self.say.info(f"  hub log: {message}")
        if case.show_audit:
            self._show_audit(case.target)

    def _show_audit(self, target: HostPort) -> None:
        audit = self.connector_state.audit
        denied = [
            r for r in audit.read(limit=100) if r.get("event") == "access-denied" and r.get("virtual") == str(target)
        ]
        if self.say.expect(
            bool(denied),
            f"connector's audit log ({audit.path}) holds the Access Denied record:",
            f"connector's audit log ({audit.path}) holds no Access Denied record for {target}",
        ):
            self.say.info(f"  {json.dumps(denied[-1], sort_keys=True)}")

    # -- state of earlier steps ---------------------------------------------------------------------------------

    @property
    def stack(self) -> AsyncExitStack:
        return _need(self._stack, "the demo is not running")

    @property
    def pki(self) -> DemoPki:
        return _need(self._pki, "the demo CA was not made (step 1 did not finish)")

    @property
    def onprem(self) -> OnPremServer:
        return _need(self._onprem, "the on-premise server is not running (step 1 did not finish)")

    @property
    def hub(self) -> Hub:
        return _need(self._hub, "the hub is not running (step 2 did not finish)")

    @property
    def connector_state(self) -> ConnectorState:
        return _need(self._connector, "the connector is not enrolled (step 2 did not finish)")


def _need(value: T | None, why: str) -> T:
    if value is None:
        raise PostbridgeError(why)
    return value


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"


def _reply_text(code: int | None) -> str:
    if code is None:
        return "none (the proxy closed the connection)"
    return f"0x{code:02x} ({REPLY_WORDS.get(code, 'unknown')})"


async def _quietly_closed(writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        pass
