"""The demo's last step: keep everything running, poll the flow on, and tell the user where to look and what to try.

Owns starting the runtime of the demo's flow in a thread (stopped, without blocking the event loop, when the
caller's ``AsyncExitStack`` closes) and the text of the step: the connector UI's and the cloud cockpit's URLs with
their passwords, and commands to type in another terminal (with this installation's ``postbridge``).

Must not: decide whether the story went well enough to keep running (command.py does), or print secrets of
anything but the demo (its passwords are made for this run and die with it).
"""

from __future__ import annotations

import asyncio
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

STOP_TIMEOUT = 30.0


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
    _tell(story)


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
        f"the flow '{mailflow.FLOW}' polls every {mailflow.POLL_INTERVAL} s: send {READER} a mail and watch {folder}",
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
