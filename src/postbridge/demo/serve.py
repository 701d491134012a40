"""The demo's last step: keep everything running, poll the flow on, and tell the user where to look and what to try.

Owns starting the runtime of the demo's flow in a thread (stopped, without blocking the event loop, when the
caller's ``AsyncExitStack`` closes), announcing each message the flow delivers, retries or quarantines from then on
(read from the message log every second), and the text of the step: the connector UI's and the cloud cockpit's URLs with
their passwords, and commands to type in another terminal (with this installation's ``postbridge``).

Must not: decide whether the story went well enough to keep running (command.py does), or print secrets of
anything but the demo (its passwords are made for this run and die with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import sys
import threading
from contextlib import AsyncExitStack
from pathlib import Path

from postbridge.demo import mailflow
from postbridge.demo.cases import DOMAIN, IMAP, LOCATION, READER, SENDER, SUBACCOUNT, SUBMISSION
from postbridge.demo.story import Demo
from postbridge.errors import PostbridgeError
from postbridge.runtime.store import MessageStatus

STOP_TIMEOUT = 30.0
ANNOUNCE_EVERY = 1.0  # seconds between two looks at the flow's message log
MAX_WATCHED = 200
log = logging.getLogger("postbridge.demo")


async def keep_running(story: Demo, stack: AsyncExitStack) -> None:
    """Start polling the demo's flow every few seconds until ``stack`` closes, and print step 5."""
    runtime = story.runtime
    if runtime is None:
        raise PostbridgeError("the flow's runtime was not opened (step 3 did not finish)")
    thread = threading.Thread(target=runtime.run, name="demo runtime", daemon=True)
    thread.start()

    async def stop() -> None:
        runtime.stop()
        await asyncio.to_thread(thread.join, STOP_TIMEOUT)

    stack.push_async_callback(stop)
    seen = await asyncio.to_thread(_statuses, story)  # what step 3 already showed is not announced again
    announcer = asyncio.create_task(_announce(story, seen), name="demo arrivals")
    stack.push_async_callback(_cancelled, announcer)
    _tell(story)


def _statuses(story: Demo) -> dict[str, tuple[MessageStatus, int]]:
    records = story.stage.cloud_service.messages(flow=mailflow.FLOW, limit=MAX_WATCHED)
    return {record.key: (record.status, record.attempts) for record in records}


async def _announce(story: Demo, seen: dict[str, tuple[MessageStatus, int]]) -> None:
    """Print each message of the flow once it reached a new status (arrived, refused and retrying, quarantined)."""
    say = story.say
    while True:
        await asyncio.sleep(ANNOUNCE_EVERY)
        try:
            records = await asyncio.to_thread(story.stage.cloud_service.messages, flow=mailflow.FLOW, limit=MAX_WATCHED)
        except PostbridgeError as exc:
            log.warning("demo: cannot read the message log: %s", exc)
            continue
        for record in reversed(records):  # oldest first
            now = (record.status, record.attempts)
            if seen.get(record.key) == now:
                continue
            seen[record.key] = now
            subject = record.subject or "(no subject)"
            if record.status is MessageStatus.POST_PROCESSED:
                say.line(f"{say.tick} flow '{record.flow}': '{subject}' from {record.sender} -> {record.target_ref}",
                         style="green", indent=3)  # fmt: skip
            elif record.status is MessageStatus.RETRYING:
                say.line(f"flow '{record.flow}': '{subject}' refused ({record.error}); attempt {record.attempts}, "
                         "retrying", style="yellow", indent=3)  # fmt: skip
            elif record.status in (MessageStatus.QUARANTINED, MessageStatus.FAILED):
                say.line(f"flow '{record.flow}': '{subject}' {record.status}: {record.error}", style="red", indent=3)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _tell(story: Demo) -> None:
    stage, say = story.stage, story.say
    say.console.print()
    say.console.print("[bold cyan]Step 5[/]  [bold]Keep running: look around, try it yourself[/]", highlight=False)
    say.line("web UIs (log in as 'admin'):", style="bold", indent=3)
    say.line(f"connector UI   {stage.connector_ui_url}   password {stage.connector_password}", indent=5)
    say.line(f"cloud cockpit  {stage.cockpit_url}   password {stage.cockpit_password}", indent=5)
    say.line(
        f"(the cockpit's certificate comes from the hub's own CA, {stage.hub_state.dir / 'ca.pem'}: "
        "your browser warns once)",
        style="dim",
        indent=5,
    )
    folder = stage.cloud_home / mailflow.TARGET_FOLDER
    say.line(
        f"the flow '{mailflow.FLOW}' polls every {mailflow.POLL_INTERVAL} s: send {READER} a mail and watch {folder} "
        "(each arrival is shown here)",
        style="bold",
        indent=3,
    )
    cloud = f"{_postbridge()} --home {shlex.quote(str(stage.cloud_home))}"
    connector = f"{_postbridge()} --home {shlex.quote(str(stage.connector_home))}"
    via = f"--proxy on-premise --location-id {LOCATION} --binding {shlex.quote(str(stage.binding_path))}"
    for command in (
        f"{cloud} mail send --address {SUBMISSION} {via} --credential {SENDER} "
        f"--from {SENDER}@{DOMAIN} --to {READER}@{DOMAIN} --subject 'Hello from the cloud' --text 'It works.'",
        f"{cloud} messages list",
        f"{cloud} test imap --address {IMAP} {via} --credential {READER} --list-folders",
        f"{connector} connector mapping list",
    ):
        say.line(command, style="cyan", indent=5)
    user = f"{SUBACCOUNT}/{LOCATION}"
    say.line("any SOCKS5 client reaches the mapped virtual hosts (type 'a LOGOUT' to end):", style="bold", indent=3)
    say.line(
        f"curl --socks5-hostname {stage.socks_address} --proxy-user '{user}:{stage.secret}' telnet://{IMAP}",
        style="cyan",
        indent=5,
    )
    say.line("Press Ctrl-C to stop.", style="bold")


def _postbridge() -> str:
    """How to call this installation's ``postbridge`` from another terminal."""
    beside = Path(sys.executable).with_name("postbridge")
    found = shutil.which("postbridge")
    if found and beside.exists() and Path(found).resolve() == beside.resolve():
        return "postbridge"
    if beside.exists():
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m postbridge"
