"""``postbridge run``, ``postbridge flows check|status|example`` and ``postbridge messages list|show``.

Owns: reading a flows file for the runtime (credential names are looked up in the credential store; ``check`` and
``status`` only check that they exist and never fetch a token), starting the runtime with its metrics endpoint and
signal handling, and showing flow health and the message processing log as tables (or ``--json``).
Must not: schedule or poll itself (runtime/engine.py does).
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from postbridge.cli.common import console, ctx_obj, print_json, run_command, setup_logging
from postbridge.errors import ConfigurationError
from postbridge.runtime.config import EXAMPLE, FlowsFileError, RuntimeConfig
from postbridge.runtime.engine import flow_health_rows
from postbridge.runtime.launch import opened_runtime, read_flows
from postbridge.runtime.metrics import Metrics, MetricsServer
from postbridge.runtime.store import Attempt, MessageRecord, MessageStatus, RuntimeStore, open_store
from postbridge.services.cloud import parse_since
from postbridge.services.cloud_views import ago

flows_app = typer.Typer(help="Check a flows file, and see how its flows are doing.", no_args_is_help=True)
messages_app = typer.Typer(help="The message processing log: what happened to every message.", no_args_is_help=True)

FlowsArgument = Annotated[Path, typer.Argument(help="The flows file (TOML; see 'postbridge flows example').")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _load(home: Path, path: Path, *, resolve_secrets: bool) -> RuntimeConfig:
    return read_flows(home, path, resolve_secrets=resolve_secrets)


def _show_problems(error: FlowsFileError) -> None:
    console.print(f"[red]{escape(error.message)}[/]", highlight=False)
    for problem in error.problems:
        where = f"{error.path}:{problem.line}" if problem.line else str(error.path)
        console.print(f"  [bold]{escape(where)}[/]: {escape(problem.message)}", highlight=False)
        if problem.hint:
            console.print(f"    [yellow]fix:[/] {escape(problem.hint)}", highlight=False)


def _flows_table(config: RuntimeConfig) -> Table:
    table = Table(
        "flow", "protocol", "mailbox", "mode", "target", "enabled", title=str(config.path), title_justify="left"
    )
    for flow in config.flows:
        via = f" via {flow.channel.location_id or 'default'}" if flow.channel.proxy.value == "on-premise" else ""
        mailbox = f"{flow.channel.address}{via} {flow.sender.folder if flow.protocol == 'imap' else ''}".strip()
        mode = "IDLE" if flow.mode == "idle" else f"every {flow.interval:g} s"
        target = f"{flow.target.get('kind')} {flow.target.get('url') or flow.target.get('path') or ''}".strip()
        table.add_row(flow.name, flow.protocol, escape(mailbox), mode, escape(target), "yes" if flow.enabled else "no")
    return table


def run(
    ctx: typer.Context,
    flows: FlowsArgument,
    once: Annotated[bool, typer.Option("--once", help="Poll every flow once until drained, then exit.")] = False,
    worker: Annotated[str, typer.Option(help="This worker's name in leases (default: host-pid).")] = "",
) -> None:
    """Run every flow of FLOWS: poll, hand each message to its target, post-process, retry, report health."""

    def body() -> int:
        home = ctx_obj(ctx).ensure_home()
        setup_logging(ctx_obj(ctx).log_level)
        try:
            config = _load(home, flows, resolve_secrets=True)
        except FlowsFileError as exc:
            _show_problems(exc)
            return 2
        console.print(_flows_table(config))
        metrics = Metrics()
        with opened_runtime(home, config, metrics=metrics, worker=worker or None) as runtime:
            if once:
                results = runtime.run_once()
                for name, error in results.items():
                    mark = "[green]✓[/]" if not error else "[red]✗[/]"
                    console.print(f"{mark} {name}: {escape(error or 'drained')}", highlight=False)
                return 1 if any(results.values()) else 0
            server: MetricsServer | None = None
            if config.metrics is not None:
                server = MetricsServer(metrics, config.metrics, runtime.ready)
                console.print(f"metrics, /healthz and /readyz on http://{server.address}/", highlight=False)
            try:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, lambda *_: runtime.stop())
                runtime.run()
            finally:
                if server is not None:
                    server.close()
            return 0

    code = run_command(body)
    if code:
        raise typer.Exit(code)


@flows_app.command("check")
def flows_check(ctx: typer.Context, flows: FlowsArgument) -> None:
    """Validate a flows file: every problem with file, line and fix (exit 2), else the flows as a table."""

    def body() -> int:
        home = ctx_obj(ctx).ensure_home()
        try:
            config = _load(home, flows, resolve_secrets=False)
        except FlowsFileError as exc:
            _show_problems(exc)
            return 2
        console.print(_flows_table(config))
        console.print(f"[green]{len(config.flows)} flow(s), no problems[/]", highlight=False)
        return 0

    code = run_command(body)
    if code:
        raise typer.Exit(code)


@flows_app.command("example")
def flows_example() -> None:
    """Print a complete, commented flows file to start from."""
    typer.echo(EXAMPLE.strip())


@flows_app.command("status")
def flows_status(ctx: typer.Context, flows: FlowsArgument, as_json: JsonOption = False) -> None:
    """Health of every flow from the shared state: last poll, last success, backlog. Exit 1 if one is unhealthy."""

    def body() -> int:
        home = ctx_obj(ctx).ensure_home()
        try:
            config = _load(home, flows, resolve_secrets=False)
        except FlowsFileError as exc:
            _show_problems(exc)
            return 2
        store = open_store(config.state, home=home)
        try:
            rows = flow_health_rows(config, store, time.time())
        finally:
            store.close()
        if as_json:
            print_json(rows)
        else:
            table = Table("flow", "health", "owner", "last poll", "last success", "retrying", "quarantined",
                          "post-processed", "last error")  # fmt: skip
            for row in rows:
                health = "[green]healthy[/]" if row["healthy"] else "[red]UNHEALTHY[/]"
                table.add_row(
                    row["flow"], health, escape(row["owner"] or "-"), ago(row["last_poll"]), ago(row["last_success"]),
                    str(row["retrying"]), str(row["quarantined"]), str(row["post_processed"]),
                    escape(row["last_error"][:80]),
                )  # fmt: skip
            console.print(table)
        return 1 if any(not row["healthy"] for row in rows) else 0

    code = run_command(body)
    if code:
        raise typer.Exit(code)


def _store_for(ctx: typer.Context, flows: Path | None, state: str) -> RuntimeStore:
    home = ctx_obj(ctx).ensure_home()
    if flows is not None and not state:
        state = _load(home, flows, resolve_secrets=False).state
    return open_store(state, home=home)


def _record_json(record: MessageRecord) -> dict[str, Any]:
    return {
        "flow": record.flow, "key": record.key, "status": record.status.value, "attempts": record.attempts,
        "idempotency_key": record.idempotency_key, "mailbox": record.mailbox, "subject": record.subject,
        "sender": record.sender, "size": record.size, "first_seen": record.first_seen, "updated": record.updated,
        "delivered_at": record.delivered_at, "done_at": record.done_at, "next_attempt": record.next_attempt,
        "duration_ms": record.duration_ms, "error": record.error, "target_ref": record.target_ref,
    }  # fmt: skip


def _attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt, "at": attempt.at, "outcome": attempt.outcome, "detail": attempt.detail,
        "duration_ms": attempt.duration_ms, "worker": attempt.worker,
    }  # fmt: skip


def _when(moment: float | None) -> str:
    return "-" if moment is None else datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S")


_STATUS_STYLE = {"post-processed": "green", "delivered": "cyan", "received": "cyan", "retrying": "yellow",
                 "quarantined": "red", "failed": "red"}  # fmt: skip
StateOption = Annotated[str, typer.Option(help="State URL (default: the flows file's, else HOME/runtime.db).")]
FlowsOption = Annotated[Path | None, typer.Option("--flows", help="Flows file whose [runtime] state to read.")]


@messages_app.command("list")
def messages_list(
    ctx: typer.Context,
    flows: FlowsOption = None,
    state: StateOption = "",
    flow: Annotated[str, typer.Option(help="Only this flow.")] = "",
    status: Annotated[str, typer.Option(help="Only this status: " + ", ".join(s.value for s in MessageStatus))] = "",
    since: Annotated[str, typer.Option(help="Only changed since: 30m, 2h, 1d, or a date.")] = "",
    search: Annotated[str, typer.Option(help="Text in subject, sender, key or error.")] = "",
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List messages of the processing log, newest first, with filters."""

    def body() -> None:
        wanted = None
        if status:
            try:
                wanted = MessageStatus(status)
            except ValueError as exc:
                raise ConfigurationError(
                    f"--status '{status}' is not one of: {', '.join(s.value for s in MessageStatus)}"
                ) from exc
        store = _store_for(ctx, flows, state)
        try:
            records = store.list(
                flow=flow or None, status=wanted, since=parse_since(since, time.time()) if since else None,
                text=search or None, limit=limit,
            )  # fmt: skip
            counts = store.counts(flow or None)
        finally:
            store.close()
        if as_json:
            print_json([_record_json(r) for r in records])
            return
        table = Table("updated", "flow", "status", "refused", "subject", "from", "target / error")
        for record in records:
            style = _STATUS_STYLE.get(record.status.value, "white")
            outcome = (
                record.error if record.status.value in ("retrying", "quarantined", "failed") else record.target_ref
            )
            table.add_row(
                _when(record.updated), record.flow, f"[{style}]{record.status.value}[/]", str(record.attempts),
                escape(record.subject[:50]), escape(record.sender[:40]), escape(outcome[:70]),
            )  # fmt: skip
        console.print(table)
        summary = ", ".join(f"{count} {name.value}" for name, count in counts.items() if count)
        console.print(f"{len(records)} shown; in the log: {summary or 'nothing'}", highlight=False)

    run_command(body)


@messages_app.command("show")
def messages_show(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="A message key or idempotency key (from 'messages list --json').")],
    flows: FlowsOption = None,
    state: StateOption = "",
    as_json: JsonOption = False,
) -> None:
    """Everything the log knows about one message."""

    def body() -> None:
        store = _store_for(ctx, flows, state)
        try:
            records = store.find(key)
            history = {(r.flow, r.key): store.attempts(r.flow, r.key) for r in records}
        finally:
            store.close()
        if not records:
            raise ConfigurationError(
                f"no message with key or idempotency key '{key}' in the log",
                hint="list them with 'postbridge messages list --json'",
            )
        if as_json:
            print_json([{**_record_json(r), "history": [_attempt_json(a) for a in history[(r.flow, r.key)]]}
                        for r in records])  # fmt: skip
            return
        for record in records:
            table = Table(show_header=False, title=f"{record.flow}: {record.key}", title_justify="left")
            for name, value in _record_json(record).items():
                if name in ("first_seen", "updated", "delivered_at", "done_at", "next_attempt"):
                    value = _when(value)
                table.add_row(name, escape(json.dumps(value) if isinstance(value, float | int) else str(value)))
            console.print(table)
            attempts = Table("#", "at", "worker", "outcome", "took", "target's answer", title="attempts",
                             title_justify="left")  # fmt: skip
            for attempt in history[(record.flow, record.key)]:
                style = "green" if attempt.outcome in ("delivered", "duplicate") else "red"
                took = "-" if attempt.duration_ms is None else f"{attempt.duration_ms:.0f} ms"
                attempts.add_row(str(attempt.attempt), _when(attempt.at), escape(attempt.worker),
                                 f"[{style}]{attempt.outcome}[/]", took, escape(attempt.detail[:100]))  # fmt: skip
            console.print(attempts)

    run_command(body)
