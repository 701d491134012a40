"""``postbridge lab``: run the lab mail server (:mod:`postbridge.lab`) in the foreground until Ctrl-C.

Owns: the options, the lab folder (``--folder``, or a temporary one removed on exit), the tables of endpoints, users
and CA certificates printed once the lab is up, quieting aiosmtpd's per-command logging below ``--log-level debug``,
and the exit code (0 after Ctrl-C or SIGTERM, 2 for a bad option, 1 for anything else that stopped it).

Must not: bind anything but loopback (the lab refuses it) or leave the temporary folder behind. The lab users'
passwords are printed on purpose: they are lab passwords, known by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from postbridge.addresses import HostPort
from postbridge.cli.common import console, ctx_obj, run_command, setup_logging
from postbridge.lab import LabServer, LabUser
from postbridge.lab.server import DEFAULT_DOMAIN, DEFAULT_SERVER_NAME


def lab(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Loopback address to listen on (127.0.0.1, 127.x.y.z or ::1).")] = (
        "127.0.0.1"
    ),
    base_port: Annotated[
        int | None,
        typer.Option(
            "--base-port",
            help="Use ports N (IMAP), N+1 (IMAPS), N+2 (POP3), N+3 (POP3S), N+4 (SMTP submission), N+5 (SMTPS). "
            "Default: free ports, printed at start.",
        ),
    ] = None,
    folder: Annotated[
        str | None,
        typer.Option(
            "--folder",
            help="Write the lab CA (root.pem, intermediate.pem), the server certificate and lab.json (ports, users, "
            "CA paths) here. Default: a temporary folder removed on exit.",
        ),
    ] = None,
    users: Annotated[
        list[str] | None,
        typer.Option("--user", help="NAME:PASSWORD of a lab user (repeat it); replaces alice, bob and carol."),
    ] = None,
    server_name: Annotated[
        str, typer.Option("--server-name", help="Host name the server certificate carries besides localhost.")
    ] = DEFAULT_SERVER_NAME,
) -> None:
    """Run an on-premise stand-in mail server on loopback: IMAP, POP3 and SMTP with STARTTLS and implicit TLS."""
    level = ctx_obj(ctx).log_level
    temporary = folder is None
    where = Path(tempfile.mkdtemp(prefix="postbridge-lab-")) if folder is None else Path(folder)

    def body() -> None:
        setup_logging(level)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: one INFO line per command otherwise
        lab_users = [LabUser.parse(text, DEFAULT_DOMAIN) for text in users] if users else None
        server = LabServer(where, host=host, base_port=base_port, users=lab_users, server_name=server_name)
        asyncio.run(_serve(server, temporary=temporary))

    try:
        run_command(body)
    finally:
        if temporary:
            shutil.rmtree(where, ignore_errors=True)


async def _serve(server: LabServer, *, temporary: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        async with server:
            show(server, temporary=temporary)
            await stop.wait()
            console.print("stopping the lab mail server")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def show(server: LabServer, *, temporary: bool) -> None:
    """The endpoints, users and CA certificates of a running lab, and how to try it."""
    endpoints = Table(title=f"postbridge lab mail server on {server.host}", title_justify="left")
    for column in ("protocol", "security", "address", "protection to use"):
        endpoints.add_column(column)
    for endpoint in server.endpoints():
        endpoints.add_row(endpoint.protocol, endpoint.security, str(HostPort(server.host, endpoint.port)),
                          endpoint.protection)  # fmt: skip
    console.print(endpoints)
    people = Table(title="users (lab passwords, shown on purpose)", title_justify="left")
    for column in ("user", "password", "address"):
        people.add_column(column)
    for user in server.users:
        people.add_row(user.name, user.password, user.address)
    console.print(people)
    pki = server.pki
    trust = Table(title="certificates: server <- intermediate <- root", title_justify="left")
    trust.add_column("file")
    trust.add_column("SHA-256 fingerprint", overflow="fold")
    trust.add_row(str(pki.root_pem), pki.root_fingerprint)
    trust.add_row(str(pki.intermediate_pem), pki.intermediate_fingerprint)
    console.print(trust)
    kept = "temporary, removed on exit" if temporary else "removed on exit; the certificates stay"
    console.print(f"ports, users and CA paths for other tools: {server.lab_json} ({kept})", highlight=False)
    console.print(f"started in {server.startup_seconds * 1000:.0f} ms", highlight=False)
    first = server.users[0]
    console.print("try it (trust the lab root first, then test IMAP with STARTTLS):", highlight=False)
    console.print(f"  postbridge keystore add {pki.root_pem} --alias lab-root", style="cyan", highlight=False)
    console.print(
        f"  echo {first.password} | postbridge test imap --address {HostPort(server.host, server.ports.imap)} "
        f"--user {first.name} --password-stdin --list-folders",
        style="cyan",
        highlight=False,
    )
    console.print("Press Ctrl-C to stop.", style="bold")
