"""What a poller remembers between polls, durably: which messages were handed on and which were post-processed.

Keys are ``imap:<mailbox>:<uidvalidity>:<uid>`` and ``pop3:<user>@<server>:<uidl>``. A message goes
``new -> delivered -> done`` (or ``quarantined``; a state with retry backoff, like the runtime's, may also answer
``waiting`` for a refused message whose next attempt is not due); a crash between "delivered" and "done" leaves
``delivered``, so the next poll retries only the post-processing and never hands the message on twice. Each
message also leaves a fingerprint (Message-ID, size, date), which lets a poller recognise processed messages after a
UIDVALIDITY change.

SQLite in WAL mode, one file; safe for one poller process per mailbox. This module must not speak a mail protocol.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from postbridge.errors import ConfigurationError
from postbridge.home import private_dir


class PollState(Protocol):
    def status(self, key: str) -> str | None: ...
    def attempts(self, key: str) -> int: ...
    def mark(self, key: str, status: str, *, fingerprint: str = "", error: str = "") -> None: ...
    def mark_many(self, keys: list[str], status: str) -> None: ...
    def record_failure(self, key: str, error: str) -> int: ...
    def fingerprint_done(self, mailbox: str, fingerprint: str) -> bool: ...
    def uidvalidity(self, mailbox: str) -> int | None: ...
    def set_uidvalidity(self, mailbox: str, value: int) -> None: ...


class SqliteState:
    """The default :class:`PollState`: a SQLite file (WAL)."""

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        try:
            # pollers run in worker threads; one lock serialises the (short) statements
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a 'delivered' mark must survive a power cut
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS messages (
                    key TEXT PRIMARY KEY, mailbox TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL,
                    fingerprint TEXT NOT NULL, error TEXT NOT NULL, updated REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS messages_fingerprint ON messages (mailbox, fingerprint);
                CREATE TABLE IF NOT EXISTS mailboxes (mailbox TEXT PRIMARY KEY, uidvalidity INTEGER NOT NULL);
                """
            )
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"poll state '{path}' cannot be used: {exc}", hint="move the file away (it will be recreated)"
            ) from exc
        path.chmod(0o600)
        self._lock = threading.Lock()

    def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, parameters).fetchall()

    @staticmethod
    def _mailbox(key: str) -> str:
        return key.rsplit(":", 2)[0] if key.startswith("imap:") else key.rsplit(":", 1)[0]

    def status(self, key: str) -> str | None:
        rows = self._execute("SELECT status FROM messages WHERE key = ?", (key,))
        row = rows[0] if rows else None
        return None if row is None else str(row[0])

    def attempts(self, key: str) -> int:
        rows = self._execute("SELECT attempts FROM messages WHERE key = ?", (key,))
        row = rows[0] if rows else None
        return 0 if row is None else int(row[0])

    def mark(self, key: str, status: str, *, fingerprint: str = "", error: str = "") -> None:
        self._execute(
            """INSERT INTO messages (key, mailbox, status, attempts, fingerprint, error, updated)
               VALUES (?, ?, ?, 0, ?, ?, ?)
               ON CONFLICT (key) DO UPDATE SET status = excluded.status, error = excluded.error,
                 updated = excluded.updated,
                 fingerprint = CASE WHEN excluded.fingerprint != '' THEN excluded.fingerprint ELSE fingerprint END""",
            (key, self._mailbox(key), status, fingerprint, error, time.time()),
        )

    def mark_many(self, keys: list[str], status: str) -> None:
        """Set the status of many messages in one transaction (one fsync instead of one per message)."""
        now = time.time()
        rows = [(key, self._mailbox(key), status, now) for key in keys]
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany(
                    """INSERT INTO messages (key, mailbox, status, attempts, fingerprint, error, updated)
                       VALUES (?, ?, ?, 0, '', '', ?)
                       ON CONFLICT (key) DO UPDATE SET status = excluded.status, updated = excluded.updated""",
                    rows,
                )
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def record_failure(self, key: str, error: str) -> int:
        self._execute(
            """INSERT INTO messages (key, mailbox, status, attempts, fingerprint, error, updated)
               VALUES (?, ?, 'failing', 1, '', ?, ?)
               ON CONFLICT (key) DO UPDATE SET attempts = attempts + 1, error = excluded.error,
                 status = 'failing', updated = excluded.updated""",
            (key, self._mailbox(key), error, time.time()),
        )
        return self.attempts(key)

    def fingerprint_done(self, mailbox: str, fingerprint: str) -> bool:
        rows = self._execute(
            "SELECT 1 FROM messages WHERE mailbox = ? AND fingerprint = ? AND status IN ('delivered', 'done') LIMIT 1",
            (mailbox, fingerprint),
        )
        row = rows[0] if rows else None
        return row is not None

    def uidvalidity(self, mailbox: str) -> int | None:
        rows = self._execute("SELECT uidvalidity FROM mailboxes WHERE mailbox = ?", (mailbox,))
        row = rows[0] if rows else None
        return None if row is None else int(row[0])

    def set_uidvalidity(self, mailbox: str, value: int) -> None:
        self._execute(
            "INSERT INTO mailboxes VALUES (?, ?) "
            "ON CONFLICT (mailbox) DO UPDATE SET uidvalidity = excluded.uidvalidity",
            (mailbox, value),
        )

    def close(self) -> None:
        self.db.close()
