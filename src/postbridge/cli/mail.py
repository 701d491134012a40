"""``postbridge mail …``: read a mailbox once (``poll``) and send mail (``send``) with every channel setting.

Settings come from options or a TOML file (``--config FILE``; keys as in ``docs/operations.md``), options winning.
Passwords are read from ``--password-stdin`` or ``POSTBRIDGE_MAIL_PASSWORD``, never from the command line.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from postbridge.cli.common import console, ctx_obj, run_command
from postbridge.errors import ConfigurationError
from postbridge.mail.imap import open_session
from postbridge.mail.poller import PostProcessing, ReceivedMessage, Selection, SenderSettings, poll_imap
from postbridge.mail.settings import ChannelSettings, channel_from_mapping, parse_enum
from postbridge.mail.state import SqliteState

app = typer.Typer(
    help="Read and send mail through the mail adapter (directly or through the connector).", no_args_is_help=True
)

PASSWORD_ENV = "POSTBRIDGE_MAIL_PASSWORD"


def load_channel(
    config: Path | None, section: str, options: dict[str, Any], password_stdin: bool
) -> tuple[ChannelSettings, dict[str, Any]]:
    """Merge the TOML section (if any) with the options given; returns the channel and the remaining keys."""
    data: dict[str, Any] = {}
    if config is not None:
        try:
            parsed = tomllib.loads(config.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read '{config}': {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"'{config}' is not valid TOML: {exc}") from exc
        table = parsed.get(section, parsed)
        if not isinstance(table, dict):
            raise ConfigurationError(f"'{config}': [{section}] must be a table")
        data.update(table)
    data.update({key: value for key, value in options.items() if value not in (None, "")})
    if password_stdin:
        data["password"] = sys.stdin.readline().rstrip("\n")
    elif "password" not in data and os.environ.get(PASSWORD_ENV):
        data["password"] = os.environ[PASSWORD_ENV]
    channel_keys = {
        "address", "proxy", "location_id", "binding", "timeout", "protection", "auth", "user", "password",
        "tls_server_name", "allow_cleartext_auth", "keystore", "use_system_trust",
    }  # fmt: skip
    channel = channel_from_mapping(
        {k: v for k, v in data.items() if k in channel_keys}, source=str(config or "options")
    )
    rest = {k: v for k, v in data.items() if k not in channel_keys}
    return channel, rest


@app.command()
def poll(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(help="Mail server host:port (the virtual host for on-premise).")] = "",
    config: Annotated[Path | None, typer.Option(help="TOML file with the channel settings ([sender] table).")] = None,
    proxy: Annotated[str, typer.Option(help="'internet' or 'on-premise' (through the hub).")] = "",
    location_id: Annotated[str, typer.Option(help="Connector location ID for on-premise.")] = "",
    binding: Annotated[str, typer.Option(help="Binding file from 'postbridge cloud binding'.")] = "",
    protection: Annotated[str, typer.Option(help="off | starttls-mandatory | starttls-optional | tls")] = "",
    auth: Annotated[str, typer.Option(help="none | plain | login | cram-md5 | xoauth2 | oauthbearer")] = "",
    user: Annotated[str, typer.Option(help="User name.")] = "",
    password_stdin: Annotated[bool, typer.Option(help=f"Read the password from stdin (else ${PASSWORD_ENV}).")] = False,
    tls_server_name: Annotated[str, typer.Option(help="Name the server certificate must carry.")] = "",
    keystore: Annotated[
        str, typer.Option(help="Trust store folder (roots + intermediates); default HOME/keystore.")
    ] = "",
    folder: Annotated[str, typer.Option(help="Mailbox folder.")] = "INBOX",
    selection: Annotated[str, typer.Option(help="unread | all")] = "unread",
    post_processing: Annotated[
        str, typer.Option(help="mark-read | delete | archive | archive-and-mark-read | keep")
    ] = "keep",
    archive_folder: Annotated[str, typer.Option(help="Folder for 'archive'.")] = "Archive",
    max_messages: Annotated[int, typer.Option(help="At most this many messages.")] = 100,
    save_dir: Annotated[Path | None, typer.Option(help="Write each message as an .eml file here.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per message.")] = False,
) -> None:
    """Drain a mailbox once: fetch (unread stays unread until handed on), save or list, then post-process."""

    def body() -> None:
        home = ctx_obj(ctx).ensure_home()
        options = {
            "address": address, "proxy": proxy, "location_id": location_id, "binding": binding,
            "protection": protection, "auth": auth, "user": user, "tls_server_name": tls_server_name,
            "keystore": keystore or str(home / "keystore"),
        }  # fmt: skip
        channel, _ = load_channel(config, "sender", options, password_stdin)
        sender = SenderSettings(
            folder=folder,
            selection=parse_enum(Selection, selection, "--selection"),
            post_processing=parse_enum(PostProcessing, post_processing, "--post-processing"),
            archive_folder=archive_folder,
            max_messages_per_poll=max_messages,
        )
        rows: list[dict[str, Any]] = []

        def handle(message: ReceivedMessage) -> None:
            from email.parser import BytesHeaderParser

            headers = BytesHeaderParser().parsebytes(message.raw)
            row = {
                "uid": message.uid,
                "size": message.size,
                "from": str(headers.get("From", "")),
                "subject": str(headers.get("Subject", "")),
                "message_id": str(headers.get("Message-ID", "")),
            }
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                target = save_dir / f"{message.uid}.eml"
                tmp = target.with_suffix(".eml.tmp")
                tmp.write_bytes(message.raw)
                tmp.replace(target)  # only a complete file counts as handed on
                row["file"] = str(target)
            rows.append(row)
            if json_lines:
                sys.stdout.write(json.dumps(row) + "\n")

        state = SqliteState(home / "mail" / "poll-state.sqlite")
        try:
            with open_session(channel) as session:
                report = poll_imap(session, sender, handle, state)
        finally:
            state.close()
        if not json_lines:
            table = Table("UID", "size", "from", "subject", title=f"{channel.describe} {folder}")
            for row in rows:
                table.add_row(str(row["uid"]), str(row["size"]), row["from"], row["subject"])
            console.print(table)
            console.print(
                f"{report.delivered} handed on, {report.post_processed} post-processed ({post_processing}), "
                f"{report.skipped} already handled, {report.failed} failed, {report.quarantined} quarantined"
            )
        if report.errors or report.failed:
            raise typer.Exit(1)

    run_command(body)
