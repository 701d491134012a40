"""A private Dovecot (Debian's 2.3) on free loopback ports: IMAP + STARTTLS, IMAPS, POP3 + STLS, POP3S.

Owns: writing a self-contained configuration into a folder (runtime, state, log and maildirs all inside it),
starting `dovecot -F -c CONF`, waiting until every port greets, seeding mail straight into a maildir, waiting
for mail to arrive in one, and stopping the master process again.
Must not: use or change the system Dovecot (/etc/dovecot, the system service), listen anywhere but loopback,
or need SMTP to put mail into a mailbox.

Users are alice:secret and bob:secret. Plaintext authentication is disabled (`disable_plaintext_auth = yes`),
TLS is offered on the plain ports (STARTTLS / STLS) but not required for connecting. Mechanisms: PLAIN, LOGIN
and CRAM-MD5 (passwords are stored in the clear, so CRAM-MD5 works) - except with `require_tls_login=True`,
which leaves CRAM-MD5 out unless asked for: Dovecot offers it before TLS, so a client could log in without TLS.

For a Postfix in front of it (tests/servers/postfix.py) there are two unix sockets inside the private runtime
folder, never a port: `auth_socket` (Dovecot SASL for smtpd) and `lmtp_socket` (LMTP delivery into the same
maildirs IMAP and POP3 read; LMTP recipients may carry a domain: bob@corp.example is user bob). LMTP needs
Debian's dovecot-lmtpd; without it `lmtp_socket` is None and everything else works as before.

Dovecot treats a connection whose client address equals its local address as secure, so listening on
127.0.0.1 (the default) it still allows LOGIN without TLS from 127.0.0.1. With `require_tls_login=True` it
listens on 127.0.0.2 instead: clients connecting there come from 127.0.0.1 (Linux picks that source address
on lo), so Dovecot sees a remote client, announces LOGINDISABLED and refuses plaintext LOGIN/USER before TLS.
Always connect to `Dovecot.host`, never to a hard-coded address.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from . import LOOPBACK, find_executable, free_ports, server_missing, wait_for_port
from .pki import TestPki, make_test_pki

DOVECOT_CANDIDATES = ("/usr/sbin/dovecot",)
LMTP_BINARY = Path("/usr/lib/dovecot/lmtp")  # Debian's dovecot-lmtpd
SOCKET_USER = "postfix"  # when this user exists (and we are root), the two sockets belong to it
STRICT_LOOPBACK = "127.0.0.2"  # listen here so that Dovecot sees 127.0.0.1 clients as not secure
# Dovecot refuses uid 0 for mail access: as root, mail belongs to nobody; otherwise to the current user.
MAIL_UID = 65534 if os.geteuid() == 0 else os.getuid()
MAIL_GID = 65534 if os.geteuid() == 0 else os.getgid()
DEFAULT_USERS = {"alice": "secret", "bob": "secret"}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class Dovecot:
    """One private Dovecot instance. Use as a context manager or call start() and stop().

    start() raises RuntimeError when a port does not greet within 10 s or the process exits early (the
    message quotes the end of its log), and skips the test (fails it with CI=true) when Dovecot is missing.
    `lmtp=True` insists on the LMTP socket (skip/fail when dovecot-lmtpd is missing), `lmtp=False` leaves it
    out, the default None offers it when dovecot-lmtpd is installed. `cram_md5` switches CRAM-MD5 on or off; the
    default None offers it unless `require_tls_login` is set. `connections_per_user` raises Dovecot's limits for
    many sessions at once (benchmarks): that many IMAP/POP3 connections per user and client address, and enough
    login processes for them; the default None keeps Dovecot's own (10 per user and address, 100 login processes).
    """

    def __init__(
        self,
        folder: Path | None = None,
        pki: TestPki | None = None,
        users: dict[str, str] | None = None,
        *,
        require_tls_login: bool = False,
        lmtp: bool | None = None,
        cram_md5: bool | None = None,
        connections_per_user: int | None = None,
    ) -> None:
        # Dovecot's unprivileged processes (auth as 'dovecot', mail as uid 65534) must reach the folder, so by
        # default it is a fresh world-traversable folder in the system temp dir (pytest's tmp_path is not:
        # its root is mode 0700), removed again by stop().
        self._owns_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="postbridge-dovecot-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o755)
        _check_traversable(self.folder)
        self.users: dict[str, str] = dict(users or DEFAULT_USERS)
        self.pki: TestPki = pki if pki is not None else make_test_pki(self.folder / "pki")
        self.require_tls_login = require_tls_login
        self.host = STRICT_LOOPBACK if require_tls_login else LOOPBACK
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = free_ports(4, self.host)
        self.config_path = self.folder / "dovecot.conf"
        self.log_path = self.folder / "dovecot.log"
        self.mail_root = self.folder / "mail"
        # LMTP: None means "when dovecot-lmtpd is installed", so older machines keep working without it.
        self.lmtp_enabled = LMTP_BINARY.exists() if lmtp is None else lmtp
        # CRAM-MD5 is no plaintext mechanism, so disable_plaintext_auth allows it before TLS: off by default
        # where the point is that no login works without TLS.
        self.cram_md5 = not require_tls_login if cram_md5 is None else cram_md5
        self.connections_per_user = connections_per_user
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Dovecot:
        """Write the configuration, start Dovecot and wait until all four ports greet."""
        binary = find_executable("dovecot", DOVECOT_CANDIDATES)
        if self.lmtp_enabled and not LMTP_BINARY.exists():
            server_missing(f"Dovecot's LMTP server {LMTP_BINARY} is missing (Debian package dovecot-lmtpd)")
        self._write_config()
        with (self.folder / "dovecot.stderr").open("wb") as stderr:  # the child keeps its own copy
            self._process = subprocess.Popen(
                [str(binary), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the master process (SIGTERM, then SIGKILL after 10 s), wait for it, remove its own folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- sockets for an MTA ------------------------------------------------------------------------------

    @property
    def auth_socket(self) -> Path:
        """The unix socket of Dovecot's SASL service for an MTA (Postfix `smtpd_sasl_type = dovecot`)."""
        return self.folder / "run" / "auth-mta"

    @property
    def lmtp_socket(self) -> Path | None:
        """The unix socket of Dovecot's LMTP service (None when LMTP is not enabled)."""
        return self.folder / "run" / "lmtp-mta" if self.lmtp_enabled else None

    # -- mail --------------------------------------------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The maildir of `user`'s INBOX. Raises KeyError for an unknown user."""
        if user not in self.users:
            raise KeyError(f"unknown test user {user!r}; known users: {', '.join(sorted(self.users))}")
        return self.mail_root / user

    def deliver(self, user: str, message: bytes) -> Path:
        """Drop raw RFC 5322 `message` into `user`'s INBOX (maildir new/) owned by the mail uid.

        Returns the path of the new file. Raises KeyError for an unknown user, OSError when writing fails.
        """
        maildir = self.maildir(user)
        for sub in ("tmp", "new", "cur"):
            self._make_owned_dir(maildir / sub)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.postbridge-test"
        staging = maildir / "tmp" / name
        staging.write_bytes(message.replace(b"\r\n", b"\n"))
        self._chown(staging)
        final = maildir / "new" / name
        staging.rename(final)  # atomic within the maildir, as the maildir spec asks
        return final

    def find_message(self, user: str, subject: str) -> Path | None:
        """The file of a message in `user`'s INBOX (new/ or cur/) whose Subject header is `subject`, or None.

        Raises KeyError for an unknown user.
        """
        maildir = self.maildir(user)
        wanted = f"subject: {subject}".lower().encode()
        for sub in ("new", "cur"):
            try:
                candidates = sorted((maildir / sub).iterdir())
            except FileNotFoundError:
                continue
            for path in candidates:
                try:
                    header = path.read_bytes().split(b"\n\n", 1)[0]
                except FileNotFoundError:  # moved from new/ to cur/ by a reader meanwhile
                    continue
                if any(line.rstrip(b"\r").lower() == wanted for line in header.split(b"\n")):
                    return path
        return None

    def wait_for_message(self, user: str, subject: str, timeout: float = 10.0) -> Path:
        """Wait until a message with Subject `subject` is in `user`'s INBOX; return its file.

        Raises KeyError for an unknown user, TimeoutError (quoting the end of the log) when none arrives in
        time.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_message(user, subject)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                tail = "\n".join(self.log_text.splitlines()[-10:])
                raise TimeoutError(
                    f"no message with subject {subject!r} arrived in {user}'s INBOX ({self.maildir(user)}) "
                    f"within {timeout:.0f} s; last Dovecot log lines:\n{tail}"
                )
            time.sleep(0.02)

    @property
    def log_text(self) -> str:
        """Dovecot's log so far (for asserting on logins and for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        tls = self.pki.client_context()
        checks = [
            (self.imap_port, b"* OK", None),
            (self.imaps_port, b"* OK", tls),
            (self.pop3_port, b"+OK", None),
            (self.pop3s_port, b"+OK", tls),
        ]
        for port, greeting, context in checks:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                wait_for_port(port, self.host, remaining, expect=greeting, tls=context, alive=self._alive)
            except TimeoutError as exc:
                raise self._startup_failure(f"port {port} did not greet: {exc}") from exc
        sockets = [self.auth_socket, *([self.lmtp_socket] if self.lmtp_socket is not None else [])]
        while not all(path.is_socket() for path in sockets):
            if time.monotonic() >= deadline or not self._alive():
                missing = ", ".join(str(path) for path in sockets if not path.is_socket())
                raise self._startup_failure(f"did not create its socket(s) {missing}")
            time.sleep(0.02)

    def _startup_failure(self, what: str) -> Exception:
        process = self._process
        stderr_path = self.folder / "dovecot.stderr"
        stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
        tail = "\n".join((stderr + self.log_text).splitlines()[-20:])
        state = "running" if process is not None and process.poll() is None else "exited"
        return RuntimeError(f"Dovecot ({self.config_path}) {what}; process {state}; last log lines:\n{tail}")

    def _make_owned_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, MAIL_UID, MAIL_GID)

    def _write_config(self) -> None:
        folder = self.folder
        for sub in ("run", "state"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.mail_root, 0o755)
        for user in self.users:
            for sub in ("tmp", "new", "cur"):
                self._make_owned_dir(self.mail_root / user / sub)
            self._chown(self.mail_root / user)
        users_file = folder / "users"
        lmtp_config = ""
        if self.lmtp_enabled:
            lmtp_config = f"""service lmtp {{
  unix_listener lmtp-mta {{
{self._socket_owner()}  }}
}}
protocol lmtp {{
  # Postfix hands over bob@corp.example; the passwd-file knows plain bob.
  auth_username_format = %Ln
}}
"""
        limits = ""
        if self.connections_per_user is not None:
            # every STARTTLS session keeps its own imap-login process as the TLS proxy (service_count = 1)
            count = self.connections_per_user
            limits = f"""mail_max_userip_connections = {count}
default_process_limit = {max(100, count + 50)}
default_client_limit = {max(1000, 4 * count + 100)}
"""
        users_file.write_text(
            "".join(
                f"{user}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{self.mail_root / user}\n"
                for user, password in self.users.items()
            )
        )
        self.config_path.write_text(
            f"""# private test instance written by tests/servers/dovecot.py
base_dir = {folder}/run
state_dir = {folder}/state
log_path = {self.log_path}
info_log_path = {self.log_path}
listen = {self.host}
protocols = imap pop3{" lmtp" if self.lmtp_enabled else ""}
ssl = yes
ssl_cert = <{self.pki.chain_pem}
ssl_key = <{self.pki.key_pem}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login{" cram-md5" if self.cram_md5 else ""}
# Tests log in wrongly on purpose: answer failures at once and never slow down 127.0.0.1 afterwards.
auth_failure_delay = 0
mail_location = maildir:{self.mail_root}/%u
{limits}first_valid_uid = {MAIL_UID}
last_valid_uid = {MAIL_UID}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {users_file}
}}
userdb {{
  driver = passwd-file
  args = {users_file}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener auth-mta {{
{self._socket_owner()}  }}
}}
{lmtp_config}service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
"""
        )

    def _socket_owner(self) -> str:
        """Listener settings: readable by the postfix user when there is one and we may chown, else owner-only."""
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SOCKET_USER)
                grp.getgrnam(SOCKET_USER)
            except KeyError:
                pass
            else:
                return f"    mode = 0660\n    user = {SOCKET_USER}\n    group = {SOCKET_USER}\n"
        return "    mode = 0600\n"


def _check_traversable(folder: Path) -> None:
    """Raise ValueError when running as root and some ancestor of `folder` is closed to other users."""
    if os.geteuid() != 0:
        return
    for path in (folder.resolve(), *folder.resolve().parents):
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise ValueError(
                f"Dovecot folder {folder} is not reachable by Dovecot's unprivileged processes: {path} is "
                "not searchable by other users - pass folder=None to get a suitable temporary folder"
            )
