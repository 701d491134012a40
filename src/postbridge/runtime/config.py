"""The flows file (``FLOWS.toml``): which mailboxes to drain into which targets, validated once with line numbers.

:func:`postbridge.runtime.flows_file.load_flows` reads the file and either returns a frozen :class:`RuntimeConfig`
or raises :class:`FlowsFileError` listing EVERY problem (each with its line, the cause quoting the bad value, and
the fix) — one bad flow never hides another's mistakes. The channel keys of ``[flow.sender]`` are parsed by the
mail adapter's own :func:`~postbridge.mail.settings.channel_from_mapping`, the rest by the poller's
:class:`~postbridge.mail.poller.SenderSettings`; relative paths (binding, keystore, a target's ``path`` and
``ca_file``) are taken relative to the flows file's folder. :data:`EXAMPLE` is a complete, valid file.

This module owns the values (retry policy, flow, runtime, problems), the key lists and :data:`EXAMPLE`; it must not
read files or do I/O.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError
from postbridge.mail.poller import Pop3PostProcessing, SenderSettings
from postbridge.mail.settings import (
    ChannelSettings,
)

EXAMPLE = """\
# postbridge flows file: every [[flow]] drains one mailbox into one target. A message is post-processed in the
# mailbox (marked read, deleted, archived) only after the target accepted it. Relative paths are relative to the
# folder of this file.

[runtime]
state = "sqlite"                    # "sqlite" (HOME/runtime.db), "sqlite:///abs/path.db" or "postgresql://..."
metrics = "127.0.0.1:9464"          # /metrics, /healthz and /readyz; "" = off
lease_seconds = 60                  # one worker polls a flow at a time; its lease lasts this long unless renewed
worker = ""                         # this worker's name in leases and logs; "" = hostname-pid

[[flow]]
name = "invoices"
protocol = "imap"                   # imap | pop3
mode = "idle"                       # poll | idle (IMAP only; polls every `interval` when the server lacks IDLE)
interval = 60                       # seconds between polls
stale_after = 600                   # unhealthy without a successful poll for this long (default 10 x interval)
enabled = true

[flow.sender]                       # the channel keys of 'postbridge mail poll' [sender], plus what to read
address = "mail.corp.example:143"
proxy = "internet"                  # or "on-premise" with location_id and binding (the hub's binding file)
protection = "starttls-mandatory"   # off | starttls-mandatory | starttls-optional | tls
credential = "invoices-mailbox"     # a name in 'postbridge credentials'
folder = "INBOX"
selection = "unread"                # unread | all
post_processing = "archive-and-mark-read"   # mark-read | delete | archive | archive-and-mark-read | keep
archive_folder = "Archive/Invoices"
quarantine_folder = "Quarantine"    # where a message goes after max_attempts refusals
max_messages_per_poll = 100
max_message_size = 26214400         # bytes; larger messages are quarantined

[flow.retry]                        # delay = min(maximum, initial * multiplier ** (attempt - 1)), +-10% jitter
max_attempts = 5                    # then the message is quarantined
initial = 5
maximum = 600
multiplier = 2.0

[flow.target]
kind = "directory"                  # http | directory | smtp | python
path = "spool/invoices"             # <idempotency key>.eml and .json per message

[[flow]]
name = "support"
protocol = "pop3"
interval = 120

[flow.sender]
address = "pop.corp.example:995"
protection = "tls"
credential = "support-mailbox"
post_processing = "delete"          # POP3: delete | keep

[flow.target]
kind = "http"
url = "https://tickets.example.com/api/mail"
format = "json"                     # raw (message/rfc822) | json
headers = { Authorization = "Bearer ${TICKETS_TOKEN}" }
timeout = 30
"""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a refused message is offered to the target again before quarantine."""

    max_attempts: int = 5
    initial: float = 5.0  # seconds before the 2nd attempt
    maximum: float = 600.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts {self.max_attempts} is below 1", hint="e.g. max_attempts = 5")
        if not 0 < self.initial < math.inf:
            raise ConfigurationError(f"initial {self.initial:g} is not above 0 seconds", hint="e.g. initial = 5")
        if not self.initial <= self.maximum < math.inf:
            raise ConfigurationError(
                f"maximum {self.maximum:g} is below initial {self.initial:g}", hint="e.g. maximum = 600"
            )
        if not 1 <= self.multiplier < math.inf:
            raise ConfigurationError(f"multiplier {self.multiplier:g} is below 1", hint="e.g. multiplier = 2.0")

    def delay(self, attempt: int, *, jitter: float = 0.1, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 = the first try): ``initial``, growing by
        ``multiplier`` up to ``maximum``, then spread by +-``jitter`` so that refused messages do not return in
        lockstep. Raises ValueError for an attempt below 1 or a jitter outside [0, 1)."""
        if attempt < 1 or not 0 <= jitter < 1:
            raise ValueError(f"attempt {attempt} must be at least 1 and jitter {jitter} in [0, 1)")
        try:
            base = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        except OverflowError:
            base = self.maximum
        return base * (rng or random).uniform(1 - jitter, 1 + jitter)


@dataclass(frozen=True)
class FlowConfig:
    """One flow: the mailbox (channel and what to read), the retry policy and the target table."""

    name: str
    protocol: str  # "imap" | "pop3"
    mode: str  # "poll" | "idle"
    interval: float
    stale_after: float
    enabled: bool
    channel: ChannelSettings
    sender: SenderSettings  # for POP3 only the limits apply; its max_attempts is retry.max_attempts
    pop3_post_processing: Pop3PostProcessing  # used with protocol "pop3" only
    retry: RetryPolicy
    target: Mapping[str, Any] = field(repr=False)  # the [flow.target] table, paths resolved; may hold ${ENV} names
    target_source: str  # what build_target's errors start with
    line: int  # of the [[flow]] header


@dataclass(frozen=True)
class RuntimeConfig:
    """The whole flows file."""

    path: Path
    state: str = field(repr=False)  # may carry a database password
    metrics: HostPort | None
    lease_seconds: float
    worker: str  # "" = hostname-pid of the running process
    flows: tuple[FlowConfig, ...]


@dataclass(frozen=True)
class Problem:
    """One mistake in the flows file: where (``line``, None for the file as a whole), what, and the fix."""

    line: int | None
    message: str
    hint: str

    def render(self, path: Path | str) -> str:
        """``FILE:LINE: message — hint``, the form editors and CI logs turn into links."""
        where = f"{path}:{self.line}" if self.line is not None else str(path)
        return f"{where}: {self.message}" + (f" — {self.hint}" if self.hint else "")


class FlowsFileError(ConfigurationError):
    """The flows file has problems: the message names the file and the count, ``problems`` lists all of them in
    line order, and :meth:`render` gives one ``FILE:LINE: message — hint`` line per problem."""

    def __init__(self, path: Path, problems: Iterable[Problem]) -> None:
        self.path = path
        self.problems = tuple(sorted(problems, key=lambda problem: (problem.line is not None, problem.line or 0)))
        count = len(self.problems)
        super().__init__(
            f"{path}: {count} problem{'s' if count != 1 else ''} in the flows file",
            hint="fix each line listed; 'postbridge flows example' prints a complete, valid flows file",
        )

    def render(self) -> str:
        return "\n".join(problem.render(self.path) for problem in self.problems)


RUNTIME_KEYS = ("state", "metrics", "lease_seconds", "worker")
FLOW_KEYS = ("name", "protocol", "mode", "interval", "stale_after", "enabled", "sender", "retry", "target")
RETRY_KEYS = tuple(f.name for f in dataclasses.fields(RetryPolicy))
# [flow.sender] = the channel keys of channel_from_mapping + what SenderSettings reads (its max_attempts is
# [flow.retry]'s). The channel keys follow ChannelSettings: `credentials` is written as user/password/credential.
SENDER_KEYS = tuple(f.name for f in dataclasses.fields(SenderSettings) if f.name != "max_attempts")
_CHANNEL_FIELDS = tuple(f.name for f in dataclasses.fields(ChannelSettings) if f.name != "credentials")
CHANNEL_KEYS = (*_CHANNEL_FIELDS, "user", "password", "credential")
TARGET_KINDS = ("http", "directory", "smtp", "python")
PROTOCOLS = ("imap", "pop3")
MODES = ("poll", "idle")
