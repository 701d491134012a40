"""The home folder that holds all of postbridge's state, and atomic file writes into it.

Precedence: ``--home DIR`` > ``POSTBRIDGE_HOME`` > ``~/.postbridge``. The folder and every subfolder are created
with mode 0700, files with 0600: they hold private keys and secrets. All writes are atomic (temporary file in the
same folder, fsync, rename), so a crash never leaves a half-written configuration behind.

Layout::

    HOME/cloud/       hub CA, server certificate, subaccounts, enrollment tokens, issued connector certificates
    HOME/connector/   connector key and certificate, hub CA, identity, mappings, backend trust store,
                      audit.log (JSON lines) and trace.log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postbridge.errors import ConfigurationError, HomeError

ENV_VAR = "POSTBRIDGE_HOME"


def resolve_home(option: str | Path | None = None) -> Path:
    """Return the home folder to use (not created). CLI option wins over the environment, then the default."""
    if option:
        return Path(option).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".postbridge").resolve()


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; raise HomeError when that is impossible."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise HomeError(
            f"cannot use folder '{path}': {exc.strerror}",
            hint=f"choose another folder with --home or {ENV_VAR}, or fix its permissions",
        ) from exc
    return path


def atomic_write(
    path: Path, data: bytes | str, *, mode: int = 0o600, private_parent: bool = True, sync_folder: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically with the given mode; the old file stays intact on any failure.

    A temporary file in the same folder is written, fsynced and renamed over ``path``; readers see the old file or
    the new one, never a part, and no temporary file is left behind. ``private_parent`` first creates the folder
    with mode 0700 (HomeError when impossible); ``sync_folder`` also fsyncs the folder, so the rename survives a
    power loss (a later synced write in the same folder does that too). Raises OSError for the write itself.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if private_parent:
        private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Raises OSError."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as pretty JSON, atomically, mode 0600."""
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; return ``default`` when it does not exist, raise ConfigurationError when it is broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            hint="repair the file or restore it from a backup; postbridge writes it atomically, so this was "
            "an outside edit",
        ) from exc


def locked_update(path: Path, update: Callable[[Any], Any], *, default: Any = None) -> Any:
    """Read-modify-write a JSON file under an exclusive lock (``path.lock``), so that the CLI and a running service
    never lose each other's changes. ``update`` receives the current value and returns the new one."""
    private_dir(path.parent)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        value = update(read_json(path, default))
        write_json(path, value)
        return value
    finally:
        os.close(fd)
