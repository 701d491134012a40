"""Turns one runtime benchmark run into Markdown and puts it into the "Runtime" part of ``docs/performance.md``.

Owns: the tables of the end-to-end runs (directory and http target, SQLite and PostgreSQL state), their ratio to the
mail adapter's own drain measured in the same run, the memory table of IDLE flows, the two or three sentences that
say what the figures mean, and the rule for updating the page: only the part between :data:`BEGIN` and :data:`END`
is replaced. When those markers are missing, :data:`SKELETON` (the hand-written "how to run" part plus the
markers) is appended, so the tunnel and mail sections (their own markers) are never touched. Must not: measure
anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.mail_clients import Timed
from bench.mail_report import machine
from bench.sections import replace_section

BEGIN = "<!-- bench/runtime.py results: begin (generated, replaced on every run) -->"
END = "<!-- bench/runtime.py results: end -->"

SKELETON = f"""
## Runtime benchmark

```sh
.venv/bin/python bench/runtime.py --quick                       # smoke test, about a minute, prints the tables
.venv/bin/python bench/runtime.py --out docs/performance.md     # full run (a few minutes), updates this section
```

It needs Dovecot and PostgreSQL as installed by `scripts/setup-dev`. Everything runs on 127.0.0.1 in one run: a
private Dovecot (`tests/servers/dovecot.py`, its per-user connection limit raised for the IDLE flows), a private
PostgreSQL (`tests/servers/postgres.py`, fsync on), a real hub and connector (`tests/harness.py`, log level `info`)
with a `tcp` mapping `mail.corp.example:143` -> Dovecot's IMAP port, and an HTTP sink in the benchmark process (a
`ThreadingHTTPServer`, HTTP/1.1 keep-alive, answering `201` and counting requests by `Idempotency-Key`).

- **End to end**: `postbridge run FLOWS.toml` as a child process (log level `info`) with one poll flow
  (`proxy = "on-premise"`, `location_id = "dc1"`, the binding file of `postbridge cloud binding`, STARTTLS through
  the tunnel, `post_processing = "archive"`) draining 2,000 messages of about 10 KB (200 with `--quick`; the mail
  benchmark's message set, filled into a fresh Dovecot user and indexed before the clock starts) into (a) the
  `directory` target and (b) the `http` target (`format = "raw"`), each with SQLite and with PostgreSQL state. The
  clock runs from starting the process until the last message's `done_at` in the store (the benchmark looks at
  the store every 0.2 s to notice the end); the second figure runs from the first `delivered_at` to the last
  `done_at`, so it leaves out process start-up, loading the flows file, opening the store and the first
  connection. A run counts only when every message arrived: the directory must hold every Message-ID of the set
  once with the right bytes, the sink must have seen every idempotency key and body, the store must call every
  message `post-processed` and Dovecot must show an empty INBOX and a full Archive; otherwise the run is reported
  as failed, without figures. CPU: the runtime's own (`/proc/PID/stat`, user + system) until the benchmark first
  sees a message in the store ("start-up CPU") and after that, scaled to all messages; hub + connector, Dovecot's
  process tree and PostgreSQL's over the whole run. The full run runs every configuration twice, interleaved,
  each time on a fresh mailbox and a fresh store, and the better run counts (load from elsewhere only ever slows a
  run down).
- **Baseline**: the mail adapter's own drain of the same message set through the same hub and connector into
  memory (`bench/mail_clients.py` `drain_poller`, the "tunnel" client of `bench/mail.py`, `SqliteState`), measured
  before the first run and after every round; the best drain is the denominator of every ratio.
- **IDLE flows**: a flows file with 200 IDLE flows (20 with `--quick`), each on its own empty folder of one
  Dovecot user, through the same tunnel, SQLite state; once the store shows a poll of every flow, VmRSS and the
  thread count of the `postbridge run` process (`/proc/PID/status`), and its CPU over a few idle seconds, against
  the same runtime with one IDLE flow.

`--profile auto` (default) samples the runtime process with py-spy (`pip install --target /tmp/py-spy py-spy`)
during one more run of the slowest configuration when an end-to-end ratio is below {{threshold}}; `always` and
`never` do what they say. `--keep` keeps the temporary folder (flows files, logs, stores).

{BEGIN}
{END}
"""


@dataclass
class FlowRun:
    """One `postbridge run` draining a mailbox into one target with one kind of state."""

    name: str  # e.g. "(a) directory, SQLite"
    messages: int = 0  # post-processed according to the store
    seconds: float | None = None  # start of the process -> last done_at
    steady_seconds: float | None = None  # first delivered_at -> last done_at
    startup_seconds: float | None = None  # start of the process -> first delivered_at
    startup_cpu: float | None = None  # CPU seconds of the runtime until its first message was in the store
    runtime_cpu: float | None = None  # CPU seconds of the runtime after that, scaled to all messages
    relay_cpu: float | None = None
    dovecot_cpu: float | None = None
    database_cpu: float | None = None  # PostgreSQL's process tree (None with SQLite)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.messages > 0

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.ok and self.seconds else None

    @property
    def steady_rate(self) -> float | None:
        return self.messages / self.steady_seconds if self.ok and self.steady_seconds else None

    def per_message_ms(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.messages else cpu / self.messages * 1e3


@dataclass
class IdleRun:
    """A `postbridge run` with ``flows`` IDLE flows, measured once every flow polled."""

    flows: int
    polled: int = 0
    seconds_to_poll: float | None = None  # start of the process -> every flow polled once
    rss_kib: int | None = None
    threads: int | None = None
    idle_cpu_percent: float | None = None  # of one core, over a few idle seconds
    relay_rss_kib: int | None = None  # hub + connector
    stop_seconds: float | None = None  # SIGTERM -> exit
    exit_code: int | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class RuntimeRun:
    quick: bool
    messages: int
    message_bytes: float
    per_poll: int
    baselines: list[Timed] = field(default_factory=list)
    runs: list[FlowRun] = field(default_factory=list)
    idle: list[IdleRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    load_start: str = ""
    load_end: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0

    @property
    def baseline(self) -> Timed | None:
        usable = [timed for timed in self.baselines if timed.messages and not timed.errors and not timed.stopped_by]
        return max(usable, key=lambda timed: timed.rate) if usable else None

    def ratio(self, rate: float | None) -> float | None:
        baseline = self.baseline
        return None if rate is None or baseline is None or not baseline.rate else rate / baseline.rate

    def kib_per_flow(self) -> float | None:
        measured = [run for run in self.idle if run.rss_kib is not None and not run.errors]
        if len(measured) < 2:
            return None
        low, high = min(measured, key=lambda run: run.flows), max(measured, key=lambda run: run.flows)
        if high.flows == low.flows or high.rss_kib is None or low.rss_kib is None:
            return None
        return (high.rss_kib - low.rss_kib) / (high.flows - low.flows)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _runs_table(run: RuntimeRun) -> list[str]:
    lines = [
        "| flow run | messages | seconds, start to done | messages/s | / baseline | seconds, first delivery to done "
        "| messages/s | / baseline | start-up s | start-up CPU s | runtime CPU ms/msg after start-up "
        "| hub + connector CPU ms/msg | Dovecot CPU ms/msg | PostgreSQL CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for flow in run.runs:
        if not flow.ok:
            lines.append(f"| {flow.name} | **failed** ({flow.messages:,} done) |" + " — |" * 12)
            continue
        lines.append(
            f"| {flow.name} | {flow.messages:,} | {fmt(flow.seconds, 2)} | {fmt(flow.rate)} | "
            f"{fmt(run.ratio(flow.rate), 2)} | {fmt(flow.steady_seconds, 2)} | {fmt(flow.steady_rate)} | "
            f"{fmt(run.ratio(flow.steady_rate), 2)} | {fmt(flow.startup_seconds, 2)} | {fmt(flow.startup_cpu, 2)} | "
            f"{fmt(flow.per_message_ms(flow.runtime_cpu), 3)} | {fmt(flow.per_message_ms(flow.relay_cpu), 3)} | "
            f"{fmt(flow.per_message_ms(flow.dovecot_cpu), 3)} | {fmt(flow.per_message_ms(flow.database_cpu), 3)} |"
        )
    return lines


def _baseline_lines(run: RuntimeRun) -> list[str]:
    rates = ", ".join(
        f"{timed.rate:,.0f}" if timed.messages and not timed.errors else "failed" for timed in run.baselines
    )
    best = run.baseline
    if best is None:
        return [f"Baseline (the mail adapter's drain through hub + connector into memory): **failed** ({rates})."]
    return [
        f"Baseline, the mail adapter's own drain through the same hub + connector into memory (`drain_poller`, "
        f"`SqliteState`): {best.messages:,} messages in {best.seconds:.2f} s = **{best.rate:,.0f} messages/s** "
        f"(drains before the first run and after every round: {rates} messages/s; the best is the denominator), "
        f"{fmt(best.per_message_ms(best.client_cpu), 3)} ms client CPU per message."
    ]


def _idle_table(run: RuntimeRun) -> list[str]:
    lines = [
        "| `postbridge run` with IDLE flows | flows that polled | seconds until all polled | VmRSS KiB | threads "
        "| CPU while idle, % of one core | hub + connector VmRSS KiB | stop (SIGTERM) s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for idle in run.idle:
        failed = " (**failed**)" if idle.errors else ""
        lines.append(
            f"| {idle.flows:,} flow{'s' if idle.flows != 1 else ''}{failed} | {idle.polled:,} | "
            f"{fmt(idle.seconds_to_poll, 1)} | {fmt(idle.rss_kib, 0)} | {fmt(idle.threads, 0)} | "
            f"{fmt(idle.idle_cpu_percent, 1)} | {fmt(idle.relay_rss_kib, 0)} | {fmt(idle.stop_seconds, 1)} |"
        )
    return lines


def meaning(run: RuntimeRun) -> str:
    """Two or three sentences on what the figures say (generated from them, so they stay true)."""
    sentences = []
    good = [flow for flow in run.runs if flow.ok]
    failed = [flow.name for flow in run.runs if not flow.ok]
    if good and run.baseline is not None:
        steady = [(run.ratio(flow.steady_rate) or 0.0, flow) for flow in good]
        low, high = min(steady, key=lambda item: item[0]), max(steady, key=lambda item: item[0])
        whole = [run.ratio(flow.rate) or 0.0 for flow in good]
        sentences.append(
            f"Once running, the runtime moved messages from the mailbox into a target at "
            f"{low[0]:.2f}-{high[0]:.2f} x the rate of the mail adapter's own drain into memory (slowest: "
            f"{low[1].name}; fastest: {high[1].name}); counting process start-up, {min(whole):.2f}-{max(whole):.2f} x "
            f"for {run.messages:,} messages."
        )
        by_state: dict[str, list[float]] = {}
        for flow in good:
            cpu = flow.per_message_ms(flow.runtime_cpu)
            if cpu is not None:
                by_state.setdefault("PostgreSQL" if "PostgreSQL" in flow.name else "SQLite", []).append(cpu)
        if by_state:
            parts = ", ".join(f"{name} {min(v):.2f}-{max(v):.2f} ms" for name, v in sorted(by_state.items()))
            sentences.append(
                f"The runtime process spends {parts} of CPU per message; the difference to the baseline's "
                f"{fmt(run.baseline.per_message_ms(run.baseline.client_cpu), 2)} ms is the message log (several "
                "durable writes per message) and the target."
            )
    if failed:
        sentences.append(f"Failed (see below): {', '.join(failed)}.")
    per_flow = run.kib_per_flow()
    if per_flow is not None:
        biggest = max(run.idle, key=lambda idle: idle.flows)
        sentences.append(
            f"An IDLE flow costs about {per_flow:,.0f} KiB of resident memory in the runtime "
            f"({biggest.flows:,} flows: {biggest.rss_kib or 0:,} KiB, {biggest.threads or 0:,} threads)."
        )
    return " ".join(sentences)


def render(run: RuntimeRun, versions: list[str]) -> str:
    """The generated section (without the markers)."""
    lines = [
        f"### Latest runtime results ({'quick smoke run' if run.quick else 'full run'})",
        "",
        f"Run on {run.started:%Y-%m-%d %H:%M} UTC, took {run.seconds:.0f} s; load average {run.load_start} at the "
        f"start, {run.load_end} at the end.",
        "",
        *machine(versions),
        "",
        f"{run.messages:,} messages of {run.message_bytes:,.0f} bytes on average per run, "
        f"`max_messages_per_poll = {run.per_poll}`, post-processing `archive`, all through hub + connector.",
        "",
        *_runs_table(run),
        "",
        *_baseline_lines(run),
        "",
    ]
    if run.idle:
        lines += [*_idle_table(run), ""]
        per_flow = run.kib_per_flow()
        if per_flow is not None:
            lines += [f"Memory per IDLE flow: **{per_flow:,.0f} KiB** of VmRSS (difference of the two rows).", ""]
    text = meaning(run)
    if text:
        lines += [f"**What it means:** {text}", ""]
    for flow in run.runs:
        lines += [f"- {flow.name}: **error**: {error}" for error in flow.errors[:5]]
        lines += [f"- {flow.name}: {note}" for note in flow.notes]
    for timed in run.baselines:
        lines += [f"- baseline: **error**: {error}" for error in timed.errors[:5]]
        if timed.stopped_by:
            lines.append(f"- baseline: stopped by the {timed.stopped_by} after {timed.messages:,} messages")
    for idle in run.idle:
        lines += [f"- {idle.flows} IDLE flows: **error**: {error}" for error in idle.errors[:5]]
    lines += [f"- {note}" for note in run.notes]
    for profile in run.profiles:
        lines += ["", profile]
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, section: str, threshold: float) -> None:
    """Replace the generated runtime section of ``path``; append the skeleton first when its markers are missing."""
    skeleton = SKELETON.replace("{threshold}", f"{threshold:g}")
    replace_section(path, section, begin=BEGIN, end=END, new_page="# Performance\n", appended="\n" + skeleton)
