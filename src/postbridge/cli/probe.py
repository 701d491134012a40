"""``postbridge test imap|pop3|smtp|tcp|tls``: the connection test of a channel, one line per step.

Takes the same channel settings as ``postbridge mail poll``/``send`` (options, ``--config FILE`` and the
credential store, merged by :func:`postbridge.cli.mail.load_channel`), runs :func:`postbridge.mail.probe.run_probe`
and shows each step with ✓/⚠/✗, its timing and what it saw; the failing step gets "cause:", what the named checks
found ("seen:") and a "fix:" line; then the server's certificate chain as a table. ``--download-chain FILE`` saves
the chain the server sent (PEM); ``--add-to-keystore`` shows the root or topmost CA with its fingerprint and adds it
to the keystore after confirmation (``--yes`` for scripts), then runs the test again.
``--json`` prints the report as JSON. Exit code 0 when every step passed, 1 when one failed, 2 for a bad setting.
Nothing secret is ever printed: steps name the user, never the password or token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from postbridge.cli.certs_view import expiry_warning, short_fingerprint, short_sans
from postbridge.cli.common import console, ctx_obj, print_json, run_command, setup_logging
from postbridge.cli.mail import PASSWORD_ENV, load_channel
from postbridge.errors import ConfigurationError
from postbridge.home import atomic_write
from postbridge.mail.probe import KINDS, ProbeReport, run_probe
from postbridge.mail.settings import ChannelSettings
from postbridge.trust.credentials import CredentialStore
from postbridge.trust.server_chain import ChainReport
from postbridge.trust.truststore import TrustStore

app = typer.Typer(
    help="Test a mail channel step by step (hub, TCP, TLS, capabilities, login) and explain what fails.",
    no_args_is_help=True,
)

_SUMMARIES = {
    "imap": "Test an IMAP sender channel: connection, TLS/STARTTLS, capabilities, mechanisms, login, folders.",
    "pop3": "Test a POP3 sender channel: connection, TLS/STLS, capabilities, mechanisms, login, message count.",
    "smtp": "Test an SMTP receiver channel: connection, EHLO, TLS/STARTTLS, mechanisms, login, --from/--to check.",
    "tcp": "Open the connection (direct or through the hub) and read the server's first line.",
    "tls": "Open the connection and do an implicit TLS handshake (version, cipher, the certificate chain).",
}


WIDE_TABLE = 110  # columns from which the chain table shows validity and fingerprint in columns of their own


def render(report: ProbeReport, out: Console | None = None) -> None:
    """One line per step: ✓/⚠/✗, name, timing, detail; cause, evidence and fix under the failing step; the chain.
    Printed on ``out`` (default: the CLI's console)."""
    out = out or console
    out.print(f"[bold]postbridge test {report.kind}[/] {escape(report.target)}", highlight=False, emoji=False)
    width = max((len(step.name) for step in report.steps), default=0)
    for step in report.steps:
        mark = "[red]✗[/]" if not step.ok else "[yellow]⚠[/]" if step.warning else "[green]✓[/]"
        timing = f"{step.elapsed_ms:8.1f} ms"
        out.print(f" {mark} {step.name:<{width}} {timing}  {escape(step.detail)}", highlight=False, emoji=False)
        if step.warning:
            out.print(f"     [yellow]warning:[/] {escape(step.warning)}", highlight=False, emoji=False)
        if not step.ok:
            out.print(f"     [red]cause:[/] {escape(step.cause)}", highlight=False, emoji=False)
        for line in step.evidence:
            out.print(f"     [cyan]seen:[/]  {escape(line)}", highlight=False, emoji=False)
        if not step.ok and step.fix:
            out.print(f"     [yellow]fix:[/]   {escape(step.fix)}", highlight=False, emoji=False)
    if report.chain is not None:
        render_chain(report.chain, out)
    if report.ok:
        out.print(f"[green]all {len(report.steps)} steps passed[/]", highlight=False, emoji=False)
    else:
        out.print("[red]the test failed[/]", highlight=False, emoji=False)


def render_chain(chain: ChainReport, out: Console | None = None) -> None:
    """The certificate chain as a table, server certificate first, on ``out`` (default: the CLI's console).

    Below :data:`WIDE_TABLE` columns the validity and the fingerprint move into the certificate's cell, so the
    verdict keeps its column on an 80-column terminal.
    """
    out = out or console
    now = datetime.now(UTC)
    wide = out.width >= WIDE_TABLE
    columns = ("#", "role", "certificate", "valid until", "SHA-256", "trusted") if wide else ("#", "role",
               "certificate", "trusted")  # fmt: skip
    table = Table(title="certificate chain (server certificate first)", title_justify="left")
    for column in columns:
        roomy = column in ("certificate", "trusted")  # the subject and the verdict get the room a table leaves
        table.add_column(
            column, overflow="fold", no_wrap=column in ("#", "role", "SHA-256"), min_width=18 if roomy else None
        )
    for number, cert in enumerate(chain.certificates, start=1):
        info = cert.info
        until = f"{info.not_after:%Y-%m-%d}"
        warning = expiry_warning(info, now)
        if warning:
            until = f"[yellow]{until}\n{escape(warning)}[/]"
        described = f"{escape(info.subject)}\n[dim]issued by[/] {escape(info.issuer)}"
        if info.sans:
            described += f"\n[dim]names[/] {escape(short_sans(info.sans, 4))}"
        described += f"\n[dim]from[/] {escape(cert.source)}"
        verdict = ("[green]✓[/] " if cert.trusted else "[red]✗[/] ") + escape(cert.why)
        fingerprint = short_fingerprint(info.fingerprint)
        if not wide:
            described += f"\n[dim]valid until[/] {until}\n[dim]SHA-256[/] {fingerprint}"
        cells = [described, until, fingerprint, verdict] if wide else [described, verdict]
        # markup without emoji codes: a fingerprint's ":AB:" must not become an emoji on any console
        table.add_row(str(number), cert.role, *(Text.from_markup(cell, emoji=False) for cell in cells))
    out.print(table)


def download_chain(chain: ChainReport | None, path: Path) -> None:
    """Save the certificates the server sent (PEM, server certificate first). Raises ConfigurationError."""
    if chain is None:
        raise ConfigurationError(
            "no certificate chain to save: the test did not get as far as a TLS handshake",
            hint="fix the failing step first, or use protection 'tls'/'starttls-mandatory' for a TLS port",
        )
    atomic_write(path, chain.sent_pem(), mode=0o644)
    console.print(f"saved {sum(1 for c in chain.certificates if c.sent)} certificate(s) to {path}", highlight=False)


def add_to_keystore(chain: ChainReport | None, settings: ChannelSettings, *, assume_yes: bool) -> bool:
    """Show the certificate that would anchor the chain and add it to the keystore after confirmation.
    Returns True when something was added. Raises ConfigurationError when there is nothing to add."""
    if chain is None:
        raise ConfigurationError(
            "no certificate chain: the test did not get as far as a TLS handshake", hint="fix the failing step first"
        )
    if chain.trusted:
        console.print("[green]the chain is already trusted[/]: nothing to add", highlight=False)
        return False
    if chain.problem not in ("unknown-ca", "issuer-missing"):
        raise ConfigurationError(
            f"adding a certificate would not help: {chain.cause}", hint=chain.fix or "see the failing step's fix"
        )
    candidates = chain.anchor_candidates()
    if not candidates:
        raise ConfigurationError(
            "the server sent only its own certificate, so there is no CA certificate to add",
            hint="get the root CA certificate from the mail server's administrator and run 'postbridge keystore add "
            "FILE' (or have the server send its intermediate)",
        )
    if settings.keystore is None:
        raise ConfigurationError("the channel has no keystore", hint="pass --keystore FOLDER")
    console.print("[bold]to be added to the keystore[/] " + escape(str(settings.keystore)), highlight=False)
    for cert in candidates:
        info = cert.info
        console.print(f"  {cert.role}: {escape(info.subject)}", highlight=False)
        console.print(f"    issuer {escape(info.issuer)}, valid {info.not_before:%Y-%m-%d} to "
                      f"{info.not_after:%Y-%m-%d}", highlight=False)  # fmt: skip
        console.print(f"    SHA-256 {info.fingerprint}", highlight=False)
    if candidates[0].role == "intermediate":
        console.print("  [yellow]the server did not send its root: the intermediate becomes the trust anchor[/]")
    console.print("  Compare the fingerprint with one the server's administrator gives you before trusting it.")
    if not assume_yes and not typer.confirm("Add to the keystore?", default=False):
        console.print("nothing added")
        return False
    store = TrustStore(settings.keystore, command="postbridge keystore")
    for cert in candidates:
        for entry in store.add(cert.pem.encode("ascii"), source=f"the chain of {settings.address}"):
            console.print(f"[green]added[/] {entry.alias} (SHA-256 {entry.info.fingerprint})", highlight=False)
    return True


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
        download_chain_to: Annotated[
            Path | None, typer.Option("--download-chain", help="Save the server's certificate chain (PEM) here.")
        ] = None,
        add_chain: Annotated[
            bool, typer.Option("--add-to-keystore", help="Offer to trust the chain's root (or topmost CA).")
        ] = False,
        assume_yes: Annotated[bool, typer.Option("--yes", help="Do not ask before adding to the keystore.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
        sender: Annotated[
            str, typer.Option("--from", help="Check that the server accepts this sender (no mail is sent).")
        ] = "",
        recipients: Annotated[
            list[str] | None, typer.Option("--to", help="Check that the server accepts this recipient (repeatable).")
        ] = None,
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

            def probe() -> ProbeReport:
                return run_probe(
                    kind, channel, check_auth=check_auth, list_folders=list_folders, sender=sender,
                    recipients=tuple(recipients or ()),
                )  # fmt: skip

            report = probe()
            if as_json:
                if add_chain:
                    raise ConfigurationError("--add-to-keystore asks for confirmation: use it without --json")
                print_json(report.to_json())
            else:
                render(report)
            if download_chain_to is not None:
                download_chain(report.chain, download_chain_to)
            if add_chain and add_to_keystore(report.chain, channel, assume_yes=assume_yes):
                console.print("[bold]running the test again[/]")
                report = probe()
                render(report)
            if not report.ok:
                raise typer.Exit(1)

        run_command(body)

    command.__doc__ = _SUMMARIES[kind]
    command.__name__ = kind
    if kind != "smtp":  # --from/--to exist for SMTP only: typer reads the signature
        signature = inspect.signature(command, eval_str=True)
        kept = [p for name, p in signature.parameters.items() if name not in ("sender", "recipients")]
        command.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    return command


for _kind in KINDS:
    app.command(_kind)(_make_command(_kind))
