"""``postbridge mail …``: read a mailbox once (``poll``) and send mail (``send``) with every channel setting.

Settings come from options or a TOML file (``--config FILE``; keys as in ``docs/operations.md``), options winning.
Passwords are read from ``--password-stdin`` or ``POSTBRIDGE_MAIL_PASSWORD``, never from the command line, or come
from the credential store (``--credential NAME`` / ``credential = "NAME"``, see ``postbridge credentials``).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from postbridge.cli.common import console, ctx_obj, run_command, setup_logging
from postbridge.errors import ConfigurationError
from postbridge.mail.imap import open_session
from postbridge.mail.poller import (
    Pop3PostProcessing,
    PostProcessing,
    ReceivedMessage,
    Selection,
    SenderSettings,
    poll_imap,
    poll_pop3,
)
from postbridge.mail.pop3 import open_pop3
from postbridge.mail.settings import ChannelSettings, CredentialResolver, channel_from_mapping, parse_enum
from postbridge.mail.smtp import Attachment, build_message, open_smtp
from postbridge.mail.state import SqliteState
from postbridge.trust.credentials import CredentialStore

app = typer.Typer(
    help="Read and send mail through the mail adapter (directly or through the connector).", no_args_is_help=True
)

PASSWORD_ENV = "POSTBRIDGE_MAIL_PASSWORD"


def load_channel(
    config: Path | None,
    section: str,
    options: dict[str, Any],
    password_stdin: bool,
    credentials: CredentialResolver | None = None,
    default_keystore: Path | None = None,
) -> tuple[ChannelSettings, dict[str, Any]]:
    """Merge the TOML section (if any) with the options given; returns the channel and the remaining keys.

    Options win: ``--credential`` replaces a user/password from the file, ``--user``/``--password-stdin`` replace
    a ``credential`` from the file. ``credentials`` resolves a credential name.
    """
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
    given = {key: value for key, value in options.items() if value not in (None, "")}
    if "credential" in given:
        data.pop("user", None)
        data.pop("password", None)
    elif "user" in given or password_stdin:
        data.pop("credential", None)
    data.update(given)
    if password_stdin:
        data["password"] = sys.stdin.readline().rstrip("\n")
    elif "password" not in data and "credential" not in data and os.environ.get(PASSWORD_ENV):
        data["password"] = os.environ[PASSWORD_ENV]
    if default_keystore is not None and not data.get("keystore"):
        data["keystore"] = str(default_keystore)
    if data.get("user") and "password" not in data and not data.get("credential"):
        raise ConfigurationError(
            f"a user ('{data['user']}') but no password was given",
            hint=f"pass --password-stdin, set {PASSWORD_ENV}, or use a name from the credential store (--credential)",
        )
    channel_keys = {
        "address", "proxy", "location_id", "binding", "timeout", "protection", "auth", "user", "password",
        "credential", "tls_server_name", "allow_cleartext_auth", "keystore", "use_system_trust",
    }  # fmt: skip
    channel = channel_from_mapping(
        {k: v for k, v in data.items() if k in channel_keys},
        source=str(config or "options"),
        credentials=credentials,
    )
    rest = {k: v for k, v in data.items() if k not in channel_keys}
    return channel, rest


@app.command()
def poll(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(help="Mail server host:port (the virtual host for on-premise).")] = "",
    config: Annotated[
        Path | None, typer.Option(help="TOML file with the channel settings (the \\[sender] table).")
    ] = None,
    proxy: Annotated[str, typer.Option(help="'internet' or 'on-premise' (through the hub).")] = "",
    location_id: Annotated[str, typer.Option(help="Connector location ID for on-premise.")] = "",
    binding: Annotated[str, typer.Option(help="Binding file from 'postbridge cloud binding'.")] = "",
    protection: Annotated[str, typer.Option(help="off | starttls-mandatory | starttls-optional | tls")] = "",
    auth: Annotated[str, typer.Option(help="none | plain | login | cram-md5 | xoauth2 | oauthbearer")] = "",
    user: Annotated[str, typer.Option(help="User name.")] = "",
    password_stdin: Annotated[bool, typer.Option(help=f"Read the password from stdin (else ${PASSWORD_ENV}).")] = False,
    credential: Annotated[str, typer.Option(help="Name in the credential store (instead of --user).")] = "",
    tls_server_name: Annotated[str, typer.Option(help="Name the server certificate must carry.")] = "",
    keystore: Annotated[
        str, typer.Option(help="Trust store folder (roots + intermediates); default HOME/keystore.")
    ] = "",
    protocol: Annotated[str, typer.Option(help="imap | pop3")] = "imap",
    folder: Annotated[str | None, typer.Option(help="Mailbox folder (IMAP). Default INBOX.")] = None,
    selection: Annotated[str | None, typer.Option(help="unread | all. Default unread.")] = None,
    post_processing: Annotated[
        str | None,
        typer.Option(
            help="IMAP: mark-read | delete | archive | archive-and-mark-read | keep; POP3: delete | keep. Default keep."
        ),
    ] = None,
    archive_folder: Annotated[str | None, typer.Option(help="Folder for 'archive'. Default Archive.")] = None,
    max_messages: Annotated[int | None, typer.Option(help="At most this many messages. Default 100.")] = None,
    save_dir: Annotated[Path | None, typer.Option(help="Write each message as an .eml file here.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per message.")] = False,
) -> None:
    """Drain a mailbox once: fetch (unread stays unread until handed on), save or list, then post-process."""

    def body() -> None:
        home = ctx_obj(ctx).ensure_home()
        options = {
            "address": address, "proxy": proxy, "location_id": location_id, "binding": binding,
            "protection": protection, "auth": auth, "user": user, "tls_server_name": tls_server_name,
            "keystore": keystore, "credential": credential,
        }  # fmt: skip
        setup_logging(ctx_obj(ctx).log_level)
        channel, rest = load_channel(
            config, "sender", options, password_stdin, CredentialStore(home), default_keystore=home / "keystore"
        )
        kind = protocol.strip().lower()
        if kind not in ("imap", "pop3"):
            raise ConfigurationError(f"--protocol '{protocol}' is not one of: imap, pop3")

        def pick(option: Any, key: str, default: Any) -> Any:
            return option if option is not None else rest.pop(key, default)

        action = str(pick(post_processing, "post_processing", "keep"))
        sender = SenderSettings(
            folder=str(pick(folder, "folder", "INBOX")),
            selection=parse_enum(Selection, str(pick(selection, "selection", "unread")), "selection"),
            post_processing=(
                parse_enum(PostProcessing, action, "post_processing") if kind == "imap" else PostProcessing.KEEP
            ),
            archive_folder=str(pick(archive_folder, "archive_folder", "Archive")),
            max_messages_per_poll=int(pick(max_messages, "max_messages_per_poll", 100)),
        )
        if rest:
            raise ConfigurationError(
                f"{config}: unknown setting(s) {', '.join(sorted(rest))} in [sender]",
                hint="sender settings: folder, selection, post_processing, archive_folder, max_messages_per_poll",
            )
        rows: list[dict[str, Any]] = []

        def handle(message: ReceivedMessage) -> None:
            from email.parser import BytesHeaderParser

            headers = BytesHeaderParser().parsebytes(message.raw)
            row = {
                "uid": message.uid if message.uid is not None else message.uidl,
                "size": message.size,
                "from": str(headers.get("From", "")),
                "subject": str(headers.get("Subject", "")),
                "message_id": str(headers.get("Message-ID", "")),
            }
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                name = (
                    message.uid
                    if message.uid is not None
                    else hashlib.sha256(str(message.uidl).encode()).hexdigest()[:16]
                )
                target = save_dir / f"{name}.eml"
                tmp = target.with_suffix(".eml.tmp")
                tmp.write_bytes(message.raw)
                tmp.replace(target)  # only a complete file counts as handed on
                row["file"] = str(target)
            rows.append(row)
            if json_lines:
                sys.stdout.write(json.dumps(row) + "\n")

        state = SqliteState(home / "mail" / "poll-state.sqlite")
        try:
            if kind == "imap":
                with open_session(channel) as session:
                    report = poll_imap(session, sender, handle, state)
            else:
                pop_action = parse_enum(Pop3PostProcessing, action, "post_processing (POP3)")
                with open_pop3(channel) as pop3:
                    report = poll_pop3(
                        pop3,
                        handle,
                        state,
                        post_processing=pop_action,
                        max_messages_per_poll=sender.max_messages_per_poll,
                    )
        finally:
            state.close()
        if not json_lines:
            where = f" {sender.folder}" if kind == "imap" else ""
            table = Table("UID", "size", "from", "subject", title=f"{channel.describe}{where}")
            for row in rows:
                table.add_row(str(row["uid"]), str(row["size"]), row["from"], row["subject"])
            console.print(table)
            console.print(
                f"{report.delivered} handed on, {report.post_processed} post-processed ({action}), "
                f"{report.skipped} already handled, {report.failed} failed, {report.quarantined} quarantined"
            )
        if report.errors or report.failed:
            raise typer.Exit(1)

    run_command(body)


@app.command()
def send(
    ctx: typer.Context,
    sender: Annotated[str, typer.Option("--from", help="Sender address (envelope and From header).")],
    to: Annotated[list[str] | None, typer.Option("--to", help="Recipient; repeat for more.")] = None,
    cc: Annotated[list[str] | None, typer.Option("--cc", help="Copy recipient; repeat for more.")] = None,
    bcc: Annotated[list[str] | None, typer.Option("--bcc", help="Blind copy (envelope only); repeat for more.")] = None,
    subject: Annotated[str, typer.Option(help="Subject.")] = "",
    text: Annotated[str, typer.Option(help="Plain text body ('-' reads stdin).")] = "",
    html: Annotated[Path | None, typer.Option(help="File with the HTML body.")] = None,
    attach: Annotated[list[Path] | None, typer.Option(help="File to attach; repeat for more.")] = None,
    header: Annotated[list[str] | None, typer.Option(help="Extra header 'Name: value'; repeat for more.")] = None,
    charset: Annotated[str, typer.Option(help="Charset of the text parts.")] = "utf-8",
    address: Annotated[str, typer.Option(help="SMTP server host:port (the virtual host for on-premise).")] = "",
    config: Annotated[
        Path | None, typer.Option(help="TOML file with the channel settings (the \\[receiver] table).")
    ] = None,
    proxy: Annotated[str, typer.Option(help="'internet' or 'on-premise'.")] = "",
    location_id: Annotated[str, typer.Option(help="Connector location ID for on-premise.")] = "",
    binding: Annotated[str, typer.Option(help="Binding file from 'postbridge cloud binding'.")] = "",
    protection: Annotated[str, typer.Option(help="off | starttls-mandatory | starttls-optional | tls")] = "",
    auth: Annotated[str, typer.Option(help="none | plain | login | cram-md5 | xoauth2 | oauthbearer")] = "",
    user: Annotated[str, typer.Option(help="User name.")] = "",
    password_stdin: Annotated[bool, typer.Option(help=f"Read the password from stdin (else ${PASSWORD_ENV}).")] = False,
    credential: Annotated[str, typer.Option(help="Name in the credential store (instead of --user).")] = "",
    tls_server_name: Annotated[str, typer.Option(help="Name the server certificate must carry.")] = "",
    keystore: Annotated[str, typer.Option(help="Trust store folder; default HOME/keystore.")] = "",
) -> None:
    """Send one message through an SMTP receiver channel (directly or through the connector)."""

    def body() -> None:
        home = ctx_obj(ctx).ensure_home()
        options = {
            "address": address, "proxy": proxy, "location_id": location_id, "binding": binding,
            "protection": protection, "auth": auth, "user": user, "tls_server_name": tls_server_name,
            "keystore": keystore, "credential": credential,
        }  # fmt: skip
        if text == "-" and password_stdin:
            raise ConfigurationError(
                "--text - and --password-stdin both want standard input",
                hint=f"give the password in {PASSWORD_ENV} or the credential store, or the text as an argument",
            )
        setup_logging(ctx_obj(ctx).log_level)
        channel, _ = load_channel(
            config, "receiver", options, password_stdin, CredentialStore(home), default_keystore=home / "keystore"
        )
        body_text = sys.stdin.read() if text == "-" else text
        attachments = []
        for path in attach or []:
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"cannot read attachment '{path}': {exc.strerror}") from exc
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            attachments.append(Attachment(path.name, content, kind))
        extra = []
        for line in header or []:
            name, colon, value = line.partition(":")
            if not colon:
                raise ConfigurationError(f"--header '{line}' is not 'Name: value'")
            extra.append((name.strip(), value.strip()))
        mail = build_message(
            sender=sender,
            to=to or [],
            cc=cc or [],
            bcc=bcc or [],
            subject=subject,
            text=body_text or None,
            html=html.read_text(encoding="utf-8") if html else None,
            charset=charset,
            attachments=attachments,
            headers=extra,
        )
        with open_smtp(channel) as session:
            refused = session.send_mail(mail)
            session.quit()
        accepted = [r for r in mail.recipients if r not in refused]
        console.print(f"[green]sent[/] to {', '.join(accepted) or 'nobody'} via {channel.describe}", highlight=False)
        for recipient, (code, reason) in refused.items():
            console.print(f"[red]refused[/] {recipient}: {code} {reason}", highlight=False)
        if refused:
            raise typer.Exit(1)

    run_command(body)
