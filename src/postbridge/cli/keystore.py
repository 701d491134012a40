"""``postbridge keystore …``: the certificates the mail adapter trusts (``HOME/keystore``).

The keystore is a :class:`~postbridge.trust.truststore.TrustStore`: roots AND intermediates, each a trust anchor
of its own (the adapter verifies with ``VERIFY_X509_PARTIAL_CHAIN``), so an intermediate may be stored without its
root. ``list`` and ``show`` also check that a stored chain actually builds (:mod:`postbridge.trust.chains`).

This module owns the command group: arguments, reading and writing the user's files, exit codes. Listing and
describing certificates is shared with ``postbridge connector truststore`` in :mod:`postbridge.cli.certs_view`.
It must not bypass TrustStore (no direct file edits in the keystore folder).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization

from postbridge.cli import certs_view
from postbridge.cli.common import console, ctx_obj, err_console, print_json, run_command
from postbridge.errors import ConfigurationError
from postbridge.trust.chains import build_chain
from postbridge.trust.truststore import TrustStore

COMMAND = "postbridge keystore"

app = typer.Typer(
    help="Keystore of the mail adapter (HOME/keystore): the root and intermediate CA certificates trusted when "
    "it opens TLS to a mail server. There is no 'trust all'.",
    no_args_is_help=True,
)

KeyArgument = Annotated[str, typer.Argument(help="Alias, SHA-256 fingerprint, or a unique fingerprint prefix.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def keystore_path(home: Path) -> Path:
    """Where the keystore of the home folder lives (the default of ``postbridge mail … --keystore``)."""
    return home / "keystore"


def open_keystore(ctx: typer.Context, *, create_home: bool = False) -> TrustStore:
    context = ctx_obj(ctx)
    home = context.ensure_home() if create_home else context.home
    return TrustStore(keystore_path(home), command=COMMAND)


@app.command("list")
def list_command(
    ctx: typer.Context,
    json_output: JsonOption = False,
    check: Annotated[
        bool, typer.Option("--check", help="Also check that each chain builds; exit code 1 if one does not.")
    ] = False,
) -> None:
    """List the trusted certificates: subject, issuer, validity, SANs, fingerprint, expiry warnings."""

    def body() -> bool:
        return certs_view.list_store(open_keystore(ctx), console, json_output=json_output, check=check)

    if not run_command(body):
        raise typer.Exit(1)


@app.command("add")
def add_command(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Certificate file (PEM, several PEM, or DER); '-' reads stdin.")],
    alias: Annotated[
        str, typer.Option(help="Name for the entry (default: from the subject); bundles get -2, -3…")
    ] = "",
) -> None:
    """Trust root or intermediate CA certificates (each certificate of a bundle is stored separately)."""

    def body() -> None:
        data, source = _read_input(file)
        store = open_keystore(ctx, create_home=True)
        entries = store.add(data, alias=alias or None, source=source)
        now = datetime.now(UTC)
        chains = certs_view.check_chains(store.certificates(), now)
        for entry in entries:
            kind = certs_view.ca_label(entry.info)
            console.print(
                f"[green]added[/] {entry.alias}: {entry.info.subject} ({kind}, SHA-256 {entry.info.fingerprint})",
                highlight=False,
            )
            warning = certs_view.expiry_warning(entry.info, now)
            if warning:
                console.print(f"  [yellow]warning:[/] {warning}", highlight=False)
            chain = chains[entry.alias]
            style = "green" if chain.ok else "red"
            console.print(f"  chain: [{style}]{chain.summary}[/]", highlight=False)

    run_command(body)


@app.command("show")
def show_command(ctx: typer.Context, key: KeyArgument, json_output: JsonOption = False) -> None:
    """Everything about one certificate, and whether its chain builds through the keystore."""

    def body() -> None:
        store = open_keystore(ctx)
        entry, cert = store.get(key)
        now = datetime.now(UTC)
        chain = build_chain(cert, {other.alias: other_cert for other, other_cert in store.certificates()}, now=now)
        details = certs_view.certificate_details(entry, cert, now)
        if json_output:
            print_json({**details, "chain": certs_view.chain_json(chain)})
        else:
            certs_view.print_details(details, chain, console)

    run_command(body)


@app.command("remove")
def remove_command(ctx: typer.Context, key: KeyArgument) -> None:
    """Stop trusting a certificate."""

    def body() -> None:
        store = open_keystore(ctx)
        entry, _ = store.get(key)
        store.remove(entry.alias)
        console.print(
            f"[green]removed[/] {entry.alias}: {entry.info.subject} (SHA-256 {entry.info.fingerprint})",
            highlight=False,
        )

    run_command(body)


@app.command("export")
def export_command(
    ctx: typer.Context,
    key: KeyArgument,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    der: Annotated[bool, typer.Option("--der", help="DER (binary) instead of PEM.")] = False,
) -> None:
    """Write one certificate as PEM (default, to stdout) or DER."""

    def body() -> None:
        entry, cert = open_keystore(ctx).get(key)
        data = cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
        if out is None:
            if der and sys.stdout.isatty():
                raise ConfigurationError(
                    "DER is binary and would garble the terminal", hint="give '--out FILE' or redirect stdout"
                )
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write '{out}': {exc.strerror}", hint="choose a file in a folder you can write to"
            ) from exc
        err_console.print(f"exported {entry.alias} to {out} ({'DER' if der else 'PEM'})", highlight=False)

    run_command(body)


def _read_input(file: str) -> tuple[bytes, str]:
    if file == "-":
        return sys.stdin.buffer.read(), "stdin"
    try:
        return Path(file).read_bytes(), file
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read '{file}': {exc.strerror}", hint="give the path of a PEM or DER certificate file"
        ) from exc
