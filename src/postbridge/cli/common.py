"""Shared pieces of the command line: the home folder option, consoles, logging set-up and error reporting.

Commands raise :class:`PostbridgeError`; :func:`run_command` turns it into one red line with the cause and a
"fix:" line, exit code 2 for local (configuration) errors and 1 for everything else. No tracebacks for user errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.home import private_dir, resolve_home

console = Console(emoji=False)  # ":cd:" in a fingerprint must stay text
err_console = Console(stderr=True, emoji=False)
T = TypeVar("T")


class Context:
    """What the top-level callback stores for sub-commands."""

    def __init__(self, home: Path, log_level: str) -> None:
        self.home = home
        self.log_level = log_level

    def ensure_home(self) -> Path:
        return private_dir(self.home)


def ctx_obj(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


def run_command(func: Callable[[], T]) -> T:
    """Run a command body; PostbridgeError becomes a clear message and an exit code instead of a traceback."""
    try:
        return func()
    except PostbridgeError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]fix:[/] {exc.hint}", highlight=False)
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def run_async(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return run_command(lambda: asyncio.run(coro()))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log to stderr (rich) and, when given, to a rotating trace file (plain text)."""
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ConfigurationError(f"unknown log level '{level}'", hint="use debug, info, warning or error")
    stream: logging.Handler
    if sys.stderr.isatty():
        stream = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    else:  # a service manager or a pipe: one plain line per record, no wrapping
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [stream]
    if log_file is not None:
        private_dir(log_file.parent)
        log_file.touch(mode=0o600, exist_ok=True)
        os.chmod(log_file, 0o600)  # logs name hosts and users: private like the rest of the home folder
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(level=numeric, handlers=handlers, format="%(message)s", force=True)
    for noisy in ("hpack", "h2", "uvicorn", "uvicorn.error", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


HOME_HELP = "Folder with postbridge's state (keys, certificates, mappings). Default: $POSTBRIDGE_HOME or ~/.postbridge."


def home_from(option: str | None) -> Path:
    return resolve_home(option)


def stdin_line(what: str) -> str:
    """One line of standard input (a secret piped in), without its line end. Raises ConfigurationError when there is
    none, naming ``what`` was expected."""
    line = sys.stdin.readline()
    if not line:
        raise ConfigurationError(f"no {what} on stdin", hint=f"pipe the {what} as one line into the command")
    return line.rstrip("\r\n")


def prompt_secret(what: str, *, confirm: bool, stdin_option: str) -> str:
    """Ask for a secret on the terminal without echo (twice with ``confirm``). Raises ConfigurationError when stdin
    is not a terminal, naming ``stdin_option`` as the way to pipe it in."""
    if not sys.stdin.isatty():
        raise ConfigurationError(
            f"cannot prompt for the {what}: stdin is not a terminal", hint=f"pass {stdin_option} and pipe it in"
        )
    value: str = typer.prompt(what.capitalize(), hide_input=True, confirmation_prompt=confirm)
    return value
