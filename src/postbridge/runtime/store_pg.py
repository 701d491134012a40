"""The runtime store on PostgreSQL (psycopg 3): the SQL of ``store.py``, shared by many workers on many machines.

Owns: a small pool of autocommit connections (one per concurrent caller, a few kept idle), creating the schema
once under an advisory lock (two workers may start at the same moment), and translating psycopg's errors into
the project's tree. A connection that broke is dropped; the next call opens a fresh one.
Must not: let the database password reach a message, a log or a repr (errors quote the URL through
:func:`mask_url` and have the password scrubbed from the server's text).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import conninfo, pq

from postbridge.errors import AuthenticationError, ConfigurationError, NetworkError, PostbridgeError
from postbridge.runtime.store import SCHEMA, SCHEMA_VERSION, SqlStore, mask_url

SCHEMA_LOCK = 0x706F7374627264  # pg_advisory_xact_lock key held while creating the schema ("postbrd")
CONNECT_TIMEOUT = 10  # seconds
MAX_IDLE = 8  # connections kept open between calls

Connection = psycopg.Connection[tuple[Any, ...]]


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> bytes:
    """The shared SQL with psycopg's placeholders (``%s``; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s").encode()


class PostgresStore(SqlStore):
    """The runtime store in a PostgreSQL database (``postgresql://user[:password]@host:port/database``).

    Raises ConfigurationError when the URL is malformed or the schema is newer than this postbridge,
    AuthenticationError when the server refuses the login, and NetworkError when it cannot be reached; every
    later call raises NetworkError when the server goes away and PostbridgeError for any other database error.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._masked = mask_url(url)
        self._secrets = _passwords(url)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False
        with self._connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA.split(";"):
                connection.execute(statement.encode())
            row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = int(row[0]) if row is not None else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            self.close()
            raise ConfigurationError(
                f"runtime store {self._masked} has schema version {version}, this postbridge knows {SCHEMA_VERSION}",
                hint="run the newer postbridge that wrote it, or point [runtime] state at another database",
            )

    def __repr__(self) -> str:
        return f"PostgresStore({self._masked!r})"

    def _connect(self) -> Connection:
        try:
            return psycopg.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name="postbridge"
            )
        except psycopg.Error as exc:
            raise self._translate(exc, "cannot connect") from exc

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection of the pool for one call, returned afterwards unless it broke or the store was closed."""
        with self._lock:
            if self._closed:
                raise PostbridgeError(f"runtime store {self._masked} was closed", hint="open it again")
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect()
        try:
            yield connection
        except psycopg.Error as exc:
            raise self._translate(exc, "failed") from exc
        finally:
            healthy = not (connection.closed or connection.broken)
            healthy = healthy and connection.info.transaction_status == pq.TransactionStatus.IDLE
            with self._lock:
                pooled = healthy and not self._closed and len(self._idle) < MAX_IDLE
                if pooled:
                    self._idle.append(connection)
            if not pooled:
                connection.close()

    def _translate(self, exc: psycopg.Error, what: str) -> PostbridgeError:
        text = " ".join(str(exc).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        message = f"runtime store {self._masked} {what}: {text}"
        if what == "cannot connect" and (isinstance(exc, psycopg.ProgrammingError) or "invalid " in text):
            hint = "write the URL as postgresql://user:password@host:5432/database (%-encode special characters)"
            return ConfigurationError(message, hint=hint)
        if "authentication failed" in text or exc.sqlstate in ("28000", "28P01"):
            return AuthenticationError(message, hint="check the user and password, and the server's pg_hba.conf")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            hint = "check that PostgreSQL runs there and accepts connections from this machine"
            return NetworkError(message, hint=hint)
        return PostbridgeError(message, hint="check the PostgreSQL server's log")

    def _query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as connection:
            cursor = connection.execute(_dialect(sql), parameters)
            return cursor.fetchall() if cursor.description is not None else []

    def _query_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self._connection() as connection, connection.transaction():
            connection.cursor().executemany(_dialect(sql), rows)

    def _transaction(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        with self._connection() as connection, connection.transaction():
            for sql, parameters in statements:
                cursor = connection.execute(_dialect(sql), parameters)
                rows = cursor.fetchall() if cursor.description is not None else []
        return rows

    def close(self) -> None:
        """Close the idle connections; one in use is closed when its call ends. Later calls raise."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _passwords(url: str) -> tuple[str, ...]:
    """The password in `url` as written, decoded and re-encoded, so that none of its forms leaks."""
    try:
        password = conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if not password:
        return ()
    return tuple({str(password), quote(str(password), safe=""), quote(str(password))} - {""})
