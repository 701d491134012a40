"""A private Postfix (Debian's 3.7) on free loopback ports, delivering into a private Dovecot over LMTP.

Owns: writing main.cf and master.cf into a temporary folder together with the queue and data directories,
creating the queue directories (`postfix -c DIR check`), running the master process in the foreground
(`master -c DIR -s`), waiting until every port greets 220, and stopping it again.
Must not: use or change the system Postfix (/etc/postfix, /var/spool/postfix, port 25), listen anywhere but
127.0.0.1, or send mail off the machine: only the Dovecot users at corp.example are valid recipients, there is
no SMTP client service in master.cf and every other destination is refused at RCPT time (554 5.7.1 Relay
access denied), even for an authenticated sender.

Ports (all on `Postfix.host`):
- `smtp_port`: an MX-style receiver without authentication (STARTTLS offered, not required);
- `submission_port`: STARTTLS required before MAIL (`smtpd_tls_security_level = encrypt`), AUTH PLAIN/LOGIN
  offered only after STARTTLS (`smtpd_tls_auth_only = yes`), mail accepted only from authenticated clients;
- `smtps_port`: the same behind implicit TLS (`smtpd_tls_wrappermode = yes`).
Authentication is Dovecot's (`smtpd_sasl_type = dovecot` on `Dovecot.auth_socket`), so alice:secret and
bob:secret work as they do for IMAP. The certificate is the TestPki leaf plus its intermediate.

The master process runs as root and drops to the `postfix` user, so a private instance needs root (which CI
and the development machines have); without root or without Postfix the test skips (fails with CI=true).
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from . import LOOPBACK, find_executable, free_ports, server_missing, wait_for_port
from .dovecot import Dovecot
from .pki import TestPki

POSTFIX_CANDIDATES = ("/usr/sbin/postfix",)
MASTER_CANDIDATES = ("/usr/lib/postfix/sbin/master", "/usr/libexec/postfix/master")
MAIL_OWNER = "postfix"
HOSTNAME = "mail.corp.example"
DOMAIN = "corp.example"
START_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class Postfix:
    """One private Postfix instance in front of a started `Dovecot`. A context manager, or start()/stop().

    start() raises RuntimeError when the configuration check fails or a port does not greet within 10 s (the
    message quotes the end of the log), and skips the test (fails it with CI=true) when Postfix, the
    `postfix` user, root, or Dovecot's LMTP socket is missing.
    """

    def __init__(self, dovecot: Dovecot, folder: Path | None = None, pki: TestPki | None = None) -> None:
        # Postfix's unprivileged daemons (user 'postfix') work inside the queue folder, so by default it is a
        # fresh world-searchable folder in the system temp dir (pytest's tmp_path is not), removed by stop().
        self._owns_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="postbridge-postfix-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o755)
        _check_reachable(self.folder)
        self.dovecot = dovecot
        self.pki: TestPki = pki if pki is not None else dovecot.pki
        self.host = LOOPBACK
        self.hostname = HOSTNAME
        self.domain = DOMAIN
        self.smtp_port, self.submission_port, self.smtps_port = free_ports(3, self.host)
        self.config_dir = self.folder / "etc"
        self.queue_dir = self.folder / "spool"
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "postfix.log"
        self._stderr_path = self.folder / "master.stderr"
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Postfix:
        """Write the configuration, create the queue, start the master and wait until all ports greet 220."""
        try:
            postfix = find_executable("postfix", POSTFIX_CANDIDATES)
            master = find_executable("master", MASTER_CANDIDATES)
            self._check_prerequisites()
            self._write_config()
            # `check` creates the missing queue and data directories with Postfix's own owners and modes (the
            # same step `postfix start` runs) and fails on a configuration it cannot use.
            self._run_postfix_command(postfix, "check")
            with self._stderr_path.open("wb") as stderr:  # the child keeps its own copy
                self._process = subprocess.Popen(
                    [str(master), "-c", str(self.config_dir), "-s"],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                )
            self._wait_until_ready()
        except BaseException:  # also pytest's skip: leave no process and no folder behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the master and its daemons (SIGTERM, SIGKILL after 10 s), then remove its own folder."""
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

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- mail --------------------------------------------------------------------------------------------

    def address(self, user: str) -> str:
        """The mail address of Dovecot user `user` (alice -> alice@corp.example)."""
        return f"{user}@{self.domain}"

    def wait_for_message(self, user: str, subject: str, timeout: float = 10.0) -> Path:
        """Wait until Dovecot holds a message with Subject `subject` in `user`'s INBOX; return its file.

        Raises KeyError for an unknown user, TimeoutError (quoting the Postfix log) when none arrives in time.
        """
        try:
            return self.dovecot.wait_for_message(user, subject, timeout)
        except TimeoutError as exc:
            tail = "\n".join(self.log_text.splitlines()[-10:])
            raise TimeoutError(f"{exc}\nlast Postfix log lines:\n{tail}") from exc

    @property
    def log_text(self) -> str:
        """Postfix's log so far (maillog_file), for assertions and failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------------------------

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            server_missing("a private Postfix needs root (its master starts as root and drops to 'postfix')")
        try:
            pwd.getpwnam(MAIL_OWNER)
        except KeyError:
            server_missing(f"user '{MAIL_OWNER}' does not exist (the Debian package postfix creates it)")
        if self.dovecot.lmtp_socket is None:
            server_missing("Dovecot has no LMTP socket (Debian package dovecot-lmtpd; Dovecot(lmtp=True))")
        for path in (self.dovecot.auth_socket, self.dovecot.lmtp_socket):
            if not path.is_socket():
                raise RuntimeError(f"Dovecot socket {path} does not exist - start the Dovecot before the Postfix")

    def _run_postfix_command(self, postfix: Path, *args: str) -> None:
        """Run `postfix -c DIR ARGS`; raise RuntimeError quoting its complaint when it fails.

        Postfix commands write their complaints to stderr only when it is a terminal (else to syslog, which a
        test machine may not have), so stderr is a pseudo-terminal here.
        """
        command = [str(postfix), "-c", str(self.config_dir), *args]
        reader, writer = os.openpty()
        try:
            with open(writer, "wb", closefd=True) as terminal:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
            output = _drain(reader, deadline=time.monotonic() + COMMAND_TIMEOUT)  # while it writes: no deadlock
        finally:
            os.close(reader)
        try:
            returncode = process.wait(max(0.1, COMMAND_TIMEOUT))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = -signal.SIGKILL
        if returncode != 0:
            raise RuntimeError(
                f"'{' '.join(command)}' failed (exit {returncode}): {output.strip()[-2000:] or 'no output'}"
            )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        tls = self.pki.client_context()
        for port, context in ((self.smtp_port, None), (self.submission_port, None), (self.smtps_port, tls)):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                wait_for_port(port, self.host, remaining, expect=b"220 ", tls=context, alive=self._alive)
            except TimeoutError as exc:
                raise self._startup_failure(f"port {port} did not greet: {exc}") from exc

    def _startup_failure(self, what: str) -> Exception:
        stderr = self._stderr_path.read_text(errors="replace") if self._stderr_path.exists() else ""
        tail = "\n".join((stderr + self.log_text).splitlines()[-20:]) or "(none)"
        if self._alive():
            state = "running"
        else:
            # The master reports start-up errors (such as a port it cannot bind) to syslog only, which a test
            # machine may lack: name the likeliest cause ourselves.
            busy = [port for port in (self.smtp_port, self.submission_port, self.smtps_port) if _port_taken(port)]
            state = "exited" + (f" - port(s) {busy} are taken by another process, run the test again" if busy else "")
        return RuntimeError(f"Postfix ({self.config_dir}) {what}; master {state}; last log lines:\n{tail}")

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)  # Postfix makes what is inside, owned by 'postfix'
        recipients = self.config_dir / "virtual_mailboxes"
        files = {
            recipients: "".join(f"{self.address(user)} {user}/\n" for user in self.dovecot.users),
            self.config_dir / "main.cf": self._main_cf(recipients),
            self.config_dir / "master.cf": self._master_cf(),
        }
        # Postfix re-reads a file changed within the last second every 300 ms until it is older (it may be in
        # the middle of an edit), which costs about 2 s per start: date the files a minute back.
        settled = time.time() - 60
        for path, text in files.items():
            path.write_text(text)
            os.utime(path, (settled, settled))

    def _main_cf(self, recipients: Path) -> str:
        never = "error:5.7.1 this test Postfix never sends mail off the machine"
        return f"""# private test instance written by tests/servers/postfix.py
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = {MAIL_OWNER}
maillog_file = {self.log_path}
maillog_file_prefixes = {self.folder}
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $mydomain
mydestination =
mynetworks = 127.0.0.1/32
inet_interfaces = {self.host}
inet_protocols = ipv4
smtp_address_preference = ipv4
alias_maps =
alias_database =
local_recipient_maps =
relay_domains =
biff = no
smtpd_banner = $myhostname ESMTP postbridge test Postfix

# Mail for corp.example goes to Dovecot over LMTP; nothing else goes anywhere.
virtual_mailbox_domains = {self.domain}
virtual_mailbox_maps = texthash:{recipients}
virtual_transport = lmtp:unix:{self.dovecot.lmtp_socket}
default_transport = {never}
relay_transport = {never}
smtpd_relay_restrictions = reject_unauth_destination
smtpd_reject_unlisted_recipient = yes

# TLS: leaf + intermediate from the test PKI.
smtpd_tls_cert_file = {self.pki.chain_pem}
smtpd_tls_key_file = {self.pki.key_pem}
smtpd_tls_security_level = may
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1

# SASL through Dovecot; switched on per service in master.cf, never before TLS.
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.dovecot.auth_socket}
smtpd_sasl_auth_enable = no
smtpd_tls_auth_only = yes
smtpd_sasl_security_options = noanonymous

# Tests fail on purpose: answer at once, never slow down or lock out 127.0.0.1.
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_junk_command_limit = 1000
smtpd_client_auth_rate_limit = 0
"""

    def _master_cf(self) -> str:
        authenticated = (
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject\n"
        )
        host = self.host
        return f"""# private test instance written by tests/servers/postfix.py (no smtp client: nothing leaves)
# service   type  private unpriv chroot wakeup maxproc command
{host}:{self.smtp_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtp
{host}:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
{authenticated}{host}:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
{authenticated}cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def _check_reachable(folder: Path) -> None:
    """Raise ValueError when some directory above `folder` is closed to Postfix's unprivileged daemons."""
    for path in (folder.resolve(), *folder.resolve().parents):
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise ValueError(
                f"Postfix folder {folder} is not reachable by the 'postfix' user: {path} is not searchable by "
                "other users - pass folder=None to get a suitable temporary folder"
            )


def _port_taken(port: int, host: str = LOOPBACK) -> bool:
    """True when `host:port` cannot be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _drain(reader: int, deadline: float) -> str:
    """Everything written to the pseudo-terminal whose reading end is `reader`, until every writer has closed
    it or `deadline` (time.monotonic()) passes."""
    chunks: list[bytes] = []
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([reader], [], [], remaining)
        if not ready:
            break
        try:
            chunk = os.read(reader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
