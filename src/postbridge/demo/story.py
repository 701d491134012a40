"""The story of ``postbridge demo``: five steps, each showing one thing and checking that it happened.

0. the stage: the lab mail server (the "on-premise" IMAP/POP3/SMTP server), a cloud hub, a connector enrolled on
   the fly;
1. the lab server mapped twice (``tcp`` to its STARTTLS port, ``tcp-tls`` to its implicit-TLS port; SMTP submission
   too) and the connector's availability check of each, asked for through the tunnel;
2. the connection test as a cloud application runs it: STARTTLS fails on the unknown lab CA, the lab root and
   intermediate are shown and added to the keystore, the test passes; then ``off`` over the ``tcp-tls`` mapping;
3. mail sent through the tunnel over SMTP, and a flow that polls it back into a folder;
4. the three classic errors (cases in :mod:`postbridge.demo.cases`), each with the connection test's diagnosis.

Owns the steps and what each one checks. Everything runs in the caller's event loop on 127.0.0.1 (the blocking
mail clients in worker threads); every service is registered on the caller's ``AsyncExitStack``. Must not print
except through the :class:`Narrator`, set up logging, or touch any folder but the demo home it is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from rich.table import Table

from postbridge.addresses import HostPort
from postbridge.cli.probe import render
from postbridge.connector.mappings import Mapping
from postbridge.demo import cases, mailflow
from postbridge.demo.cases import DOWN, IMAP, IMAPS, LOCATION, READER, SERVER_NAME, SUBACCOUNT, SUBMISSION, ErrorCase
from postbridge.demo.narration import Narrator
from postbridge.demo.stage import ACTOR, LOOPBACK, Stage
from postbridge.errors import PostbridgeError
from postbridge.mail.probe import ProbeReport, run_probe
from postbridge.mail.settings import ChannelSettings, Protection
from postbridge.runtime.engine import Runtime
from postbridge.runtime.launch import opened_runtime, read_flows
from postbridge.runtime.store import MessageStatus
from postbridge.services import connector as connector_service
from postbridge.trust.pki import describe, load_certificates

log = logging.getLogger("postbridge.demo")

STEP_TIMEOUT = 30.0
CHECK_TIMEOUT = 5.0
LEASE_WAIT = 5.0  # seconds the one poll waits for the flow's lease (nobody else holds it)

Body = Callable[[], Awaitable[None]]


class Demo:
    """The running story. :meth:`run` executes every step in order inside the caller's ``AsyncExitStack``."""

    def __init__(self, home: Path, narrator: Narrator) -> None:
        self.home = home
        self.say = narrator
        self.stage = Stage(home)
        self.runtime: Runtime | None = None
        self._stack: AsyncExitStack | None = None

    def steps(self) -> list[tuple[str, str, Body]]:
        return [
            (
                "Set the stage: a lab mail server, a cloud hub and a connector",
                "The lab server stands in for the mail server inside the private network: IMAP, POP3 and SMTP, each "
                "with a STARTTLS and an implicit-TLS port, certificates from a lab root CA through an intermediate. "
                "The hub gets a CA, a subaccount and a one-time enrollment token; the connector redeems it for a "
                "client certificate and dials out (mutual TLS, HTTP/2). Nothing reaches the lab but the connector.",
                self._set_stage,
            ),
            (
                "Map the lab server and check availability",
                "Cloud applications only see virtual hosts. 143 is mapped as 'tcp' to the STARTTLS port (TLS runs end "
                "to end), 993 as 'tcp-tls' to the implicit-TLS port (the connector does the TLS, verified against its "
                "own trust store), 587 as 'tcp' to SMTP submission. The hub asks the connector to check each one.",
                self._map_and_check,
            ),
            (
                "Run the connection test, as a cloud application would",
                "'postbridge test imap' through the hub's SOCKS5 proxy: first with STARTTLS against a keystore that "
                "does not know the lab CA yet, then again after adding the lab root and intermediate, then with "
                "protection 'off' over the tcp-tls mapping.",
                self._connection_tests,
            ),
            (
                "Send mail through the tunnel and poll it back with a flow",
                f"{cases.MAIL_COUNT} mails go over SMTP (STARTTLS, login) through the tunnel to {READER}; a "
                f"flow (the flows file the runtime reads) polls {READER}'s INBOX through the tunnel into a folder, "
                "and marks each message read and archives it only after it was stored.",
                self._mail_and_flow,
            ),
            (
                "Reproduce the classic errors",
                "Three mistakes a cloud application's settings often hold, each run through the connection test: "
                "what failed, what the hub and the connector were asked, and the fix.",
                self._classic_errors,
            ),
        ]

    async def run(self, stack: AsyncExitStack) -> None:
        """Run every step; a step that raises stops the story (the rest is reported as skipped)."""
        self._stack = stack
        broken = ""
        for number, (title, what, body) in enumerate(self.steps()):
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
        """True when the stage is up and the flow ran (steps 0-3), so a user can go on by hand."""
        outcomes = self.say.outcomes
        return len(outcomes) >= 4 and all(outcome.passed for outcome in outcomes[:4]) and self.runtime is not None

    @property
    def stack(self) -> AsyncExitStack:
        if self._stack is None:
            raise PostbridgeError("the demo is not running")
        return self._stack

    # -- step 0 ---------------------------------------------------------------------------------------------------

    async def _set_stage(self) -> None:
        stage = self.stage
        lab = await stage.start_lab(self.stack)
        table = Table("protocol", "security", "port", "protection that fits")
        for endpoint in lab.endpoints():
            table.add_row(endpoint.protocol, endpoint.security, f"{lab.host}:{endpoint.port}", endpoint.protection)
        self.say.passed(f"lab mail server '{lab.server_name}' up in {lab.startup_seconds * 1000:.0f} ms:")
        self.say.show(table)
        self.say.info(f"users {', '.join(f'{u.name}/{u.password}' for u in lab.users)}; certificates in {lab.folder}")
        hub = await stage.start_hub(self.stack)
        self.say.passed(f"hub running: tunnel {hub.tunnel_address}, SOCKS5 {hub.socks_address}, API {hub.api_address}")
        self.say.passed(f"subaccount '{SUBACCOUNT}' created; its binding for cloud applications: {stage.binding_path}")
        enrolled = await stage.start_connector(self.stack)
        self.say.passed(
            f"connector '{enrolled.connector_id}' enrolled for {SUBACCOUNT}/{LOCATION} with a one-time token in "
            f"{enrolled.seconds * 1000:.0f} ms; the hub lists it {enrolled.listed_after * 1000:.0f} ms after it started"
        )
        names = stage.add_lab_credentials()
        self.say.passed(f"credential store of the cloud side holds {', '.join(names)} (encrypted at rest)")

    # -- step 1 ---------------------------------------------------------------------------------------------------

    async def _map_and_check(self) -> None:
        stage, lab = self.stage, self.stage.lab
        state = stage.connector_state
        for entry in connector_service.add_trusted(
            state, lab.root_pem.read_bytes(), alias="lab-root", source=str(lab.root_pem), actor=ACTOR
        ):
            self.say.passed(f"connector's backend trust store trusts '{entry.info.subject}' (for tcp-tls)")
        ports = lab.ports
        mappings = [
            connector_service.add_mapping(
                state, IMAP, HostPort(LOOPBACK, ports.imap), description="IMAP, STARTTLS end to end", actor=ACTOR
            ),
            connector_service.add_mapping(
                state,
                IMAPS,
                HostPort(LOOPBACK, ports.imaps),
                protocol="tcp-tls",
                tls_server_name=SERVER_NAME,
                description="IMAPS, TLS by the connector",
                actor=ACTOR,
            ),
            connector_service.add_mapping(
                state, SUBMISSION, HostPort(LOOPBACK, ports.submission), description="SMTP submission", actor=ACTOR
            ),
        ]
        self.say.show(_mapping_table(connector_service.list_mappings(state)))
        for mapping in mappings:
            await self._check_through_hub(mapping)

    async def _check_through_hub(self, mapping: Mapping) -> None:
        entries = self.stage.hub.registry.at(SUBACCOUNT, LOCATION)
        if not entries:
            raise PostbridgeError(f"no connector is connected at {SUBACCOUNT}/{LOCATION} any more (see the log)")
        body = json.dumps({"virtual": str(mapping.virtual)}).encode()
        answer = await entries[0].session.control("POST", "/v1/check", body, timeout=CHECK_TIMEOUT)
        result = json.loads(answer.body or b"{}")
        summary = str(result.get("summary") or result.get("error") or f"HTTP {answer.status}")
        tls_ok = mapping.protocol.value == "tcp" or bool(result.get("tls_version"))
        self.say.expect(
            answer.status == 200 and bool(result.get("reachable")) and bool(result.get("protocol_seen")) and tls_ok,
            f"availability check {mapping.virtual}: {summary}",
            f"availability check {mapping.virtual}: {summary} {result.get('hint') or ''}".rstrip(),
        )

    # -- step 2 ---------------------------------------------------------------------------------------------------

    async def _connection_tests(self) -> None:
        stage, lab = self.stage, self.stage.lab
        settings = stage.channel(IMAP, Protection.STARTTLS_MANDATORY, credential=READER)
        first = await self._test(settings)
        self.say.expect(
            not first.ok and first.chain is not None and not first.chain.trusted,
            "STARTTLS refused the lab certificate: the keystore does not know the lab CA yet (as it should be)",
            "the first test should fail on the unknown lab CA, but it did not",
        )
        self.say.info("The lab's administrator hands over its CA certificates; compare the fingerprints, then trust:")
        sent = {cert.info.fingerprint for cert in first.chain.certificates} if first.chain else set()
        for path, alias in ((lab.root_pem, "lab-root"), (lab.intermediate_pem, "lab-intermediate")):
            info = describe(load_certificates(path.read_bytes(), source=str(path))[0])
            where = "sent by the server too" if info.fingerprint in sent else "not sent by the server"
            self.say.info(f"  {alias}: {info.subject}, SHA-256 {info.fingerprint} ({where})")
            for added in stage.cloud_service.keystore_add(path.read_bytes(), alias=alias, source=str(path)):
                self.say.passed(f"keystore: added '{added.alias}' (postbridge keystore add {path.name})")
        second = await self._test(settings, list_folders=True)
        self.say.expect(
            second.ok and second.chain is not None and second.chain.trusted,
            "the same test passes: STARTTLS, the chain up to 'lab-root', login, folders",
            f"the test still fails after trusting the lab CA: {_failure(second)}",
        )
        off = await self._test(stage.channel(IMAPS, Protection.OFF, credential=READER))
        self.say.expect(
            off.ok,
            f"protection 'off' over the tcp-tls mapping {IMAPS} passes: the connector did the TLS to the lab server",
            f"protection 'off' over the tcp-tls mapping failed: {_failure(off)}",
        )

    async def _test(self, settings: ChannelSettings, *, list_folders: bool = False) -> ProbeReport:
        report = await asyncio.to_thread(run_probe, "imap", settings, check_auth=True, list_folders=list_folders)
        render(report, self.say.console)
        return report

    # -- step 3 ---------------------------------------------------------------------------------------------------

    async def _mail_and_flow(self) -> None:
        stage = self.stage
        mails = mailflow.demo_mails()
        started = time.monotonic()
        sent = await asyncio.to_thread(mailflow.send_through_tunnel, stage, mails)
        self.say.passed(
            f"sent {len(sent)} mails to {READER} through {SUBMISSION} in one SMTP session "
            f"({(time.monotonic() - started) * 1000:.0f} ms, STARTTLS end to end, logged in as {cases.SENDER})"
        )
        path = mailflow.write_flows(stage)
        config = await asyncio.to_thread(read_flows, stage.cloud_home, path, resolve_secrets=True)
        self.say.passed(f"flows file {path}: flow '{mailflow.FLOW}' (IMAP {IMAP} -> folder {mailflow.TARGET_FOLDER})")
        runtime = self.runtime = self.stack.enter_context(opened_runtime(stage.cloud_home, config, worker="demo"))
        started = time.monotonic()
        results = await asyncio.to_thread(runtime.run_once, wait=LEASE_WAIT)
        took = (time.monotonic() - started) * 1000
        error = results.get(mailflow.FLOW, "the flow did not run")
        self.say.expect(not error, f"the flow polled once and drained in {took:.0f} ms", f"the flow failed: {error}")
        stored = {mail.message_id: mail for mail in mailflow.stored_mails(stage)}
        table = Table("file in " + str(stage.cloud_home / mailflow.TARGET_FOLDER), "subject", "bytes")
        for mail in sent:
            found = stored.get(mail.message_id)
            if found is not None:
                table.add_row(found.file, found.subject, str(found.size))
        self.say.show(table)
        missing = [mail.subject for mail in sent if mail.message_id not in stored]
        self.say.expect(
            not missing,
            f"all {len(sent)} mails are in the folder, each once, under its idempotency key",
            f"not in the folder: {', '.join(missing)}",
        )
        records = stage.cloud_service.messages(flow=mailflow.FLOW)
        done = [r for r in records if r.status is MessageStatus.POST_PROCESSED]
        self.say.expect(
            len(done) >= len(sent),
            f"message log: {len(done)} post-processed (marked read, moved to '{mailflow.ARCHIVE}' after delivery)",
            f"message log: {len(done)} of {len(sent)} post-processed: "
            + "; ".join(f"{r.subject}: {r.status} {r.error}" for r in records),
        )

    # -- step 4 ---------------------------------------------------------------------------------------------------

    async def _classic_errors(self) -> None:
        nobody = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening: connecting is refused
        self.stack.callback(nobody.close)
        nobody.bind((LOOPBACK, 0))
        internal = HostPort(LOOPBACK, int(nobody.getsockname()[1]))
        connector_service.add_mapping(
            self.stage.connector_state, DOWN, internal, description="the old server, switched off", actor=ACTOR
        )
        self.say.info(f"mapped {DOWN} -> {internal}, where nothing listens (for the host-is-down case)")
        for case in cases.ERROR_CASES:
            await self._error_case(case)

    async def _error_case(self, case: ErrorCase) -> None:
        self.say.line("")
        self.say.line(f"{case.title}: {case.target}, protection '{case.protection}'", style="bold", indent=3)
        report = await self._test(self.stage.channel(case.target, case.protection, credential=READER))
        step = report.failed
        said = " ".join((step.cause, *step.evidence, step.fix)).lower() if step else ""
        self.say.expect(
            step is not None and case.cause.lower() in said and case.fix.lower() in said,
            f"diagnosed: {case.explanation}",
            f"expected a failure saying '{case.cause}' and '{case.fix}', got: {_failure(report)}",
        )
        if case.audited:
            audit = self.stage.connector_state.audit
            denied = [
                record
                for record in audit.read(limit=100)
                if record.get("event") == "access-denied" and record.get("virtual") == str(case.target)
            ]
            if self.say.expect(
                bool(denied),
                f"the connector's audit log ({audit.path}) holds the Access Denied record:",
                f"the connector's audit log ({audit.path}) holds no Access Denied record for {case.target}",
            ):
                self.say.info(f"  {json.dumps(denied[-1], sort_keys=True)}")


def _mapping_table(mappings: list[Mapping]) -> Table:
    table = Table()
    for column in ("virtual host", "internal", "protocol"):  # the addresses stay whole; the rest folds
        table.add_column(column, no_wrap=True)
    table.add_column("TLS server name", overflow="fold")
    table.add_column("description", overflow="fold")
    for mapping in mappings:
        table.add_row(
            str(mapping.virtual), str(mapping.internal), mapping.protocol.value, mapping.tls_server_name or "",
            mapping.description,
        )  # fmt: skip
    return table


def _failure(report: ProbeReport) -> str:
    step = report.failed
    if step is None:
        return "every step passed"
    return f"{step.name}: {step.cause} (fix: {step.fix})"
