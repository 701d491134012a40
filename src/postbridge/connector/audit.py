"""The connector's audit log: who was let through to which internal host, who was denied, what was changed.

Owns the file format (JSON lines, one object per record, each with ``time`` in ISO 8601 UTC with milliseconds
and ``event``), its permissions (0600), flushing (every record is one ``write`` to a file opened with
``O_APPEND``, so records of several processes never interleave) and rotation (at 10 MiB the file becomes
``audit.log.1``; five old files are kept).

Must not: hold or write secrets. The calls take no secret, and :meth:`AuditLog.config_change` refuses
``detail`` keys named like a password, secret, token or key. Must not decide anything either: callers tell
what happened.

Events::

    access-allowed / access-denied   subaccount, location, virtual, internal, trace_id, reason
    config-change                    action, detail, actor
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.home import private_dir

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5

_SECRET_KEY = re.compile(
    r"password|passwd|passphrase|secret|token|credential|private[_-]?key|api[_-]?key", re.IGNORECASE
)


class AuditLog:
    """Append-only JSON-lines audit log at ``path`` (normally ``HOME/connector/audit.log``)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        if max_bytes <= 0 or backups < 1:
            raise ValueError("max_bytes must be positive and backups at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    def access(
        self,
        *,
        allowed: bool,
        subaccount: str,
        location: str,
        virtual: str,
        internal: str | None,
        trace_id: str,
        reason: str = "",
    ) -> None:
        """Record one tunneled connection that was let through (``allowed``) or refused.

        Raises ConfigurationError when the log file cannot be written.
        """
        self._append(
            {
                "event": "access-allowed" if allowed else "access-denied",
                "subaccount": subaccount,
                "location": location,
                "virtual": virtual,
                "internal": internal,
                "trace_id": trace_id,
                "reason": reason,
            }
        )

    def config_change(self, *, action: str, detail: dict[str, Any], actor: str = "cli") -> None:
        """Record a change of the connector's configuration (``mapping-add``, ``trust-remove``, ...).

        Raises PostbridgeError when ``detail`` holds a key named like a secret (at any depth), and
        ConfigurationError when the log file cannot be written.
        """
        for key_path, key in _keys(detail, ""):
            if _SECRET_KEY.search(key):
                raise PostbridgeError(
                    f"refusing to write '{key_path}' of config change '{action}' to the audit log: "
                    "the key is named like a secret",
                    hint="leave secrets out of audit details; record that something changed, not its value",
                )
        self._append({"event": "config-change", "action": action, "actor": actor, "detail": detail})

    def read(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Return the newest ``limit`` records, newest last, looking into rotated files when needed.

        Lines that are not JSON objects (e.g. cut by a crash) are skipped. Missing files give ``[]``.
        """
        if limit <= 0:
            return []
        newest_first: list[list[dict[str, Any]]] = []
        wanted = limit
        for path in [self.path] + [self._backup(number) for number in range(1, self.backups + 1)]:
            records = _tail(path, wanted)
            newest_first.append(records)
            wanted -= len(records)
            if wanted <= 0:
                break
        return [record for records in reversed(newest_first) for record in records]

    def _append(self, record: dict[str, Any]) -> None:
        stamped = {"time": _now(), **record}
        line = (json.dumps(stamped, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            try:
                private_dir(self.path.parent)
                self._rotate_if_needed(len(line))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot write the audit log '{self.path}': {exc.strerror or exc}",
                    hint="free disk space or fix the permissions of the folder",
                ) from exc

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        oldest = self._backup(self.backups)
        if oldest.exists():
            oldest.unlink()
        for number in range(self.backups - 1, 0, -1):
            source = self._backup(number)
            if source.exists():
                os.replace(source, self._backup(number + 1))
        os.replace(self.path, self._backup(1))

    def _backup(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _keys(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """Every key of nested dicts (also inside lists) as ``(dotted path, key)``."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, str(key)
            yield from _keys(item, path)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _keys(item, prefix)


def _tail(path: Path, limit: int) -> list[dict[str, Any]]:
    records: deque[dict[str, Any]] = deque(maxlen=limit)
    try:
        with path.open("rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        return []
    return list(records)
