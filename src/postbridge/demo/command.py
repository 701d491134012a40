"""``postbridge demo [--once] [--home DIR]``: the demo home, its log file, signals, exit codes and the keep-running
phase after the story (:mod:`postbridge.demo.story`): the flow polls on, the web UIs stay up, and the commands to
try are printed.

Owns: choosing the demo home (a temporary folder removed on exit, or ``--home``: a new or empty folder, or one
an earlier demo made, whose state is replaced), sending the hub's and the connector's logging to
``HOME/demo.log`` instead of the terminal (and putting logging back as it was afterwards), Ctrl-C / SIGTERM, and
the exit code: 0 when every step met its expectation, 1 when one did not, 130 when interrupted.
``--once`` exits after the story; without it the runtime keeps polling the demo's flow in a thread until Ctrl-C.

Must not: read or write ``$POSTBRIDGE_HOME`` or ``~/.postbridge`` (the global ``--home`` is ignored on purpose), or
leave a server, a task or a temporary folder behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from postbridge.cli.common import console as default_console
from postbridge.cli.common import ctx_obj, run_command
from postbridge.demo.narration import Narrator
from postbridge.demo.serve import keep_running
from postbridge.demo.story import Demo
from postbridge.errors import ConfigurationError, HomeError
from postbridge.home import private_dir

MARKER = ".postbridge-demo"
LOG_NAME = "demo.log"
_DEMO_PARTS = ("lab", "cloud", "connector", LOG_NAME, "hub", "onprem")  # the last two: homes of older demos
_LOG_TAIL = 15  # log lines shown when a step failed (a temporary home and its log are removed on exit)


def demo(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Run the steps, print the summary and exit: 0 if every step passed, else 1.")
    ] = False,
    home: Annotated[
        str | None,
        typer.Option(
            "--home",
            help="Keep the demo's state (hub, connector, certificates, log) in this new or empty folder instead "
            "of a temporary one. The global --home and POSTBRIDGE_HOME are not used by the demo.",
        ),
    ] = None,
) -> None:
    """Show postbridge at work on this machine: a lab mail server, a cloud hub and a connector in one process,
    the connection test, mail through the tunnel, a flow, the classic errors; then keep running with the web UIs
    until Ctrl-C (--once: exit after the story)."""
    level = ctx_obj(ctx).log_level
    code = run_command(lambda: run_demo(once=once, home=home, log_level=level))
    raise typer.Exit(code)


def run_demo(
    *, once: bool, home: str | Path | None = None, console: Console | None = None, log_level: str = "info"
) -> int:
    """Run the demo and return its exit code (0 all steps passed, 1 a step failed, 130 interrupted).

    Raises ConfigurationError for an unusable ``home`` or ``log_level`` (nothing is started then).
    """
    out = console or default_console
    numeric = getattr(logging, log_level.upper(), None)
    if not isinstance(numeric, int):
        raise ConfigurationError(f"unknown log level '{log_level}'", hint="use debug, info, warning or error")
    folder, temporary = prepare_home(home)
    log_path = folder / LOG_NAME
    narrator = Narrator(out)
    narrator.title("postbridge demo: a cloud application reaches an on-premise mail server through the connector")
    kept = "temporary, removed on exit" if temporary else "kept after exit"
    narrator.line(f"home: {folder} ({kept})")
    narrator.line(f"hub and connector log: {log_path}")
    try:
        with _logging_to(log_path, numeric):
            code = asyncio.run(_main(Demo(folder, narrator), narrator, once=once))
        if code == 1:
            _show_log_tail(narrator, log_path)
        return code
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)


def prepare_home(option: str | Path | None) -> tuple[Path, bool]:
    """The demo home and whether it is temporary.

    A given folder must be new, empty or made by an earlier demo (its hub, connector and log are then replaced).
    Raises ConfigurationError (HomeError) for a file or a folder with other content, which is never touched.
    """
    if option is None:
        return Path(tempfile.mkdtemp(prefix="postbridge-demo-")), True
    folder = Path(option).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise HomeError(f"demo home '{folder}' is a file", hint="give a new or empty folder with --home")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise HomeError(
            f"demo home '{folder}' is not empty and was not made by 'postbridge demo'",
            hint="give a new or empty folder with --home, or leave --home out to use a temporary folder",
        )
    private_dir(folder)
    for part in _DEMO_PARTS:
        path = folder / part
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (folder / MARKER).write_text("made by 'postbridge demo'; its content is replaced by the next run\n")
    return folder, False


async def _main(story: Demo, narrator: Narrator, *, once: bool) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stop = asyncio.Event()
    phase = {"serving": False, "interrupted": False}

    def on_signal() -> None:
        phase["interrupted"] = True
        if phase["serving"]:
            stop.set()
        elif main_task is not None:
            main_task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal)
            installed.append(signum)
    try:
        async with AsyncExitStack() as stack:
            await story.run(stack)
            narrator.summary()
            if not once:
                if not story.ready_to_serve:
                    narrator.line("the story did not get far enough, so there is nothing to keep running", style="red")
                    return 1
                await keep_running(story, stack)
                phase["serving"] = True
                await stop.wait()
                narrator.line("stopping: the flow, the connector, the hub and the lab server")
    except asyncio.CancelledError:
        if not phase["interrupted"]:
            raise
        if main_task is not None:
            main_task.uncancel()
        narrator.line("interrupted: everything was closed", style="yellow")
        return 130
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return 0 if narrator.all_passed else 1


@contextlib.contextmanager
def _logging_to(path: Path, level: int) -> Iterator[None]:
    """Send the ``postbridge`` and ``asyncio`` loggers to ``path`` only (not the terminal); restore them after."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(level)
    settings = {"postbridge": min(level, logging.WARNING), "asyncio": logging.WARNING}
    saved = []
    for name, wanted in settings.items():
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(wanted)
        logger.propagate = False
        logger.addHandler(file_handler)
    try:
        yield
    finally:
        for logger, old_level, old_propagate in saved:
            logger.removeHandler(file_handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
        file_handler.close()


def _show_log_tail(narrator: Narrator, path: Path) -> None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-_LOG_TAIL:]
    except OSError:
        return
    if lines:
        narrator.line("")
        narrator.line(f"last {len(lines)} lines of {path}:", style="bold")
        for text in lines:
            narrator.line(text, style="dim", indent=3)
