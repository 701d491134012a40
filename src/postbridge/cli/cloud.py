"""``postbridge cloud …``: the cloud hub's commands (init, subaccounts, bindings, enrollment tokens, the cockpit's
administrator, serve).

Subaccounts and enrollment tokens go through :class:`postbridge.services.cloud.CloudService`, the same operations
the cockpit's pages and JSON API call; this module parses arguments and prints.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from postbridge.addresses import parse_host_port
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
from postbridge.cloud.hub import Hub, HubConfig
from postbridge.cloud.state import HubState
from postbridge.errors import ConfigurationError
from postbridge.services.cloud import ADMIN_COMMAND, CloudService, admin_path, binding_document

app = typer.Typer(
    help="Run and administer the cloud hub (tunnel endpoint, SOCKS5 proxy, token API).", no_args_is_help=True
)
subaccount_app = typer.Typer(
    help="Subaccounts: the tenants whose cloud applications use the SOCKS5 proxy.", no_args_is_help=True
)
app.add_typer(subaccount_app, name="subaccount")
admin_app = typer.Typer(
    help="The cockpit's local administrator (who may log in to the pages and the JSON API).", no_args_is_help=True
)
app.add_typer(admin_app, name="admin")

DEFAULT_TUNNEL = "0.0.0.0:8443"
DEFAULT_SOCKS = "127.0.0.1:1080"
DEFAULT_API = "127.0.0.1:8080"


@app.command()
def init(
    ctx: typer.Context,
    hostname: Annotated[
        list[str], typer.Option("--hostname", help="Name (or IP) connectors use to reach the hub; repeat for more.")
    ],
) -> None:
    """Create the hub's CA (kept if it exists) and a server certificate for the given host names."""

    def body() -> None:
        home = ctx_obj(ctx).ensure_home()
        result = HubState(home).init(hostname)
        console.print(f"[green]hub initialised[/] in {home / 'cloud'}")
        console.print(f"server certificate for: {', '.join(result['hostnames'])}")
        console.print(f"CA fingerprint (SHA-256): {result['ca_fingerprint']}")

    run_command(body)


@subaccount_app.command("add")
def subaccount_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Subaccount name: 1-64 of A-Z a-z 0-9 . _ -")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a subaccount and print its client id and secret (the secret is shown only once)."""

    def body() -> None:
        created = _service(ctx).add_subaccount(name)
        if json_output:
            print_json(
                {
                    "subaccount": created.subaccount,
                    "client_id": created.client_id,
                    "client_secret": created.client_secret,
                }
            )
            return
        console.print(f"[green]subaccount '{created.subaccount}' created[/]")
        console.print(f"client id:     {created.client_id}")
        console.print(f"client secret: {created.client_secret}")
        console.print("[dim]store the secret now: it is not shown again[/]")

    run_command(body)


@subaccount_app.command("list")
def subaccount_list(ctx: typer.Context, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List subaccounts (never their secrets)."""

    def body() -> None:
        subaccounts = _service(ctx).subaccounts()
        if json_output:
            print_json([{"subaccount": view.name, "created": view.created} for view in subaccounts])
            return
        table = Table("subaccount", "created")
        for view in subaccounts:
            table.add_row(view.name, view.created)
        console.print(table)

    run_command(body)


@app.command()
def binding(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Subaccount name.")],
    secret: Annotated[
        str,
        typer.Option(
            help="The subaccount's client secret (shown by 'subaccount add').", envvar="POSTBRIDGE_CLIENT_SECRET"
        ),
    ] = "",
    socks: Annotated[str, typer.Option(help="SOCKS5 address cloud applications use.")] = DEFAULT_SOCKS,
    api: Annotated[str, typer.Option(help="HTTPS API address cloud applications use.")] = DEFAULT_API,
) -> None:
    """Print the JSON binding a cloud application needs: SOCKS5 host/port, token URL, client id/secret, hub CA."""

    def body() -> None:
        state = HubState(ctx_obj(ctx).ensure_home())
        if name not in state.subaccounts():
            raise ConfigurationError(
                f"unknown subaccount '{name}'", hint=f"create it: 'postbridge cloud subaccount add {name}'"
            )
        if secret:
            state.verify_client(name, secret)
        socks_address = parse_host_port(socks, what="--socks")
        api_address = parse_host_port(api, what="--api")
        print_json(binding_document(state, name, secret, socks_address, api_address))

    run_command(body)


@app.command()
def enroll(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Subaccount the connector will serve.")],
    location: Annotated[str, typer.Option(help="Location ID of the connector ('' = default location).")] = "",
    ttl: Annotated[int, typer.Option(help="Minutes the token stays valid.")] = 15,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a one-time enrollment token for a connector (it pins the hub's CA)."""

    def body() -> None:
        token = _service(ctx).create_token(name, location, ttl)
        if json_output:
            print_json(
                {
                    "token": token.token,
                    "subaccount": token.subaccount,
                    "location": token.location,
                    "expires_at": int(token.expires_at),
                }
            )
            return
        console.print(token.token, soft_wrap=True, highlight=False)

    run_command(body)


@app.command()
def serve(
    ctx: typer.Context,
    tunnel_listen: Annotated[str, typer.Option(help="Where connectors connect (TLS 1.3, mutual).")] = DEFAULT_TUNNEL,
    socks_listen: Annotated[str, typer.Option(help="SOCKS5 proxy for cloud applications.")] = DEFAULT_SOCKS,
    api_listen: Annotated[str, typer.Option(help="HTTPS API (token endpoint, connector views).")] = DEFAULT_API,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds a client may take for its TLS/SOCKS5 handshake.")
    ] = 10.0,
    ping_interval: Annotated[float, typer.Option(help="Seconds between liveness PINGs on each tunnel.")] = 10.0,
    dead_after: Annotated[float, typer.Option(help="Seconds of silence after which a tunnel is declared dead.")] = 30.0,
    flows: Annotated[
        Path | None,
        typer.Option("--flows", help="Flows file whose health and message log the cockpit shows (read-only)."),
    ] = None,
) -> None:
    """Run the hub until interrupted (Ctrl-C or SIGTERM drains and stops). The API address also serves the
    cockpit (pages under /cockpit/, JSON under /api/v1/cockpit/)."""
    obj = ctx_obj(ctx)

    async def main() -> None:
        setup_logging(obj.log_level, obj.ensure_home() / "cloud" / "hub.log")
        config = HubConfig(
            tunnel_listen=parse_host_port(tunnel_listen, what="--tunnel-listen"),
            socks_listen=parse_host_port(socks_listen, what="--socks-listen"),
            api_listen=parse_host_port(api_listen, what="--api-listen") if api_listen else None,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            dead_after=dead_after,
            flows_file=flows.resolve() if flows is not None else None,
        )
        state = HubState(obj.home)
        state.settings()  # fails early with a clear message when not initialised
        if flows is not None and not flows.is_file():
            raise ConfigurationError(
                f"the flows file '{flows}' does not exist",
                hint="give the file 'postbridge run' uses, or leave --flows out",
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with AsyncExitStack() as stack:
            hub = Hub(state, config)
            try:
                await hub.start(stack)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot listen: {exc.strerror or exc}",
                    hint="pick free ports with --tunnel-listen/--socks-listen/--api-listen",
                ) from exc
            console.print(
                f"[green]hub running[/]: tunnel {hub.tunnel_address}, SOCKS5 {hub.socks_address}, "
                f"API {'https://' + str(hub.api_address) if hub.api_address else 'off'}",
                highlight=False,
            )
            if hub.api_address is not None:
                from postbridge.web.auth import AdminStore, first_start

                first_start(
                    AdminStore(admin_path(obj.home), command=ADMIN_COMMAND),
                    what=f"cloud cockpit at https://{hub.api_address}/cockpit/",
                )
            await stop.wait()

    run_async(main)


@admin_app.command("set-password")
def admin_set_password(
    ctx: typer.Context,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Set the password of the cockpit's administrator (asked twice; at least 8 characters). Sessions opened
    with the old password end."""

    def body() -> None:
        from postbridge.web.auth import AdminStore

        home = ctx_obj(ctx).ensure_home()
        if password_stdin:
            password = stdin_line("password")
        else:
            password = prompt_secret("new cockpit password", confirm=True, stdin_option="--password-stdin")
        store = AdminStore(admin_path(home), command=ADMIN_COMMAND)
        store.set_password(password)
        console.print(f"[green]cockpit password set[/] ({store.path})", highlight=False)

    run_command(body)


def _service(ctx: typer.Context) -> CloudService:
    return CloudService(HubState(ctx_obj(ctx).ensure_home()))
