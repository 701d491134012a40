"""The ``postbridge`` command: global options and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from postbridge import __version__
from postbridge.cli import cloud, connector, credentials, keystore, lab, mail, probe, runtime
from postbridge.cli.common import HOME_HELP, Context, home_from
from postbridge.demo.command import demo

app = typer.Typer(
    help="postbridge: reach mail servers inside a private network from the cloud — an outbound connector, "
    "a SOCKS5 cloud hub and a mail adapter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(cloud.app, name="cloud")
app.add_typer(connector.app, name="connector")
app.add_typer(mail.app, name="mail")
app.add_typer(keystore.app, name="keystore")
app.add_typer(credentials.app, name="credentials")
app.add_typer(probe.app, name="test")
app.command("run")(runtime.run)
app.add_typer(runtime.flows_app, name="flows")
app.add_typer(runtime.messages_app, name="messages")
app.command("demo")(demo)
app.command("lab")(lab.lab)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"postbridge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[str | None, typer.Option("--home", help=HOME_HELP, envvar="POSTBRIDGE_HOME")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    ctx.obj = Context(home_from(home), log_level)


def main() -> None:
    app()
