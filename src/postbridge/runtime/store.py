"""The runtime's durable store: the message processing log, poll leases, flow health and UIDVALIDITY per mailbox.

Owns: the :class:`RuntimeStore` protocol and its records, the SQL both backends share (written for SQLite's
dialect with ``?`` placeholders; PostgreSQL accepts it after a placeholder swap), the SQLite backend and
:func:`open_store`, which picks a backend from the ``[runtime] state`` URL. ``store_pg.py`` adds PostgreSQL.
Must not: speak a mail protocol, call a target, decide retries (the engine does), or let a database password
reach a message or a log (:func:`mask_url`).

Every method is thread-safe and every write is durable when it returns (SQLite: WAL with ``synchronous=FULL``;
PostgreSQL: a committed transaction). Times are epoch seconds taken from this machine's clock.
"""

from __future__ import annotations

import abc
import builtins
import enum
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from postbridge.errors import ConfigurationError, PostbridgeError

SCHEMA_VERSION = 1


class MessageStatus(enum.StrEnum):
    RECEIVED = "received"  # fetched, handed to the target
    DELIVERED = "delivered"  # the target accepted it
    POST_PROCESSED = "post-processed"  # mailbox post-processing done (final)
    RETRYING = "retrying"  # the target refused or failed; next_attempt says when
    QUARANTINED = "quarantined"  # moved to the quarantine folder (final)
    FAILED = "failed"  # could not even be quarantined (final)


FINAL_STATUSES = frozenset({MessageStatus.POST_PROCESSED, MessageStatus.QUARANTINED, MessageStatus.FAILED})


@dataclass(frozen=True)
class MessageRecord:
    """One message of one flow, as the log holds it (times in epoch seconds)."""

    flow: str
    key: str
    status: MessageStatus
    attempts: int
    idempotency_key: str
    mailbox: str
    fingerprint: str
    subject: str
    sender: str
    size: int
    first_seen: float
    updated: float
    delivered_at: float | None
    done_at: float | None
    next_attempt: float | None
    duration_ms: float | None  # time the target took for the successful delivery
    error: str
    target_ref: str  # file path, "HTTP 201", SMTP reply, ...


@dataclass(frozen=True)
class FlowHealth:
    """The poll record of one flow: when it last polled and succeeded, and running totals."""

    flow: str
    owner: str
    last_poll: float | None
    last_success: float | None
    last_error: str
    consecutive_failures: int
    polls: int
    seen: int
    delivered: int
    failed: int


@dataclass(frozen=True)
class Attempt:
    """One hand-on of a message to its target: when, by which worker, and how it ended."""

    flow: str
    key: str
    attempt: int  # 1 = the first try
    at: float
    outcome: str  # "delivered", "duplicate", "refused" or "refused-permanently"
    detail: str  # the target's reference, or its error
    duration_ms: float | None
    worker: str


@dataclass(frozen=True)
class AttemptInput:
    """An attempt to add together with a :meth:`RuntimeStore.record` (see :class:`Attempt`)."""

    outcome: str
    detail: str
    at: float
    duration_ms: float | None = None
    worker: str = ""


class RuntimeStore(Protocol):
    """Where the runtime keeps what must survive a restart. Thread-safe; every write is durable when it returns.

    ``record`` upserts: fields left at their default keep the stored value (first_seen never changes),
    ``add_attempt`` counts an attempt, DELIVERED sets delivered_at the first time, a final status sets done_at;
    it returns the row after the write. ``list`` gives the newest ``updated`` first; ``text`` is a case-insensitive
    substring of subject, sender, key or error. ``acquire_lease`` atomically takes a free or expired lease, or
    renews the owner's own, and is False while another owner holds an unexpired one. ``record_poll`` counts a
    poll: ok sets last_success and ends the failure streak, not ok sets last_error and lengthens it.
    """

    # fmt: off
    def record(self, flow: str, key: str, status: MessageStatus, *, mailbox: str = "", fingerprint: str = "",
               subject: str = "", sender: str = "", size: int = 0, idempotency_key: str = "", error: str = "",
               target_ref: str = "", next_attempt: float | None = None, add_attempt: bool = False,
               duration_ms: float | None = None, attempt: AttemptInput | None = None) -> MessageRecord: ...
    def mark_many(self, flow: str, keys: list[str], status: MessageStatus) -> None: ...
    def get(self, flow: str, key: str) -> MessageRecord | None: ...
    def find(self, key_or_idempotency_key: str) -> list[MessageRecord]: ...
    def list(self, *, flow: str | None = None, status: MessageStatus | None = None, since: float | None = None,
             text: str | None = None, limit: int = 100) -> builtins.list[MessageRecord]: ...
    def counts(self, flow: str | None = None) -> dict[MessageStatus, int]: ...
    def fingerprint_done(self, flow: str, mailbox: str, fingerprint: str) -> bool: ...
    def uidvalidity(self, flow: str, mailbox: str) -> int | None: ...
    def set_uidvalidity(self, flow: str, mailbox: str, value: int) -> None: ...
    def acquire_lease(self, flow: str, owner: str, ttl: float, *, now: float | None = None) -> bool: ...
    def release_lease(self, flow: str, owner: str) -> None: ...
    def lease(self, flow: str) -> tuple[str, float] | None: ...
    def record_poll(self, flow: str, owner: str, *, ok: bool, at: float, error: str = "", seen: int = 0,
                    delivered: int = 0, failed: int = 0) -> None: ...
    def health(self, flow: str | None = None) -> builtins.list[FlowHealth]: ...
    def record_attempt(self, flow: str, key: str, *, outcome: str, detail: str, at: float,
                       duration_ms: float | None = None, worker: str = "") -> Attempt: ...
    def attempts(self, flow: str, key: str) -> builtins.list[Attempt]: ...
    def close(self) -> None: ...
    # fmt: on


# -- SQL shared by both backends (SQLite dialect, "?" placeholders, no "?" or "%" inside literals) -----------

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    flow TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL, mailbox TEXT NOT NULL, fingerprint TEXT NOT NULL, subject TEXT NOT NULL,
    sender TEXT NOT NULL, size BIGINT NOT NULL, first_seen DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL, delivered_at DOUBLE PRECISION, done_at DOUBLE PRECISION,
    next_attempt DOUBLE PRECISION, duration_ms DOUBLE PRECISION, error TEXT NOT NULL, target_ref TEXT NOT NULL,
    PRIMARY KEY (flow, key));
CREATE INDEX IF NOT EXISTS messages_updated ON messages (updated);
CREATE INDEX IF NOT EXISTS messages_key ON messages (key);
CREATE INDEX IF NOT EXISTS messages_idempotency_key ON messages (idempotency_key);
CREATE INDEX IF NOT EXISTS messages_fingerprint ON messages (flow, mailbox, fingerprint);
CREATE TABLE IF NOT EXISTS mailboxes (
    flow TEXT NOT NULL, mailbox TEXT NOT NULL, uidvalidity BIGINT NOT NULL, PRIMARY KEY (flow, mailbox));
CREATE TABLE IF NOT EXISTS attempts (
    flow TEXT NOT NULL, key TEXT NOT NULL, attempt INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL, detail TEXT NOT NULL, duration_ms DOUBLE PRECISION, worker TEXT NOT NULL,
    PRIMARY KEY (flow, key, attempt));
CREATE TABLE IF NOT EXISTS leases (flow TEXT PRIMARY KEY, owner TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS flow_health (
    flow TEXT PRIMARY KEY, owner TEXT NOT NULL, last_poll DOUBLE PRECISION, last_success DOUBLE PRECISION,
    last_error TEXT NOT NULL, consecutive_failures INTEGER NOT NULL, polls BIGINT NOT NULL, seen BIGINT NOT NULL,
    delivered BIGINT NOT NULL, failed BIGINT NOT NULL);
INSERT INTO schema_version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version)
"""
_MESSAGE_COLUMNS = ", ".join(MessageRecord.__dataclass_fields__)
_HEALTH_COLUMNS = ", ".join(FlowHealth.__dataclass_fields__)
_ATTEMPT_COLUMNS = ", ".join(Attempt.__dataclass_fields__)
_INSERT_ATTEMPT = f"""INSERT INTO attempts ({_ATTEMPT_COLUMNS})
    SELECT ?, ?, COALESCE(MAX(attempt), 0) + 1, ?, ?, ?, ?, ? FROM attempts WHERE flow = ? AND key = ?
    RETURNING {_ATTEMPT_COLUMNS}"""
_KEEP = ("idempotency_key", "mailbox", "fingerprint", "subject", "sender", "error", "target_ref")
_INSERT_MESSAGE = f"""
INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({", ".join(["?"] * len(MessageRecord.__dataclass_fields__))})
ON CONFLICT (flow, key) DO UPDATE SET status = excluded.status, updated = excluded.updated,
    delivered_at = COALESCE(messages.delivered_at, excluded.delivered_at), done_at = excluded.done_at,
    next_attempt = CASE WHEN excluded.status = 'retrying'
        THEN COALESCE(excluded.next_attempt, messages.next_attempt) END"""
_MARK_MESSAGE = _INSERT_MESSAGE
_UPSERT_MESSAGE = f"""{_INSERT_MESSAGE}, attempts = messages.attempts + excluded.attempts,
    {", ".join(f"{c} = CASE WHEN excluded.{c} <> '' THEN excluded.{c} ELSE messages.{c} END" for c in _KEEP)},
    size = CASE WHEN excluded.size <> 0 THEN excluded.size ELSE messages.size END,
    duration_ms = COALESCE(excluded.duration_ms, messages.duration_ms)
RETURNING {_MESSAGE_COLUMNS}"""
_ACQUIRE_LEASE = """
INSERT INTO leases (flow, owner, expires) VALUES (?, ?, ?)
ON CONFLICT (flow) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
    WHERE leases.owner = excluded.owner OR leases.expires <= ?
RETURNING owner"""
_RECORD_POLL = f"""
INSERT INTO flow_health ({_HEALTH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)
ON CONFLICT (flow) DO UPDATE SET owner = excluded.owner, last_poll = excluded.last_poll,
    last_success = COALESCE(excluded.last_success, flow_health.last_success),
    last_error = CASE WHEN excluded.consecutive_failures = 0 THEN flow_health.last_error ELSE excluded.last_error END,
    consecutive_failures = CASE WHEN excluded.consecutive_failures = 0 THEN 0
        ELSE flow_health.consecutive_failures + 1 END,
    polls = flow_health.polls + 1, seen = flow_health.seen + excluded.seen,
    delivered = flow_health.delivered + excluded.delivered, failed = flow_health.failed + excluded.failed"""
_TEXT_COLUMNS = ("subject", "sender", "key", "error")
_DONE = (MessageStatus.DELIVERED.value, MessageStatus.POST_PROCESSED.value)


class SqlStore(abc.ABC):
    """Every :class:`RuntimeStore` method on top of two primitives a backend provides."""

    @abc.abstractmethod
    def _query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (committed when it returns) and return its rows."""

    @abc.abstractmethod
    def _query_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run one statement per row, all in one transaction."""

    @abc.abstractmethod
    def _transaction(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[tuple[Any, ...]]:
        """Run the statements in one transaction (one durable commit); return the rows of the last one."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def record(
        self,
        flow: str,
        key: str,
        status: MessageStatus,
        *,
        mailbox: str = "",
        fingerprint: str = "",
        subject: str = "",
        sender: str = "",
        size: int = 0,
        idempotency_key: str = "",
        error: str = "",
        target_ref: str = "",
        next_attempt: float | None = None,
        add_attempt: bool = False,
        duration_ms: float | None = None,
        attempt: AttemptInput | None = None,
    ) -> MessageRecord:
        """Upsert one message (see :class:`RuntimeStore`); done_at is cleared again when the status is not final.
        ``attempt`` adds one row to the message's attempt history in the same transaction (one commit)."""
        status, now = MessageStatus(status), time.time()
        delivered, done = _timestamps(status, now)
        row = (
            *(flow, key, status.value, int(add_attempt), idempotency_key, mailbox, fingerprint, subject, sender),
            *(size, now, now, delivered, done, next_attempt, duration_ms, error, target_ref),
        )
        if attempt is None:
            return _message(self._query(_UPSERT_MESSAGE, row)[0])
        history = (
            flow,
            key,
            attempt.at,
            attempt.outcome,
            attempt.detail,
            attempt.duration_ms,
            attempt.worker,
            flow,
            key,
        )
        return _message(self._transaction([(_INSERT_ATTEMPT, history), (_UPSERT_MESSAGE, row)])[0])

    def mark_many(self, flow: str, keys: list[str], status: MessageStatus) -> None:
        """Set the status of many messages in one transaction (timestamps as :meth:`record` sets them; an unknown
        key gets a row with empty details)."""
        status, now = MessageStatus(status), time.time()
        delivered, done = _timestamps(status, now)
        blank = (status.value, 0, "", "", "", "", "", 0, now, now, delivered, done, None, None, "", "")
        self._query_many(_MARK_MESSAGE, [(flow, key, *blank) for key in keys])

    def get(self, flow: str, key: str) -> MessageRecord | None:
        rows = self._query(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE flow = ? AND key = ?", (flow, key))
        return _message(rows[0]) if rows else None

    def find(self, key_or_idempotency_key: str) -> list[MessageRecord]:
        """Every message (of any flow) whose key or idempotency key is exactly this, newest first."""
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE key = ? OR idempotency_key = ? ORDER BY updated DESC"
        return [_message(row) for row in self._query(sql, (key_or_idempotency_key, key_or_idempotency_key))]

    def list(
        self,
        *,
        flow: str | None = None,
        status: MessageStatus | None = None,
        since: float | None = None,
        text: str | None = None,
        limit: int = 100,
    ) -> builtins.list[MessageRecord]:
        """Messages updated at or after `since`, newest first; `text` is a case-insensitive substring of
        subject, sender, key or error."""
        where: list[str] = []
        parameters: list[object] = []
        for condition, value in (("flow = ?", flow), ("status = ?", status), ("updated >= ?", since)):
            if value is not None:
                where.append(condition)
                parameters.append(value.value if isinstance(value, MessageStatus) else value)
        if text:
            pattern = "%" + re.sub(r"([!%_])", r"!\1", text.lower()) + "%"
            where.append("(" + " OR ".join(f"lower({c}) LIKE ? ESCAPE '!'" for c in _TEXT_COLUMNS) + ")")
            parameters += [pattern] * len(_TEXT_COLUMNS)
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY updated DESC, key LIMIT ?"
        return [_message(row) for row in self._query(sql, [*parameters, max(0, limit)])]

    def counts(self, flow: str | None = None) -> dict[MessageStatus, int]:
        """Messages per status (every status present, zero when none), of one flow or all."""
        sql = "SELECT status, COUNT(*) FROM messages" + (" WHERE flow = ?" if flow is not None else "")
        counts = dict.fromkeys(MessageStatus, 0)
        for status, count in self._query(sql + " GROUP BY status", () if flow is None else (flow,)):
            counts[MessageStatus(status)] = int(count)
        return counts

    def fingerprint_done(self, flow: str, mailbox: str, fingerprint: str) -> bool:
        """True when a message with this fingerprint was delivered or post-processed (an empty one never was)."""
        sql = "SELECT 1 FROM messages WHERE flow = ? AND mailbox = ? AND fingerprint = ? AND status IN (?, ?) LIMIT 1"
        return bool(fingerprint) and bool(self._query(sql, (flow, mailbox, fingerprint, *_DONE)))

    def record_attempt(
        self,
        flow: str,
        key: str,
        *,
        outcome: str,
        detail: str,
        at: float,
        duration_ms: float | None = None,
        worker: str = "",
    ) -> Attempt:
        """Add the message's next attempt (numbered from 1) to its history."""
        row = self._query(_INSERT_ATTEMPT, (flow, key, at, outcome, detail, duration_ms, worker, flow, key))[0]
        return _attempt(row)

    def attempts(self, flow: str, key: str) -> builtins.list[Attempt]:
        """Every attempt of one message, first first."""
        sql = f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE flow = ? AND key = ? ORDER BY attempt"
        return [_attempt(row) for row in self._query(sql, (flow, key))]

    def uidvalidity(self, flow: str, mailbox: str) -> int | None:
        rows = self._query("SELECT uidvalidity FROM mailboxes WHERE flow = ? AND mailbox = ?", (flow, mailbox))
        return int(rows[0][0]) if rows else None

    def set_uidvalidity(self, flow: str, mailbox: str, value: int) -> None:
        sql = "INSERT INTO mailboxes (flow, mailbox, uidvalidity) VALUES (?, ?, ?) "
        sql += "ON CONFLICT (flow, mailbox) DO UPDATE SET uidvalidity = excluded.uidvalidity"
        self._query(sql, (flow, mailbox, value))

    def acquire_lease(self, flow: str, owner: str, ttl: float, *, now: float | None = None) -> bool:
        """Take the lease if free or expired, renew it if `owner` holds it; False if another owner holds it.

        One statement, so it is atomic across threads and processes on the same database.
        """
        now = time.time() if now is None else now
        return bool(self._query(_ACQUIRE_LEASE, (flow, owner, now + ttl, now)))

    def release_lease(self, flow: str, owner: str) -> None:
        """Give the lease up; does nothing unless `owner` holds it."""
        self._query("DELETE FROM leases WHERE flow = ? AND owner = ?", (flow, owner))

    def lease(self, flow: str) -> tuple[str, float] | None:
        """(owner, expires) of the flow's lease, even an expired one; None when nobody holds or held it."""
        rows = self._query("SELECT owner, expires FROM leases WHERE flow = ?", (flow,))
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    def record_poll(
        self,
        flow: str,
        owner: str,
        *,
        ok: bool,
        at: float,
        error: str = "",
        seen: int = 0,
        delivered: int = 0,
        failed: int = 0,
    ) -> None:
        """Count one poll: ok resets the failure streak, a failure keeps `error` and lengthens the streak."""
        row = (flow, owner, at, at if ok else None, "" if ok else error, 0 if ok else 1, seen, delivered, failed)
        self._query(_RECORD_POLL, row)

    def health(self, flow: str | None = None) -> builtins.list[FlowHealth]:
        """The poll record of one flow (empty list when it never polled) or of all flows, by name."""
        sql = f"SELECT {_HEALTH_COLUMNS} FROM flow_health" + (" WHERE flow = ?" if flow is not None else "")
        rows = self._query(sql + " ORDER BY flow", () if flow is None else (flow,))
        return [FlowHealth(*row[:5], *(int(value) for value in row[5:])) for row in rows]


def _message(row: Sequence[Any]) -> MessageRecord:
    values = list(row)
    values[2], values[3], values[9] = MessageStatus(values[2]), int(values[3]), int(values[9])
    return MessageRecord(*values)


def _timestamps(status: MessageStatus, now: float) -> tuple[float | None, float | None]:
    """(delivered_at, done_at) as a write with `status` proposes them."""
    return (now if status is MessageStatus.DELIVERED else None), (now if status in FINAL_STATUSES else None)


def _lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


class SqliteStore(SqlStore):
    """The default store: one SQLite file (WAL, synchronous=FULL, mode 0600); one connection behind a lock.

    Raises ConfigurationError when the file cannot be opened, is no database, or was written by a newer schema.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        try:
            if not path.parent.is_dir():  # never chmod a folder that exists already (it may be /tmp)
                path.parent.mkdir(mode=0o700, parents=True)
            path.touch(mode=0o600, exist_ok=True)
            path.chmod(0o600)  # SQLite gives the -wal and -shm files the mode of the database file
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(
                f"runtime store '{path}' cannot be opened: {exc}", hint="choose a file in a folder you may write to"
            ) from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a 'delivered' mark must survive a power cut
            # SQLite's own lower() folds ASCII only; Python's folds every letter, as PostgreSQL's does
            self._db.create_function("lower", 1, _lower, deterministic=True)
            self._db.executescript("BEGIN IMMEDIATE;" + SCHEMA + ";COMMIT;")
            version = int(self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
        except sqlite3.Error as exc:
            self._db.close()
            raise ConfigurationError(
                f"runtime store '{path}' cannot be used: {exc}", hint="move the file away (it will be recreated)"
            ) from exc
        if version > SCHEMA_VERSION:
            self._db.close()
            raise ConfigurationError(
                f"runtime store '{path}' has schema version {version}, this postbridge knows {SCHEMA_VERSION}",
                hint="run the newer postbridge that wrote it, or move the file away",
            )

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._lock:
                if self._closed:
                    raise PostbridgeError(f"runtime store '{self.path}' was closed", hint="open it again")
                yield self._db
        except sqlite3.Error as exc:
            hint = "check the disk space and the permissions of the file and its folder"
            raise ConfigurationError(f"runtime store '{self.path}' failed: {exc}", hint=hint) from exc

    def _query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._locked() as db:
            return db.execute(sql, parameters).fetchall()

    def _query_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self._locked() as db, db:  # the connection's context manager commits, or rolls back on an exception
            db.execute("BEGIN")
            db.executemany(sql, rows)

    def _transaction(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        with self._locked() as db, db:
            db.execute("BEGIN")
            for sql, parameters in statements:
                rows = db.execute(sql, parameters).fetchall()
        return rows

    def close(self) -> None:
        """Close the file; later calls raise PostbridgeError."""
        with self._lock:
            self._closed = True
            self._db.close()


def mask_url(url: str) -> str:
    """`url` with any password (``user:PASSWORD@`` or ``password=...``) replaced by ``***``."""
    scheme, separator, rest = url.partition("://")
    if separator:
        authority, question, query = rest.partition("?")
        userinfo, at, host = authority.rpartition("@")
        if at and ":" in userinfo:
            authority = userinfo.partition(":")[0] + ":***@" + host
        rest = authority + question + query
    return re.sub(r"(password=)[^&\s]*", r"\1***", scheme + separator + rest, flags=re.IGNORECASE)


def open_store(url: str, *, home: Path) -> RuntimeStore:
    """The store a ``[runtime] state`` value names: ``""``/``"sqlite"`` (home/runtime.db), ``sqlite:///abs/path``,
    or ``postgresql://user@host:port/db``.

    Raises ConfigurationError for any other value (quoted with its password masked) or an unusable SQLite file,
    and NetworkError when PostgreSQL cannot be reached.
    """
    value = url.strip()
    if value in ("", "sqlite"):
        return SqliteStore(home / "runtime.db")
    if value.startswith("sqlite://"):
        path = value.removeprefix("sqlite://")
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"runtime state '{mask_url(value)}' needs an absolute file path",
                hint="write sqlite:/// followed by the absolute path, e.g. sqlite:///var/lib/postbridge/runtime.db",
            )
        return SqliteStore(Path(path))
    if value.startswith(("postgresql://", "postgres://")):
        try:
            from postbridge.runtime.store_pg import PostgresStore
        except ImportError as exc:
            raise ConfigurationError(
                f"runtime state '{mask_url(value)}' needs psycopg, which is not installed",
                hint="install it with pip install 'psycopg[binary]>=3.1'",
            ) from exc
        return PostgresStore(value)
    raise ConfigurationError(
        f"runtime state '{mask_url(value)}' is neither SQLite nor PostgreSQL",
        hint='use "sqlite", "sqlite:///absolute/path.db" or "postgresql://user@host:5432/database"',
    )


def _attempt(row: Sequence[Any]) -> Attempt:
    flow, key, attempt, at, outcome, detail, duration_ms, worker = row
    return Attempt(
        str(flow), str(key), int(attempt), float(at), str(outcome), str(detail),
        None if duration_ms is None else float(duration_ms), str(worker),
    )  # fmt: skip
