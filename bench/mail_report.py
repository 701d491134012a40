"""Turns one mail benchmark run into Markdown and puts it into the "Mail adapter" part of ``docs/performance.md``.

Owns: the IMAP and SMTP tables, the ratios and targets of issue 3 (tunnel >= 0.8 of direct, poller >= 3x the naive
client), the machine description, cProfile summaries, and the rule for updating the page: only the part between
:data:`BEGIN` and :data:`END` is replaced. When those markers are missing, :data:`SKELETON` (the hand-written "how
to run" part plus the markers) is appended, so the tunnel benchmark's section (``bench/report.py``, its own markers)
is never touched. Must not: measure anything.
"""

from __future__ import annotations

import math
import os
import platform
import pstats
import ssl
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.mail_clients import Timed
from bench.sections import replace_section

BEGIN = "<!-- bench/mail.py results: begin (generated, replaced on every run) -->"
END = "<!-- bench/mail.py results: end -->"

DIRECT = "(a) postbridge poller, direct"
TUNNEL = "(b) postbridge poller, through hub + connector"
NAIVE = "(c) naive imaplib, one message per round trip"
SMTP_REUSED = "one connection for all messages"
SMTP_NEW = "a new connection per message"
TUNNEL_TARGET = 0.8
NAIVE_TARGET = 3.0

SKELETON = f"""
## Mail adapter benchmark

```sh
.venv/bin/python bench/mail.py --quick                       # smoke test, under a minute, prints the tables
.venv/bin/python bench/mail.py --out docs/performance.md     # full run (a few minutes), updates this section
```

It needs Dovecot (with `dovecot-lmtpd`) and Postfix as installed by `scripts/setup-dev`, and root (Postfix). Everything
runs on 127.0.0.1 in one run: a private Dovecot and Postfix (`tests/servers/`), a real hub and connector
(`tests/harness.py`, log level `info`) with a `tcp` mapping `mail.corp.example:143` -> Dovecot's IMAP port.

- **IMAP drain**: 10,000 messages of about 10 KB (1,000 with `--quick`), the same set for every client, each
  client on a fresh Dovecot user whose maildir is filled with `Dovecot.deliver()` and indexed (one `SELECT`) before
  the clock starts. Post-processing is `archive` (move to `Archive`). (a) and (b) are `poll_imap` on one
  `open_session` (STARTTLS, verifying against the test root, AUTH PLAIN) with a `SqliteState` in the run's temporary
  folder and a handler that hashes every message; (b) goes through the hub's SOCKS5 port, so TLS is end to end
  through the tunnel. (c) is plain `imaplib` with a verifying `ssl` context and STARTTLS, one `UID FETCH
  (BODY.PEEK[])` and one `UID MOVE` per message. Afterwards every client's digests are compared with the message set
  and Dovecot must show an empty INBOX and a full Archive. Each client drains twice, interleaved (a, b, c, a, b, c),
  each time from a fresh mailbox, and its best drain counts (load from elsewhere only ever slows a drain down); the
  full run drains with (c) once, as that takes minutes and is mostly Dovecot's CPU.
- **SMTP**: 1,000 messages of about 10 KB (100 with `--quick`) to Postfix's submission port (STARTTLS + AUTH PLAIN
  through Dovecot SASL), once over one reused `SmtpSession`, once with `open_smtp` + `send_mail` + `QUIT` each.
- Wall time includes connecting, STARTTLS, login and logout. CPU time is the client's (this process), Dovecot's
  whole process tree (master, `imap-login` TLS proxies, `imap`), and hub + connector; CPU per message is the figure
  least disturbed by other load on the machine.

`--profile auto` (default) profiles when a target is missed: the poller in-process with cProfile, and, when the
tunnel is the slow part, hub and connector with py-spy (`pip install --target /tmp/py-spy py-spy`); `always` and
`never` do what they say. `--keep` keeps the temporary folder. Targets (issue 3): (b) >= {TUNNEL_TARGET} x (a), (a)
>= {NAIVE_TARGET:g} x (c). The benchmark reports whether they are met; it never fails a build.

{BEGIN}
{END}
"""


@dataclass
class MailRun:
    quick: bool
    imap_count: int
    smtp_count: int
    message_bytes: float  # mean size of the IMAP message set
    imap: dict[str, Timed] = field(default_factory=dict)
    smtp: dict[str, Timed] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    load_start: str = ""
    load_end: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0


@dataclass(frozen=True)
class Target:
    label: str
    met: bool | None  # None: not measured
    value: str


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _usable(result: Timed | None) -> bool:
    return result is not None and result.messages > 0 and not result.errors


def ratio(top: Timed | None, bottom: Timed | None) -> float | None:
    if not (_usable(top) and _usable(bottom)) or top is None or bottom is None or not bottom.rate:
        return None
    return top.rate / bottom.rate


def targets(run: MailRun) -> list[Target]:
    direct, tunnel, naive = run.imap.get(DIRECT), run.imap.get(TUNNEL), run.imap.get(NAIVE)
    checks = []
    for label, value, goal in (
        (f"tunnel >= {TUNNEL_TARGET} of direct, (b)/(a)", ratio(tunnel, direct), TUNNEL_TARGET),
        (f"poller >= {NAIVE_TARGET:g}x the naive client, (a)/(c)", ratio(direct, naive), NAIVE_TARGET),
    ):
        text = "not measured" if value is None else f"{value:.2f}"
        checks.append(Target(label, None if value is None else value >= goal, text))
    return checks


def machine(extra: list[str]) -> list[str]:
    """The machine and the versions of what was measured, one Markdown bullet each."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = float("nan")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) / 1024 / 1024
    return [
        f"- CPU: `nproc` = {len(os.sched_getaffinity(0))}, {cpu}; memory {memory:.0f} GiB; Linux {platform.release()}",
        f"- Python {platform.python_version()}, {ssl.OPENSSL_VERSION}",
        *[f"- {line}" for line in extra],
    ]


def program_version(*command: str) -> str:
    """The first line a program prints for its version (or why there is none)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return f"{command[0]} not found"
    return ((done.stdout + done.stderr).strip().splitlines() or ["?"])[0]


def _imap_table(run: MailRun) -> list[str]:
    lines = [
        "| IMAP drain, post-processing archive | messages | seconds | messages/s | MB/s | round trips "
        "| client CPU ms/msg | Dovecot CPU ms/msg | hub + connector CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in run.imap.items():
        lines.append(
            f"| {name} | {result.messages:,} | {result.seconds:.2f} | {_fmt(result.rate)} | "
            f"{_fmt(result.bytes / result.seconds / 1e6 if result.seconds else None, 2)} | {result.round_trips:,} | "
            f"{_fmt(result.per_message_ms(result.client_cpu), 3)} | "
            f"{_fmt(result.per_message_ms(result.server_cpu), 3)} | "
            f"{_fmt(result.per_message_ms(result.relay_cpu), 3)} |"
        )
    return lines


def _smtp_table(run: MailRun) -> list[str]:
    lines = [
        "| SMTP submission, STARTTLS + AUTH | messages | connections | seconds | messages/s | client CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in run.smtp.items():
        lines.append(
            f"| {name} | {result.messages:,} | {result.connections:,} | {result.seconds:.2f} | {_fmt(result.rate)} | "
            f"{_fmt(result.per_message_ms(result.client_cpu), 3)} |"
        )
    return lines


def render(run: MailRun, versions: list[str]) -> str:
    """The generated section (without the markers)."""
    lines = [
        f"### Latest mail results ({'quick smoke run' if run.quick else 'full run'})",
        "",
        f"Run on {run.started:%Y-%m-%d %H:%M} UTC, took {run.seconds:.0f} s; load average {run.load_start} at the "
        f"start, {run.load_end} at the end (other work on the machine slows every client alike; CPU per message is "
        "the least affected figure).",
        "",
        *machine(versions),
        "",
    ]
    if run.imap:
        lines += [*_imap_table(run), ""]
        direct, tunnel, naive = (run.imap.get(key) for key in (DIRECT, TUNNEL, NAIVE))
        lines.append(
            f"Ratios: (b)/(a) = {_fmt(ratio(tunnel, direct), 2)}, (a)/(c) = {_fmt(ratio(direct, naive), 2)}, "
            f"(b)/(c) = {_fmt(ratio(tunnel, naive), 2)}. {run.imap_count:,} messages of {run.message_bytes:,.0f} bytes "
            "on average per client."
        )
        lines.append("")
    if run.smtp:
        lines += [*_smtp_table(run), ""]
        reused, new = run.smtp.get(SMTP_REUSED), run.smtp.get(SMTP_NEW)
        lines += [f"Ratio one connection / new connection each: {_fmt(ratio(reused, new), 2)}.", ""]
    for result in [*run.imap.values(), *run.smtp.values()]:
        if result.stopped_by:
            lines.append(f"- {result.name}: stopped by the {result.stopped_by} after {result.messages:,} messages")
        lines += [f"- {result.name}: **error**: {error}" for error in result.errors[:5]]
    lines += [f"- {name}: not measured — {why}" for name, why in run.skipped.items()]
    lines += [f"- {note}" for note in run.notes]
    checks = targets(run)
    lines += ["", "#### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in checks:
        mark = "not measured" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.label} | {t.value} | {mark} |")
    for profile in run.profiles:
        lines += ["", profile]
    return "\n".join(lines).rstrip() + "\n"


def _frame(key: tuple[str, int, str]) -> str:
    path, line, function = key
    if path == "~":
        return function
    for marker in ("site-packages/", "src/", "lib/python3.11/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{function} ({path}:{line})"


def summarise_cprofile(stats: pstats.Stats, seconds: float, top: int = 12) -> str:
    """A Markdown table of the functions with the most own time and the most time including callees."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total = sum(own for _, _, own, _, _ in table.values()) or 1.0
    by_own = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    by_inclusive = sorted(table.items(), key=lambda item: item[1][3], reverse=True)
    broad = [item for item in by_inclusive if item[1][3] < 0.9 * total]  # the whole run says nothing
    lines = [
        f"cProfile of the client: {total:.2f} s of profiled time in {seconds:.2f} s wall time (cProfile itself slows "
        "Python code down, so compare shares, not seconds).",
        "",
        "| own time | calls | function | | incl. time | function |",
        "|---:|---:|---|---|---:|---|",
    ]
    for (key_own, own), (key_inc, inc) in zip(by_own, broad[:top], strict=False):
        lines.append(
            f"| {own[2] / total:.0%} | {own[1]:,} | `{_frame(key_own)}` | | {inc[3] / total:.0%} "
            f"| `{_frame(key_inc)}` |"
        )
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Replace the generated mail section of ``path``; append the skeleton first when its markers are missing."""
    replace_section(path, section, begin=BEGIN, end=END, new_page="# Performance\n", appended="\n" + SKELETON)
