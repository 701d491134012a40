"""Turns one benchmark run into Markdown and puts it into ``docs/performance.md``.

Owns: the results table (figures per route, postbridge's ratio against each baseline, the targets and whether they
were met), the machine description, and the rule for updating the document: only the part between
:data:`BEGIN` and :data:`END` is replaced, so the hand-written "how to run" part stays as it is. When the file
does not exist yet it is created with :data:`SKELETON`. Must not: measure anything.
"""

from __future__ import annotations

import math
import os
import platform
import re
import ssl
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h2

from bench.measure import Concurrency, Latency, Throughput
from bench.sections import replace_section

BEGIN = "<!-- bench/tunnel.py results: begin (generated, replaced on every run) -->"
END = "<!-- bench/tunnel.py results: end -->"
TUNNEL = "postbridge"

SKELETON = f"""# Performance

## How to run the tunnel benchmark

```sh
scripts/setup-dev                                   # once: venv, socat, OpenSSH
.venv/bin/python bench/tunnel.py --quick            # smoke test, under a minute, prints the table
.venv/bin/python bench/tunnel.py --out docs/performance.md   # full run (about 5-10 minutes), updates this page
```

Everything runs on 127.0.0.1 in one run, so the routes share the machine under the same conditions:

- **internal host**: `bench/loopback_server.py`, an asyncio server in its own process that greets first (like a
  mail server), then sends (`R`), swallows (`S`) or echoes (`E`) bytes;
- **direct TCP**: the client connects to it straight;
- **socat**: `socat TCP-LISTEN:p,fork,reuseaddr TCP:127.0.0.1:server` (one forked process per connection);
- **ssh -R**: a private `sshd` started by the benchmark (generated keys, 127.0.0.1 only) and
  `ssh -N -R 127.0.0.1:PORT:127.0.0.1:SERVER` to it; the cipher OpenSSH negotiated is reported;
- **postbridge**: a real `postbridge cloud serve` and `postbridge connector run` (separate processes and home
  folders, log level `info`), a `tcp` mapping to the internal host, clients through the hub's SOCKS5 port
  (username/password authentication, one SOCKS5 handshake per connection).

What is measured (the benchmark process is the client; every loop has a count and a time limit):

- **throughput**: one stream and 8 parallel streams, download (server -> client) and upload, MB/s = 10^6 B/s; a
  full run repeats each transfer 3 times and keeps the best (load from elsewhere only ever slows a run down);
- **open latency**: connections opened one after another, from `connect()` until the server's first greeting byte
  arrived (through SOCKS5 for postbridge); *added* latency is the route's percentile minus direct TCP's;
- **concurrent streams**: idle streams opened one after another up to the attempt count (RLIMIT_NOFILE raised to its
  hard limit), then every one proven alive with a one-byte echo;
- **CPU**: user + system time of the route's own processes (`/proc/PID/stat`, forked children included) per 10^9
  bytes moved and per connection opened; of all figures, the one least disturbed by other load on the machine;
- **memory per idle stream**: the growth of the route's processes while the streams are held, divided by the
  streams alive: `VmRSS` of hub + connector (and of ssh + the sshd session), `Pss` summed over socat's forked
  children (VmRSS would count their shared pages once per process).

`--keep` keeps the temporary folder (hub and connector logs, sshd logs, py-spy profiles); `--profile always`
samples the hub and connector with py-spy (`pip install --target /tmp/py-spy py-spy`; not a project dependency)
during a one-stream download, `auto` (the default) does so when a target is missed.

Targets (issue, 2-core machine): one stream >= 150 MB/s (both directions), added open latency p50 <= 2 ms and
p99 <= 10 ms, >= 5,000 concurrent streams, <= 32 KiB per idle stream. The benchmark reports whether they are met;
it never fails a build.

{BEGIN}
{END}
"""


@dataclass
class RouteResult:
    name: str
    throughput: dict[tuple[int, str], Throughput] = field(default_factory=dict)
    latency: Latency | None = None
    concurrency: Concurrency | None = None
    note: str = ""


@dataclass
class Run:
    quick: bool
    results: dict[str, RouteResult]
    skipped: dict[str, str]  # route name -> why it could not run
    notes: list[str]
    profile: str = ""
    load_start: str = ""
    load_end: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0


@dataclass(frozen=True)
class Target:
    label: str
    met: bool | None  # None: not measured
    value: str


def _mib(kib: int | None) -> str:
    return "—" if kib is None else f"{kib / 1024:,.1f}"


def _ms(seconds: float) -> float:
    return seconds * 1000


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(tunnel: float | None, base: float | None) -> str:
    if tunnel is None or base is None or math.isnan(tunnel) or math.isnan(base) or base == 0:
        return "—"
    return f"{tunnel / base:.2f}×"


def figures(result: RouteResult, direct: RouteResult | None) -> dict[str, float | None]:
    """Named figures of one route (None where not measured)."""
    out: dict[str, float | None] = {}
    for streams in (1, 8):
        for direction in ("down", "up"):
            t = result.throughput.get((streams, direction))
            out[f"{streams} stream{'s' if streams > 1 else ''} {direction}, MB/s"] = t.mb_per_s if t else None
    lat = result.latency
    base = direct.latency if direct else None
    for p in (50, 99):
        out[f"open p{p}, ms"] = _ms(lat.percentile(p)) if lat else None
    for p in (50, 99):
        added = _ms(lat.percentile(p) - base.percentile(p)) if lat and base and result is not direct else None
        out[f"added open p{p}, ms"] = added
    for direction in ("down", "up"):
        t = result.throughput.get((1, direction))
        out[f"CPU s per GB, 1 stream {direction}"] = t.cpu_per_gb if t else None
    out["CPU ms per open"] = lat.cpu_ms_per_open if lat else None
    conc = result.concurrency
    out["idle streams held"] = float(conc.alive) if conc else None
    out["KiB per idle stream"] = conc.kib_per_stream if conc else None
    return out


def _comparable(run: Run, key: str, baseline: str) -> bool:
    """Held-stream counts compare only when both routes were asked for as many."""
    if key != "idle streams held":
        return True
    ours, theirs = run.results[TUNNEL].concurrency, run.results[baseline].concurrency
    return ours is not None and theirs is not None and ours.tried == theirs.tried


def targets(run: Run) -> list[Target]:
    tunnel = run.results.get(TUNNEL)
    if tunnel is None:
        return []
    f = figures(tunnel, run.results.get("direct TCP"))

    def check(label: str, value: float | None, ok: bool, text: str) -> Target:
        return Target(label, None if value is None else ok, text if value is not None else "not measured")

    single = [v for k, v in f.items() if k.startswith("1 stream ") and v is not None]
    low = min(single) if single else None
    p50, p99 = f["added open p50, ms"], f["added open p99, ms"]
    per = f["KiB per idle stream"]
    return [
        check("one stream >= 150 MB/s (slower direction)", low, (low or 0) >= 150, f"{_fmt(low)} MB/s"),
        check("added open latency p50 <= 2 ms", p50, (p50 or 0) <= 2, f"{_fmt(p50, 2)} ms"),
        check("added open latency p99 <= 10 ms", p99, (p99 or 0) <= 10, f"{_fmt(p99, 2)} ms"),
        _streams_target(tunnel.concurrency),
        check("<= 32 KiB per idle stream", per, per is not None and per <= 32, f"{_fmt(per)} KiB"),
    ]


def _streams_target(conc: Concurrency | None) -> Target:
    label = ">= 5,000 concurrent streams"
    if conc is None:
        return Target(label, None, "not measured")
    if conc.alive < conc.tried or conc.tried >= 5000:
        return Target(label, conc.alive >= 5000, f"{conc.alive:,} of {conc.tried:,} tried")
    return Target(label, None, f"{conc.alive:,} of {conc.tried:,} tried (this run tried too few to tell)")


def machine() -> list[str]:
    """The machine and the versions of everything measured, one Markdown bullet each."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ssh = _first_line("ssh", "-V")
    socat = re.search(r"socat version (\S+)", _first_line("socat", "-V", all_lines=True))
    return [
        f"- CPU: `nproc` = {len(os.sched_getaffinity(0))}, {cpu}; memory {_mem_total_gib():.0f} GiB; "
        f"Linux {platform.release()}",
        f"- Python {platform.python_version()}, h2 {h2.__version__}, {ssl.OPENSSL_VERSION}",
        f"- {ssh}; socat {socat.group(1) if socat else 'not found'}",
    ]


def _first_line(*command: str, all_lines: bool = False) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return f"{command[0]} not found"
    text = (done.stdout + done.stderr).strip()
    return text if all_lines else (text.splitlines() or ["?"])[0]


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def render(run: Run) -> str:
    """The generated results section (without the markers)."""
    order = [name for name in ("direct TCP", "socat", "ssh -R", TUNNEL) if name in run.results]
    direct = run.results.get("direct TCP")
    table = {name: figures(run.results[name], direct) for name in order}
    baselines = [name for name in order if name != TUNNEL]
    lines = [
        f"## Latest results ({'quick smoke run' if run.quick else 'full run'})",
        "",
        f"Run on {run.started:%Y-%m-%d %H:%M} UTC, took {run.seconds:.0f} s; load average {run.load_start} at "
        f"the start, {run.load_end} at the end (other work on the machine slows every route; the CPU rows are "
        "the least affected).",
        "",
        *machine(),
        "",
    ]
    header = ["measure", *order] + [f"{TUNNEL} vs {b}" for b in baselines if TUNNEL in table]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = next(iter(table.values())).keys() if table else []
    for key in keys:
        digits = 2 if key.endswith("ms") or key.startswith("CPU") else (0 if "held" in key else 1)
        row = [key] + [_fmt(table[name][key], digits) for name in order]
        if TUNNEL in table:
            row += [_ratio(table[TUNNEL][key], table[b][key]) if _comparable(run, key, b) else "—" for b in baselines]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Ratios are postbridge's figure divided by the baseline's (throughput: higher is better; latency "
        "and memory: lower is better).",
        "",
    ]
    for name in order:
        result = run.results[name]
        conc = result.concurrency
        if conc is not None:
            stop = f"; stopped: {conc.stopped_by}" if conc.stopped_by else ""
            text = f"- {name}: {conc.alive:,} of {conc.tried:,} idle streams alive ({conc.opened:,} opened in "
            text += f"{conc.seconds:.1f} s, {conc.first_rate:,.0f}/s at first, {conc.last_rate:,.0f}/s at last{stop})"
            if conc.memory_before_kib is not None:
                text += (
                    f"; memory {_mib(conc.memory_before_kib)} MiB before, {_mib(conc.memory_held_kib)} MiB held, "
                    f"{_mib(conc.memory_after_close_kib)} MiB after closing them"
                )
            lines.append(text)
        if result.latency is not None and result.latency.failures:
            lines.append(f"- {name}: {result.latency.failures} connection(s) failed during the latency test")
        if result.note:
            lines.append(f"- {name}: {result.note}")
    for name, why in run.skipped.items():
        lines.append(f"- {name}: not measured — {why}")
    lines += [f"- {note}" for note in run.notes]
    checks = targets(run)
    if checks:
        lines += ["", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in checks:
            mark = "not measured" if t.met is None else ("yes" if t.met else "**no**")
            lines.append(f"| {t.label} | {t.value} | {mark} |")
    if run.profile:
        lines += ["", "### Profile (py-spy, during a one-stream download)", "", run.profile]
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, section: str) -> None:
    """Replace the generated section of ``path`` (create the page from the skeleton when it is missing)."""
    replace_section(path, section, begin=BEGIN, end=END, new_page=SKELETON, appended=f"\n\n{BEGIN}\n{END}\n")
