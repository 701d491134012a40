"""``postbridge lab``: an on-premise stand-in mail server that needs nothing but Python packages.

IMAP (pymap's in-memory backend), POP3 (a small sans-I/O server of our own over the same mailboxes) and SMTP
(aiosmtpd), each on a STARTTLS port and an implicit-TLS port, on loopback only, with certificates from a lab root CA
through an intermediate. Rooms: :mod:`.server` (the object you start), :mod:`.services` (listeners and the glue to
pymap and aiosmtpd), :mod:`.mailstore` (users and mailboxes), :mod:`.pop3` (the POP3 state machine),
:mod:`.certificates` (the lab PKI). The CLI lives in :mod:`postbridge.cli.lab`.
"""

from postbridge.lab.mailstore import LabUser
from postbridge.lab.server import DEFAULT_PASSWORDS, Endpoint, LabPorts, LabServer, default_users, loopback_host

__all__ = ["DEFAULT_PASSWORDS", "Endpoint", "LabPorts", "LabServer", "LabUser", "default_users", "loopback_host"]
