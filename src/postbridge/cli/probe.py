"""``postbridge test imap|pop3|smtp|tcp|tls``: the connection test of a channel, one line per step.

Takes the same channel settings as ``postbridge mail poll``/``send`` (options, ``--config FILE`` and the
credential store, merged by :func:`postbridge.cli.mail.load_channel`), runs :func:`postbridge.mail.probe.run_probe`
and shows each step with ✓/✗, its timing and what it saw; the failing step gets a "cause:" and a "fix:" line.
``--json`` prints the report as JSON. Exit code 0 when every step passed, 1 when one failed, 2 for a bad setting.
Nothing secret is ever printed: steps name the user, never the password or token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from postbridge.cli.common import console, ctx_obj, print_json, run_command, setup_logging
from postbridge.cli.mail import PASSWORD_ENV, load_channel
from postbridge.mail.probe import KINDS, ProbeReport, run_probe
from postbridge.trust.credentials import CredentialStore

app = typer.Typer(
    help="Test a mail channel step by step (hub, TCP, TLS, capabilities, login) and explain what fails.",
    no_args_is_help=True,
)

_SUMMARIES = {
    "imap": "Test an IMAP sender channel: connection, TLS/STARTTLS, capabilities, mechanisms, login, folders.",
    "pop3": "Test a POP3 sender channel: connection, TLS/STLS, capabilities, mechanisms, login, message count.",
    "smtp": "Test an SMTP receiver channel: connection, greeting, EHLO, TLS/STARTTLS, mechanisms, login.",
    "tcp": "Open the connection (direct or through the hub) and read the server's first line.",
    "tls": "Open the connection and do an implicit TLS handshake (version, cipher, certificate).",
}


def render(report: ProbeReport) -> None:
    """One line per step: ✓/✗, name, timing, detail; cause and fix under the failing step."""
    console.print(f"[bold]postbridge test {report.kind}[/] {escape(report.target)}", highlight=False)
    width = max((len(step.name) for step in report.steps), default=0)
    for step in report.steps:
        mark = "[green]✓[/]" if step.ok else "[red]✗[/]"
        timing = f"{step.elapsed_ms:8.1f} ms"
        console.print(f" {mark} {step.name:<{width}} {timing}  {escape(step.detail)}", highlight=False)
        if not step.ok:
            console.print(f"     [red]cause:[/] {escape(step.cause)}", highlight=False)
            if step.fix:
                console.print(f"     [yellow]fix:[/]   {escape(step.fix)}", highlight=False)
    if report.ok:
        console.print(f"[green]all {len(report.steps)} steps passed[/]", highlight=False)
    else:
        console.print("[red]the test failed[/]", highlight=False)


def _make_command(kind: str) -> Callable[..., None]:
    default_section = "receiver" if kind == "smtp" else "sender"

    def command(
        ctx: typer.Context,
        address: Annotated[str, typer.Option(help="Server host:port (the virtual host for on-premise).")] = "",
        config: Annotated[Path | None, typer.Option(help="TOML file with the channel settings.")] = None,
        section: Annotated[
            str, typer.Option(help="Table of --config to read (default \\[sender]; \\[receiver] for smtp).")
        ] = default_section,
        proxy: Annotated[str, typer.Option(help="'internet' or 'on-premise' (through the hub).")] = "",
        location_id: Annotated[str, typer.Option(help="Connector location ID for on-premise.")] = "",
        binding: Annotated[str, typer.Option(help="Binding file from 'postbridge cloud binding'.")] = "",
        protection: Annotated[str, typer.Option(help="off | starttls-mandatory | starttls-optional | tls")] = "",
        auth: Annotated[str, typer.Option(help="none | plain | login | cram-md5 | xoauth2 | oauthbearer")] = "",
        user: Annotated[str, typer.Option(help="User name.")] = "",
        password_stdin: Annotated[
            bool, typer.Option(help=f"Read the password from stdin (else ${PASSWORD_ENV}).")
        ] = False,
        credential: Annotated[str, typer.Option(help="Name in the credential store (instead of --user).")] = "",
        tls_server_name: Annotated[str, typer.Option(help="Name the server certificate must carry.")] = "",
        keystore: Annotated[str, typer.Option(help="Trust store folder; default HOME/keystore.")] = "",
        timeout: Annotated[float | None, typer.Option(help="Seconds per step (default 30).")] = None,
        check_auth: Annotated[bool, typer.Option("--check-auth", help="Also log in.")] = False,
        list_folders: Annotated[
            bool, typer.Option("--list-folders", help="IMAP: log in and count messages per folder.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        def body() -> None:
            home = ctx_obj(ctx).ensure_home()
            options = {
                "address": address, "proxy": proxy, "location_id": location_id, "binding": binding,
                "protection": protection, "auth": auth, "user": user, "tls_server_name": tls_server_name,
                "keystore": keystore, "credential": credential, "timeout": timeout,
            }  # fmt: skip
            setup_logging(ctx_obj(ctx).log_level)
            channel, _ = load_channel(
                config, section, options, password_stdin, CredentialStore(home), default_keystore=home / "keystore"
            )
            report = run_probe(kind, channel, check_auth=check_auth, list_folders=list_folders)
            if as_json:
                print_json(report.to_json())
            else:
                render(report)
            if not report.ok:
                raise typer.Exit(1)

        run_command(body)

    command.__doc__ = _SUMMARIES[kind]
    command.__name__ = kind
    return command


for _kind in KINDS:
    app.command(_kind)(_make_command(_kind))
