"""The ``directory`` flow target: each message becomes ``<idempotency_key>.eml`` plus ``<idempotency_key>.json``.

Settings: ``path`` (the folder; relative to the home folder unless absolute; created with mode 0700 when missing).
Files are written atomically (a hidden temporary file in the same folder, fsync, rename, fsync of the folder) with
mode 0600, the ``.eml`` first and then the ``.json``, so a reader that waits for the ``.json`` sees a complete
message. The ``.json`` holds flow, key, idempotency_key, mailbox, uid, size, subject, from, message_id,
received_at and deliveries (1, or one more each time the same message is delivered again).

A ``.eml`` that already exists with the same bytes is a duplicate delivery (``duplicate=True``, deliveries
counted up); with other bytes it is refused (permanent): the file is never overwritten. One writer per flow is
assumed (the runtime's poll lease); within a process a lock serialises deliveries.

Errors: permission, read-only and not-a-folder problems are permanent (the hint names the path); any other
``OSError`` (a full disk, I/O errors) is retryable. Must not: write outside ``path`` (the idempotency key is
checked to be a plain name), leave temporary files behind, or overwrite a stored message.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from postbridge.home import atomic_write
from postbridge.runtime.targets import (
    Delivery,
    DeliveryResult,
    TargetError,
    TargetTable,
    check_idempotency_key,
    resolve_path,
)
from postbridge.runtime.targets_json import header_text, parse

KEYS = ("kind", "path")
PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
)


class DirectoryTarget:
    """Writes deliveries into one folder."""

    kind = "directory"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DirectoryTarget({str(self.path)!r})"

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Store the message and its metadata; raises TargetError (see the module docstring)."""
        key = check_idempotency_key(delivery.idempotency_key)
        message_path = self.path / f"{key}.eml"
        metadata_path = self.path / f"{key}.json"
        with self._lock:
            try:
                self._make_folder()
                duplicate = self._store_message(message_path, delivery)
                deliveries = _previous_deliveries(metadata_path) + 1 if duplicate else 1
                atomic_write(metadata_path, _metadata(delivery, deliveries), private_parent=False, sync_folder=True)
            except OSError as exc:
                raise self._os_error(exc) from exc
        return DeliveryResult(ref=str(message_path), duplicate=duplicate)

    def _make_folder(self) -> None:
        if self.path.is_dir():
            return
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)  # mkdir's mode passes through the umask

    def _store_message(self, path: Path, delivery: Delivery) -> bool:
        """Write the .eml unless it is there; True when it was there with the same bytes."""
        try:
            existing = path.read_bytes()
        except FileNotFoundError:
            atomic_write(path, delivery.raw, private_parent=False)  # the metadata's write syncs the folder
            return False
        if existing != delivery.raw:
            raise TargetError(
                f"'{path}' already holds a different message ({len(existing)} bytes, this one {len(delivery.raw)})"
                " under the same idempotency key",
                retryable=False,
                hint="postbridge never overwrites a stored message: move the old file away if it is stale, then "
                "release the quarantined message",
            )
        return True

    def _os_error(self, exc: OSError) -> TargetError:
        where = exc.filename or self.path
        reason = exc.strerror or type(exc).__name__
        if exc.errno in PERMANENT_ERRNOS:
            return TargetError(
                f"cannot write into '{self.path}': {reason} ('{where}')",
                retryable=False,
                hint=f"make '{self.path}' a folder the postbridge user may write to, or change path",
            )
        return TargetError(
            f"writing into '{self.path}' failed: {reason} ('{where}')",
            retryable=True,
            hint=f"the message is written again later; check the disk that holds '{self.path}' (is it full?)",
        )

    def close(self) -> None:
        """Nothing to release: every file is closed after each delivery."""


def _previous_deliveries(path: Path) -> int:
    """The count in an existing .json; 1 when it is missing or unreadable (the .eml proves one delivery)."""
    try:
        value = json.loads(path.read_bytes()).get("deliveries")
    except (OSError, ValueError, AttributeError):
        return 1
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _metadata(delivery: Delivery, deliveries: int) -> bytes:
    headers = parse(delivery.raw, headers_only=True)
    data = {
        "flow": delivery.flow,
        "key": delivery.key,
        "idempotency_key": delivery.idempotency_key,
        "mailbox": delivery.mailbox,
        "uid": delivery.uid,
        "size": len(delivery.raw),
        "subject": header_text(headers, "subject"),
        "from": header_text(headers, "from"),
        "message_id": header_text(headers, "message-id"),
        "received_at": delivery.received_at,
        "deliveries": deliveries,
    }
    return (json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


def build(table: Mapping[str, Any], *, source: str, home: Path) -> DirectoryTarget:
    """The directory target of ``table``; raises ConfigurationError (see :func:`targets.build_target`).

    Nothing is created here: the folder is made at the first delivery.
    """
    reader = TargetTable(table, source, KEYS)
    path = resolve_path(reader.required_text("path"), home)
    if path.exists() and not path.is_dir():
        raise reader.error(f"path '{path}' is not a folder", hint="give a folder (it is created when missing)")
    return DirectoryTarget(path)
