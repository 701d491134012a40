"""A private PostgreSQL cluster on a free loopback port, for the runtime store's tests.

Owns: finding Debian's server programs (/usr/lib/postgresql/<version>/bin), running `initdb` into a fresh
temporary folder (as the `postgres` system user when we are root: PostgreSQL refuses to run as root), starting
`postgres` in the foreground on 127.0.0.1 with its unix socket inside that folder, trust authentication for
loopback only and fsync on (the store's durability is what the tests check), creating databases, and stopping
the server again (fast shutdown) and removing the folder.
Must not: use or change the system cluster (/etc/postgresql, /var/lib/postgresql, port 5432), or listen
anywhere but 127.0.0.1.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

from . import LOOPBACK, free_ports, server_missing, wait_for_port

SYSTEM_USER = "postgres"  # root cannot run initdb or postgres: they run as this user instead
SUPERUSER = "postgres"  # the cluster's superuser; trust authentication, so no password
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HBA = f"""# private test cluster written by tests/servers/postgres.py: loopback only, no password
local all all trust
host all all {LOOPBACK}/32 trust
"""


def find_bin_directory() -> Path:
    """The folder holding `initdb` and `postgres`: the newest /usr/lib/postgresql/*/bin, else the one on PATH.

    Skips the test (fails it with CI=true) when PostgreSQL's server programs are nowhere to be found.
    """

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(candidate, name), os.X_OK) for name in ("initdb", "postgres")):
            return Path(candidate)
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb is None or postgres is None or Path(initdb).parent != Path(postgres).parent:
        server_missing("PostgreSQL's initdb and postgres not found (looked in /usr/lib/postgresql/*/bin and PATH)")
    return Path(initdb).parent


class Postgres:
    """One private PostgreSQL cluster. Use as a context manager or call start() and stop().

    start() skips the test (fails it with CI=true) when PostgreSQL or, as root, the `postgres` system user is
    missing, and raises RuntimeError quoting the server's log when initdb fails or the server does not come up.
    """

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.database = "postbridge"
        self.folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)
        self._run_as: dict[str, Any] = {}

    @property
    def url(self) -> str:
        """The URL of the database created at start."""
        return self.database_url(self.database)

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{name}"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Postgres:
        """initdb a fresh cluster, start the server, wait until it answers, create the test database."""
        bin_directory = find_bin_directory()
        folder = Path(tempfile.mkdtemp(prefix="postbridge-postgres-"))
        self.folder = folder
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                self.stop()
                server_missing(f"system user '{SYSTEM_USER}' missing (root cannot run initdb)")
            os.chown(folder, user.pw_uid, user.pw_gid)
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        try:
            self._initdb(bin_directory)
            self._start_server(bin_directory)
            self._wait_until_ready()
            self.execute(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (SIGINT: fast shutdown; SIGKILL after 10 s), wait for it, remove the folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------------------------

    def new_database(self) -> str:
        """Create a fresh, empty database and return its URL."""
        name = f"test_{next(self._counter)}_{uuid.uuid4().hex[:8]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def execute(self, sql: str) -> None:
        """Run one statement as the superuser in the maintenance database `postgres` (autocommit)."""
        with psycopg.connect(self.database_url("postgres"), autocommit=True) as connection:
            connection.execute(sql.encode())

    @property
    def log_text(self) -> str:
        log = self.folder / "postgres.log" if self.folder is not None else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    # -- internals ---------------------------------------------------------------------------------------

    def _initdb(self, bin_directory: Path) -> None:
        assert self.folder is not None
        data = self.folder / "data"
        command = [str(bin_directory / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust"]
        command += ["-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"]
        result = subprocess.run(command, cwd=self.folder, capture_output=True, check=False, **self._run_as)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb into {data} failed (exit {result.returncode}):\n{output[-2000:]}")
        (data / "pg_hba.conf").write_text(HBA)  # as the owner: the server only reads it

    def _start_server(self, bin_directory: Path) -> None:
        assert self.folder is not None
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.folder),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "100",
            "shared_buffers": "16MB",
            "dynamic_shared_memory_type": "mmap",  # /dev/shm is small in containers
            "logging_collector": "off",
        }
        command = [str(bin_directory / "postgres"), "-D", str(self.folder / "data")]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with (self.folder / "postgres.log").open("wb") as log:  # the child keeps its own copy
            self._process = subprocess.Popen(
                command,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in pytest must not stop it before the tests' teardown
                **self._run_as,
            )

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            wait_for_port(self.port, LOOPBACK, START_TIMEOUT, alive=self._alive)
        except TimeoutError as exc:
            raise self._startup_failure(str(exc)) from exc
        while True:  # the port opens before recovery ends ("the database system is starting up")
            try:
                self.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline or not self._alive():
                    raise self._startup_failure(f"does not answer queries: {exc}") from exc
                time.sleep(0.05)

    def _startup_failure(self, what: str) -> RuntimeError:
        tail = "\n".join(self.log_text.splitlines()[-20:])
        state = "running" if self._alive() else "exited"
        return RuntimeError(f"PostgreSQL on {LOOPBACK}:{self.port} {what}; process {state}; last log lines:\n{tail}")
