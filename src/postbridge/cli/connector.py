"""``postbridge connector …``: enroll, mappings, backend trust store, availability check, admin password, run.

The commands only parse arguments and print: every change goes through :mod:`postbridge.services.connector`, the
same functions the connector's web UI and JSON API call (validation, saving and the audit entry live there).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from postbridge.addresses import parse_host_port
from postbridge.cli import certs_view
from postbridge.cli.common import (
    console,
    ctx_obj,
    print_json,
    prompt_secret,
    run_async,
    run_command,
    setup_logging,
    stdin_line,
)
from postbridge.connector.agent import Connector, ConnectorConfig
from postbridge.connector.enroll import enroll as do_enroll
from postbridge.connector.enroll import renew as do_renew
from postbridge.connector.state import ConnectorState
from postbridge.errors import ConfigurationError, TrustError
from postbridge.services import connector as service

app = typer.Typer(
    help="Run and configure the on-premise connector (dials out to the hub; exposes only mappings).",
    no_args_is_help=True,
)
mapping_app = typer.Typer(
    help="Mappings: 'virtual host:port -> internal host:port'. Everything unmapped is denied.", no_args_is_help=True
)
trust_app = typer.Typer(
    help="Backend trust store: CA certificates trusted for 'tcp-tls' mappings. There is no 'trust all'.",
    no_args_is_help=True,
)
admin_app = typer.Typer(help="The administrator of the connector's web UI (--ui-listen).", no_args_is_help=True)
app.add_typer(mapping_app, name="mapping")
app.add_typer(trust_app, name="truststore")
app.add_typer(admin_app, name="admin")
ACTOR = service.ACTOR_CLI


def _state(ctx: typer.Context) -> ConnectorState:
    return ConnectorState(ctx_obj(ctx).ensure_home())


@app.command()
def enroll(
    ctx: typer.Context,
    cloud: Annotated[str, typer.Option(help="The hub's tunnel address HOST:PORT.")],
    token: Annotated[
        str, typer.Option(help="One-time token from 'postbridge cloud enroll'.", envvar="POSTBRIDGE_ENROLL_TOKEN")
    ],
    egress_proxy: Annotated[
        str, typer.Option(help="HTTP CONNECT proxy to reach the hub, e.g. http://proxy:3128.")
    ] = "",
    force: Annotated[bool, typer.Option(help="Replace an existing enrollment in this home folder.")] = False,
) -> None:
    """Create a key, get a certificate from the hub (bound to one subaccount and location ID) and store it."""

    async def body() -> None:
        state = _state(ctx)
        identity = await do_enroll(
            state, parse_host_port(cloud, what="--cloud"), token, egress_proxy=egress_proxy or None, force=force
        )
        console.print(
            f"[green]enrolled[/] as connector {identity.connector_id} for subaccount {identity.subaccount}, "
            f"location {identity.location or '(default)'}; valid until "
            f"{state.certificate().not_valid_after_utc:%Y-%m-%d %H:%M} UTC (renewed automatically)",
            highlight=False,
        )

    run_async(body)


@app.command()
def renew(
    ctx: typer.Context,
    egress_proxy: Annotated[str, typer.Option(help="HTTP CONNECT proxy to reach the hub.")] = "",
) -> None:
    """Renew the connector's key and certificate now (a running connector also does this by itself)."""

    async def body() -> None:
        state = _state(ctx)
        await do_renew(state, egress_proxy=egress_proxy or None, actor="cli")
        console.print(
            f"[green]renewed[/]: certificate valid until {state.certificate().not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            highlight=False,
        )

    run_async(body)


@mapping_app.command("add")
def mapping_add(
    ctx: typer.Context,
    virtual: Annotated[str, typer.Argument(help="Virtual host:port cloud applications ask for.")],
    to: Annotated[str, typer.Option("--to", help="Internal host:port the connector connects to.")],
    protocol: Annotated[
        str, typer.Option(help="'tcp' (bytes pass through) or 'tcp-tls' (connector does TLS).")
    ] = "tcp",
    tls_server_name: Annotated[str, typer.Option(help="Name to verify in the internal server's certificate.")] = "",
    description: Annotated[str, typer.Option(help="Free text shown in lists.")] = "",
) -> None:
    """Add a mapping. A running connector uses it at once, without dropping its tunnel."""

    def body() -> None:
        state = _state(ctx)
        mapping = service.add_mapping(
            state,
            parse_host_port(virtual, what="virtual host"),
            parse_host_port(to, what="--to"),
            protocol=protocol,
            tls_server_name=tls_server_name,
            description=description,
            actor=ACTOR,
        )
        console.print(
            f"[green]mapped[/] {mapping.virtual} -> {mapping.internal} ({mapping.protocol.value})", highlight=False
        )
        for warning in service.mapping_warnings(state, mapping):
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)

    run_command(body)


@mapping_app.command("list")
def mapping_list(ctx: typer.Context, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List mappings."""

    def body() -> None:
        mappings = service.list_mappings(_state(ctx))
        if json_output:
            print_json([m.to_json() for m in mappings])
            return
        table = Table("virtual", "internal", "protocol", "TLS server name", "enabled", "description")
        for m in mappings:
            table.add_row(
                str(m.virtual),
                str(m.internal),
                m.protocol.value,
                m.tls_server_name or "",
                "yes" if m.enabled else "no",
                m.description,
            )
        console.print(table)
        if not mappings:
            console.print("[dim]no mappings: everything is denied. Add one with 'postbridge connector mapping add'.[/]")

    run_command(body)


@mapping_app.command("remove")
def mapping_remove(
    ctx: typer.Context, virtual: Annotated[str, typer.Argument(help="Virtual host:port to remove.")]
) -> None:
    """Remove a mapping; new connections to it are denied at once."""

    def body() -> None:
        removed = service.remove_mapping(_state(ctx), parse_host_port(virtual, what="virtual host"), actor=ACTOR)
        console.print(f"[green]removed[/] {removed.virtual} -> {removed.internal}", highlight=False)

    run_command(body)


@trust_app.command("add")
def trust_add(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CA certificate(s), PEM or DER.")],
    alias: Annotated[str, typer.Option(help="Name for the entry (default: from the subject).")] = "",
) -> None:
    """Trust a CA (or a self-signed server certificate) for 'tcp-tls' mappings."""

    def body() -> None:
        state = _state(ctx)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise TrustError(
                f"cannot read '{file}': {exc.strerror}", hint="give the path of a PEM or DER file"
            ) from exc
        for entry in service.add_trusted(state, data, alias=alias, source=str(file), actor=ACTOR):
            console.print(
                f"[green]trusted[/] {entry.alias}: {entry.info.subject} (SHA-256 {entry.info.fingerprint})",
                highlight=False,
            )

    run_command(body)


@trust_app.command("list")
def trust_list(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Also check that each chain builds; exit code 1 if one does not.")
    ] = False,
) -> None:
    """List trusted certificates: subject, issuer, validity, SANs, fingerprint, expiry warnings."""

    def body() -> bool:
        return certs_view.list_store(_state(ctx).truststore, console, json_output=json_output, check=check)

    if not run_command(body):
        raise typer.Exit(1)


@trust_app.command("remove")
def trust_remove(
    ctx: typer.Context, alias: Annotated[str, typer.Argument(help="Alias or SHA-256 fingerprint.")]
) -> None:
    """Stop trusting a certificate."""

    def body() -> None:
        entry = service.remove_trusted(_state(ctx), alias, actor=ACTOR)
        console.print(f"[green]removed[/] {entry.alias}", highlight=False)

    run_command(body)


@app.command()
def check(
    ctx: typer.Context,
    virtual: Annotated[str, typer.Argument(help="Virtual host:port of the mapping to check.")],
    timeout: Annotated[float, typer.Option(help="Seconds for connect and TLS.")] = 5.0,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check that a mapping's internal host is reachable: TCP, TLS for tcp-tls, and the mail greeting."""

    async def body() -> None:
        target = parse_host_port(virtual, what="virtual host")
        result = await service.check(_state(ctx), target, timeout=timeout)
        if json_output:
            print_json(result.to_json())
        else:
            colour = "green" if result.reachable else "red"
            console.print(f"{target}: [{colour}]{result.summary()}[/]", highlight=False)
        if not result.reachable:
            raise typer.Exit(1)

    run_async(body)


@app.command()
def run(
    ctx: typer.Context,
    cloud: Annotated[str, typer.Option(help="Override the hub address stored at enrollment.")] = "",
    egress_proxy: Annotated[
        str, typer.Option(help="HTTP CONNECT proxy to reach the hub, e.g. http://proxy:3128.")
    ] = "",
    backoff_cap: Annotated[float, typer.Option(help="Longest wait between reconnect attempts, seconds.")] = 5.0,
    ping_interval: Annotated[float, typer.Option(help="Seconds between liveness PINGs on the tunnel.")] = 10.0,
    dead_after: Annotated[float, typer.Option(help="Seconds of silence before the tunnel counts as dead.")] = 30.0,
    ui_listen: Annotated[
        str,
        typer.Option(
            help="Serve the web UI on HOST:PORT, e.g. 127.0.0.1:8444 (plain HTTP on loopback, else HTTPS with the "
            "connector's certificate). Log in as 'admin'; see 'postbridge connector admin set-password'."
        ),
    ] = "",
    ui_tls: Annotated[
        bool | None,
        typer.Option(
            "--ui-tls/--ui-no-tls",
            help="HTTPS for the web UI (default: plain HTTP on a loopback address, HTTPS elsewhere; plain HTTP is "
            "refused off loopback).",
        ),
    ] = None,
    ui_cert: Annotated[
        Path | None,
        typer.Option(
            "--ui-cert",
            help="PEM file with the UI's server certificate and its intermediates (e.g. from your company CA, so "
            "browsers trust it); the key may be in the same file. Implies HTTPS. Default: the connector's own "
            "certificate, which browsers warn about.",
        ),
    ] = None,
    ui_key: Annotated[
        Path | None, typer.Option("--ui-key", help="PEM file with the unencrypted key of --ui-cert.")
    ] = None,
) -> None:
    """Keep the tunnel to the hub up and serve mapped connections until interrupted."""
    obj = ctx_obj(ctx)

    async def main() -> None:
        state = _state(ctx)
        setup_logging(obj.log_level, state.trace_path)
        config = ConnectorConfig(
            cloud=parse_host_port(cloud, what="--cloud") if cloud else None,
            egress_proxy=egress_proxy or None,
            backoff_cap=backoff_cap,
            ping_interval=ping_interval,
            dead_after=dead_after,
            ui_listen=parse_host_port(ui_listen, what="--ui-listen") if ui_listen else None,
            ui_tls=ui_tls,
            ui_cert=ui_cert,
            ui_key=ui_key,
        )
        if ui_key is not None and ui_cert is None:
            raise ConfigurationError("--ui-key belongs to --ui-cert", hint="give the certificate with --ui-cert")
        if ui_cert is not None and not ui_listen:
            raise ConfigurationError("--ui-cert needs --ui-listen", hint="e.g. --ui-listen 0.0.0.0:8444")
        connector = Connector(state, config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        console.print(
            f"[green]connector {connector.identity.connector_id}[/] (subaccount {connector.identity.subaccount}, "
            f"location {connector.identity.location or '(default)'}) -> hub {connector.cloud}",
            highlight=False,
        )
        sys.stdout.flush()
        await connector.run(stop)

    run_async(main)


@admin_app.command("set-password")
def admin_set_password(
    ctx: typer.Context,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (one line).")
    ] = False,
) -> None:
    """Set the password of the web UI's administrator 'admin' (argon2id hash in HOME/connector/admin.json).

    A running connector uses it at the next login; sessions opened with the old password end.
    """

    def body() -> None:
        if password_stdin:
            password = stdin_line("password")
        else:
            password = prompt_secret("new password", confirm=True, stdin_option="--password-stdin")
        service.set_admin_password(_state(ctx), password, actor=ACTOR)
        console.print("[green]password set[/] for the connector UI's administrator 'admin'", highlight=False)

    run_command(body)
