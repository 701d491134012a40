"""``postbridge credentials …``: the encrypted credential store that mail channels name with ``credential``.

Secrets are read from a hidden prompt (passwords twice) or from stdin (``--password-stdin``,
``--refresh-token-stdin`` and ``--client-secret-stdin``: one line each, in that order), never from the command
line. Nothing here prints a secret: ``list``, ``show`` and ``--json`` give names, kinds, users and dates only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from postbridge.cli.common import console, ctx_obj, print_json, prompt_secret, run_command, stdin_line
from postbridge.errors import ConfigurationError
from postbridge.trust.credentials import (
    KEY_ENV,
    CredentialStore,
    Entry,
    OAuth2Entry,
    PasswordEntry,
    summary,
    validate_name,
)
from postbridge.trust.oauth2 import check_token_url

app = typer.Typer(
    help="Encrypted credential store: passwords and OAuth2 refresh tokens for mail channels "
    "(use them with 'credential = \"NAME\"' or 'postbridge mail … --credential NAME').",
    no_args_is_help=True,
)

KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help=f"File with the store's key (base64 of 32 bytes). Default: ${KEY_ENV}, else HOME/credentials.key.",
    ),
]
NameArgument = Annotated[str, typer.Argument(help="Name of the credential, e.g. 'corp-mailbox'.")]
Replace = Annotated[bool, typer.Option(help="Replace an existing entry of that name.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (never contains a secret).")]


def _store(ctx: typer.Context, key_file: Path | None) -> CredentialStore:
    return CredentialStore(ctx_obj(ctx).ensure_home(), key_file=key_file)


def _add(store: CredentialStore, entry: Entry, replace: bool) -> None:
    key_file = store.key_file
    key_existed = key_file is None or key_file.exists()
    stored = store.add(entry, replace=replace)
    console.print(
        f"[green]stored[/] credential '{escape(stored.name)}' ({stored.kind}, user '{escape(stored.user)}') "
        f"in {store.path}",
        highlight=False,
    )
    if not key_existed:
        console.print(
            f"[yellow]created the key file[/] {key_file}: keep a copy apart from the store — without it the "
            f"credentials cannot be read (or give the key in ${KEY_ENV} instead)",
            highlight=False,
        )


@app.command("add")
def add(
    ctx: typer.Context,
    name: NameArgument,
    user: Annotated[str, typer.Option(help="User name to log in with.")],
    password_stdin: Annotated[bool, typer.Option(help="Read the password from the first line of stdin.")] = False,
    replace: Replace = False,
    key_file: KeyFile = None,
) -> None:
    """Store a user and password (prompted twice with hidden input, or --password-stdin)."""

    def body() -> None:
        validate_name(name)
        if not user:
            raise ConfigurationError("--user is empty", hint="give the user name the mail server expects")
        if password_stdin:
            password = stdin_line("password")
        else:
            password = prompt_secret("password", confirm=True, stdin_option="--password-stdin")
        _add(_store(ctx, key_file), PasswordEntry(name=name, user=user, password=password), replace)

    run_command(body)


@app.command("add-oauth2")
def add_oauth2(
    ctx: typer.Context,
    name: NameArgument,
    user: Annotated[str, typer.Option(help="Mailbox user (the 'user=' of XOAUTH2 / OAUTHBEARER).")],
    token_url: Annotated[str, typer.Option(help="The provider's token endpoint (https).")],
    client_id: Annotated[str, typer.Option(help="OAuth2 client id of the registered application.")],
    refresh_token_stdin: Annotated[
        bool, typer.Option(help="Read the refresh token from the first line of stdin (else a hidden prompt).")
    ] = False,
    client_secret_stdin: Annotated[
        bool, typer.Option(help="Read the client secret from stdin (after the refresh token); none without it.")
    ] = False,
    scope: Annotated[str, typer.Option(help="Scope to ask for, space-separated (optional).")] = "",
    replace: Replace = False,
    key_file: KeyFile = None,
) -> None:
    """Store an OAuth2 refresh-token grant for 'xoauth2' / 'oauthbearer' logins."""

    def body() -> None:
        validate_name(name)
        check_token_url(token_url)
        if not user or not client_id:
            raise ConfigurationError("--user and --client-id must not be empty")
        if refresh_token_stdin:
            refresh_token = stdin_line("refresh token")
        else:
            refresh_token = prompt_secret("refresh token", confirm=False, stdin_option="--refresh-token-stdin")
        client_secret = stdin_line("client secret") if client_secret_stdin else ""
        entry = OAuth2Entry(
            name=name,
            user=user,
            token_url=token_url.strip(),
            client_id=client_id,
            refresh_token=refresh_token,
            client_secret=client_secret,
            scope=scope,
        )
        _add(_store(ctx, key_file), entry, replace)

    run_command(body)


def _table(entries: list[Entry], title: str) -> Table:
    table = Table("name", "kind", "user", "created", "updated", title=title)
    for entry in entries:
        row = summary(entry)
        table.add_row(*(escape(row[column]) for column in ("name", "kind", "user", "created", "updated")))
    return table


@app.command("list")
def list_(ctx: typer.Context, as_json: AsJson = False, key_file: KeyFile = None) -> None:
    """Show names, kinds, users and dates of the stored credentials (never a secret)."""

    def body() -> None:
        store = _store(ctx, key_file)
        entries = store.list()
        if as_json:
            print_json([summary(entry) for entry in entries])
        elif not entries:
            console.print(f"no credentials in {store.path}; add one with 'postbridge credentials add NAME --user U'")
        else:
            console.print(_table(entries, str(store.path)))

    run_command(body)


@app.command("show")
def show(ctx: typer.Context, name: NameArgument, as_json: AsJson = False, key_file: KeyFile = None) -> None:
    """Show one credential like 'list' does (never a secret)."""

    def body() -> None:
        entry = _store(ctx, key_file).get(name)
        if as_json:
            print_json(summary(entry))
        else:
            console.print(_table([entry], name))

    run_command(body)


@app.command("remove")
def remove(ctx: typer.Context, name: NameArgument, key_file: KeyFile = None) -> None:
    """Delete a credential (channels that name it stop working)."""

    def body() -> None:
        entry = _store(ctx, key_file).remove(name)
        console.print(f"[green]removed[/] credential '{escape(entry.name)}' ({entry.kind})", highlight=False)

    run_command(body)
