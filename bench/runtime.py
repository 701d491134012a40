"""Runtime benchmark (issue 5): `postbridge run` end to end into directory and http targets, and IDLE flows' memory.

Usage::

    .venv/bin/python bench/runtime.py [--quick] [--out docs/performance.md] [--profile auto|always|never] [--keep]

Starts everything itself on 127.0.0.1: a throwaway PKI, a private Dovecot (its per-user connection limit raised for
the IDLE flows), a private PostgreSQL, a real hub and connector (``bench.mail_lab.hub_and_connector``) with a ``tcp``
mapping ``mail.corp.example:143`` -> Dovecot, and an HTTP sink in this process. Then, each on a fresh Dovecot user
filled with the mail benchmark's message set: the mail adapter's own drain through the tunnel into memory (the
baseline), four `postbridge run` child processes (directory and http target, each with SQLite and PostgreSQL state)
timed until the store calls every message post-processed, the baseline again after them (the full run repeats
the four runs and the baseline once more, interleaved; the best of each counts), and the memory of a runtime with
many IDLE flows against one with a single flow. It prints the Markdown results section; with ``--out`` it replaces the
runtime section of that page (``bench/runtime_report.py``). It exits 0 once the run finished, 1 only when it could
not run at all. With ``--profile`` (``auto``: when a run is far below the baseline) it samples the runtime process
with py-spy during one more run of the slowest configuration.

Owns: the order of the run, the sizes of ``--quick`` and full runs, the flows files, watching the store, the HTTP
sink, checking that every message really arrived exactly as sent, and the IDLE memory measurement. Must not: listen
or connect anywhere but 127.0.0.1, touch the system's Dovecot or PostgreSQL, reach into the runtime's internals (it
looks at the store, the target, the mailbox and /proc only), or run unbounded: every phase has a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on the path, where bench/profile.py would hide the standard library's
# `profile`: import from the repository root instead.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from tests.runtime_lab import binding_file, delivered, start_runtime  # noqa: E402
from tests.servers import LOOPBACK  # noqa: E402
from tests.servers.dovecot import Dovecot  # noqa: E402
from tests.servers.pki import make_test_pki  # noqa: E402
from tests.servers.postgres import Postgres, find_bin_directory  # noqa: E402

from bench import runtime_report as report  # noqa: E402
from bench.baselines import descendants  # noqa: E402
from bench.mail import SERVER_MISSING, verify  # noqa: E402
from bench.mail_clients import ARCHIVE, Timed, drain_poller  # noqa: E402
from bench.mail_lab import (  # noqa: E402
    PASSWORD,
    VIRTUAL,
    Lab,
    expected_digests,
    fill,
    hub_and_connector,
    mailbox_counts,
)
from bench.mail_report import program_version  # noqa: E402
from bench.measure import cpu_seconds, memory_kib  # noqa: E402
from bench.profile import Recorder, find_py_spy  # noqa: E402
from postbridge import __version__  # noqa: E402
from postbridge.mail.imap import open_session  # noqa: E402
from postbridge.mail.poller import PostProcessing, SenderSettings  # noqa: E402
from postbridge.runtime.store import MessageStatus, RuntimeStore, open_store  # noqa: E402
from postbridge.trust.truststore import TrustStore  # noqa: E402

FLOW = "drain"  # the flow of an end-to-end run
PROFILE_BELOW = 0.5  # --profile auto: profile when a run's rate after start-up is below this share of the baseline
LOOK = 0.2  # seconds between two looks at the store
IDLE_USER = "idler"
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    messages: int  # per end-to-end run and per baseline drain
    idle_flows: int
    run_limit: float  # seconds per end-to-end run or baseline drain
    idle_limit: float  # seconds until every IDLE flow polled once
    idle_cpu_window: float  # seconds over which the idle runtime's CPU is measured
    rounds: int  # every configuration runs this often (interleaved, fresh mailboxes); its best run counts


QUICK = Sizes(200, 20, 60.0, 60.0, 3.0, 1)
FULL = Sizes(2_000, 200, 300.0, 180.0, 10.0, 2)


@dataclass(frozen=True)
class Spec:
    """One end-to-end configuration."""

    name: str
    slug: str
    target: str  # "directory" | "http"
    state: str  # "sqlite" | "postgresql"


SPECS = (
    Spec("(a-i) directory target, SQLite state", "directory-sqlite", "directory", "sqlite"),
    Spec("(a-ii) directory target, PostgreSQL state", "directory-postgresql", "directory", "postgresql"),
    Spec("(b-i) http target, SQLite state", "http-sqlite", "http", "sqlite"),
    Spec("(b-ii) http target, PostgreSQL state", "http-postgresql", "http", "postgresql"),
)


def say(text: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _STARTED:6.1f} s] {text}\n")
    sys.stderr.flush()


# -- the HTTP sink ------------------------------------------------------------------------------------------------


class Sink:
    """An HTTP target for the runtime: answers every POST with 201 (keep-alive) and counts it by key and body."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.keys: Counter[str] = Counter()  # Idempotency-Key -> requests
        self.digests: Counter[str] = Counter()  # sha256 of each body
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as any real endpoint offers

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.count(self.headers.get("Idempotency-Key", ""), body)
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http sink", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/mail"

    def count(self, key: str, body: bytes) -> None:
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            self.requests += 1
            self.keys[key] += 1
            self.digests[digest] += 1

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.keys.clear()
            self.digests.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- flows files --------------------------------------------------------------------------------------------------


def runtime_table(state: str) -> str:
    return f'[runtime]\nstate = "{state}"\nmetrics = ""\n'


def flow_table(
    name: str,
    user: str,
    folder: str,
    target: str,
    *,
    binding: Path,
    keystore: Path,
    per_poll: int,
    mode: str = "poll",
    interval: float = 1.0,
    post_processing: str = "archive",
) -> str:
    """One [[flow]] through hub + connector (the shape of `postbridge flows example`)."""
    return f"""
[[flow]]
name = "{name}"
protocol = "imap"
mode = "{mode}"
interval = {interval:g}

[flow.sender]
address = "{VIRTUAL}"
proxy = "on-premise"
location_id = "dc1"
binding = "{binding}"
protection = "starttls-mandatory"
keystore = "{keystore}"
user = "{user}"
password = "{PASSWORD}"
folder = "{folder}"
post_processing = "{post_processing}"
archive_folder = "{ARCHIVE}"
max_messages_per_poll = {per_poll}

[flow.target]
{target}"""


# -- the bench ----------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    folder: Path
    lab: Lab
    sizes: Sizes
    args: argparse.Namespace
    binding: Path
    sink: Sink
    postgres: Postgres | None = None
    postgres_problem: str = ""

    def refill(self, user: str) -> None:
        seconds = fill(self.lab, user, self.sizes.messages)
        say(f"{user}: {self.sizes.messages:,} messages delivered and indexed in {seconds:.1f} s")

    def flow(
        self, name: str, user: str, folder: str, target: str, *, mode: str = "poll", interval: float = 1.0,
        post_processing: str = "archive",
    ) -> str:  # fmt: skip
        return flow_table(name, user, folder, target, binding=self.binding, keystore=self.lab.keystore,
                          per_poll=self.args.per_poll, mode=mode, interval=interval,
                          post_processing=post_processing)  # fmt: skip

    def database_cpu(self) -> float | None:
        """CPU seconds of PostgreSQL's whole process tree so far (None without PostgreSQL)."""
        if self.postgres is None or self.postgres.folder is None:
            return None
        pid_file = self.postgres.folder / "data" / "postmaster.pid"
        try:
            master = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return cpu_seconds(descendants(master))


def stop_runtime(process: subprocess.Popen[bytes], limit: float = 60.0) -> tuple[float, int]:
    """SIGTERM, wait (SIGKILL after ``limit``); returns (seconds it took, exit code)."""
    began = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return time.monotonic() - began, process.returncode


def log_tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# -- the baseline -------------------------------------------------------------------------------------------------


def measure_baseline(bench: Bench, user: str, expected: Counter[str]) -> Timed:
    """The mail adapter's own drain through hub + connector into memory (bench/mail.py's "tunnel" client)."""
    lab, count = bench.lab, bench.sizes.messages
    bench.refill(user)
    settings = SenderSettings(
        post_processing=PostProcessing.ARCHIVE, archive_folder=ARCHIVE, max_messages_per_poll=bench.args.per_poll
    )
    relay_before, dovecot_before = cpu_seconds(lab.relay_pids()), lab.dovecot_cpu()
    result = drain_poller("baseline", lab.tunnel_channel(user), settings, bench.folder / "state" / f"{user}.sqlite3",
                          count=count, time_limit=bench.sizes.run_limit)  # fmt: skip
    time.sleep(0.3)  # let Dovecot reap the session's processes
    result.relay_cpu = cpu_seconds(lab.relay_pids()) - relay_before
    result.server_cpu = lab.dovecot_cpu() - dovecot_before
    problem = verify(lab, result, user, expected, count)
    if problem:
        result.errors.append(f"check after the run: {problem}")
    say(f"baseline: {result.messages:,} messages in {result.seconds:.2f} s = {result.rate:,.0f}/s"
        + (f" — {'; '.join(result.errors)}" if result.errors else ""))  # fmt: skip
    return result


# -- one end-to-end run -------------------------------------------------------------------------------------------


@dataclass
class _Watch:
    """What the watcher saw: the CPU of the runtime when its first message appeared in the store, and how many."""

    error: str = ""
    first_cpu: float | None = None
    first_rows: int = 0
    end_cpu: float | None = None


def _watch(observer: RuntimeStore, process: subprocess.Popen[bytes], count: int, limit: float) -> _Watch:
    """Look at the store every LOOK s until every message is post-processed, the runtime exits, or time is up."""
    seen = _Watch()
    deadline = time.monotonic() + limit
    while True:
        counts = observer.counts(FLOW)
        rows = sum(counts.values())
        if rows and seen.first_cpu is None:
            seen.first_cpu, seen.first_rows = cpu_seconds([process.pid]), rows
        if counts[MessageStatus.POST_PROCESSED] >= count:
            seen.end_cpu = cpu_seconds([process.pid])
            return seen
        if process.poll() is not None:
            seen.error = f"postbridge run exited with code {process.returncode}"
            return seen
        if time.monotonic() > deadline:
            shown = ", ".join(f"{status.value} {number}" for status, number in counts.items() if number)
            seen.error = f"time limit of {limit:.0f} s reached with {shown or 'nothing in the store'}"
            return seen
        time.sleep(LOOK)


def _check_directory(out: Path, count: int, expected: Counter[str]) -> list[str]:
    problems = []
    files = list(out.glob("*.eml")) if out.is_dir() else []
    digests = Counter(hashlib.sha256(path.read_bytes()).hexdigest() for path in files)
    found = delivered(out)
    wanted = {f"<bench-{index}@corp.example>" for index in range(count)}
    if len(files) != count:
        problems.append(f"{len(files)} .eml files for {count} messages")
    if found.message_ids != wanted:
        problems.append(
            f"{len(wanted - found.message_ids)} Message-ID(s) missing, {len(found.message_ids - wanted)} unexpected"
        )
    if digests != expected:
        problems.append(f"{sum((expected - digests).values())} message(s) missing or changed in the .eml files")
    doubled = sum(1 for number in found.deliveries.values() if number != 1)
    if doubled:
        problems.append(f"{doubled} message(s) delivered more than once (.json deliveries)")
    return problems


def _check_sink(sink: Sink, count: int, expected: Counter[str]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the sink's counts."""
    with sink.lock:
        keys, digests, requests = len(sink.keys), Counter(sink.digests), sink.requests
    problems, notes = [], []
    if keys != count:
        problems.append(f"the sink saw {keys} distinct Idempotency-Key headers for {count} messages")
    if set(digests) != set(expected):
        problems.append(f"{len(set(expected) - set(digests))} message bodies never reached the sink")
    if requests != keys:
        notes.append(f"{requests - keys} repeated request(s) (same idempotency key)")
    return problems, notes


def measure_flow(
    bench: Bench, spec: Spec, user: str, expected: Counter[str], *, profile: bool = False
) -> report.FlowRun:
    """One `postbridge run` draining ``user``'s INBOX into the spec's target with the spec's state."""
    result = report.FlowRun(spec.name)
    lab, count, sink = bench.lab, bench.sizes.messages, bench.sink
    work = bench.folder / user
    work.mkdir()
    if spec.state == "postgresql":
        if bench.postgres is None:
            result.errors.append(f"PostgreSQL did not start: {bench.postgres_problem}")
            return result
        state = bench.postgres.new_database()
    else:
        state = f"sqlite:///{work / 'runtime.db'}"
    out = work / "out"
    target = f'kind = "directory"\npath = "{out}"\n'
    if spec.target == "http":
        target = f'kind = "http"\nurl = "{sink.url}"\nformat = "raw"\n'
    flows = work / "flows.toml"
    flows.write_text(runtime_table(state) + bench.flow(FLOW, user, "INBOX", target))
    bench.refill(user)
    observer = open_store(state, home=work / "home")  # creates the schema before the clock starts
    sink.reset()
    relay_before, dovecot_before, database_before = (
        cpu_seconds(lab.relay_pids()),
        lab.dovecot_cpu(),
        bench.database_cpu(),
    )
    log = work / "runtime.log"
    started = time.time()
    process = start_runtime(work / "home", flows, log)
    recorder = None
    try:
        if profile:
            recorder = _start_recorder(bench, process.pid, work)
        seen = _watch(observer, process, count, bench.sizes.run_limit)
        result.relay_cpu = cpu_seconds(lab.relay_pids()) - relay_before
        result.dovecot_cpu = lab.dovecot_cpu() - dovecot_before
        database_after = bench.database_cpu()
        if database_before is not None and database_after is not None and spec.state == "postgresql":
            result.database_cpu = database_after - database_before
    finally:
        _, code = stop_runtime(process)
    if recorder is not None:
        result.notes.append(recorder.summary())
    if seen.error:
        result.errors.append(f"{seen.error}; runtime log: {log_tail(log)}")
    elif code != 0:
        result.notes.append(f"postbridge run exited with code {code} after SIGTERM: {log_tail(log)}")
    records = observer.list(flow=FLOW, limit=2 * count + 100)
    observer.close()
    done = [r for r in records if r.status is MessageStatus.POST_PROCESSED]
    result.messages = len(done)
    if len(records) != count or len(done) != count:
        statuses = Counter(r.status.value for r in records)
        result.errors.append(f"the store holds {dict(statuses)} for {count} messages")
    delivered_at = [r.delivered_at for r in done if r.delivered_at is not None]
    done_at = [r.done_at for r in done if r.done_at is not None]
    if delivered_at and done_at:
        result.seconds = max(done_at) - started
        result.steady_seconds = max(done_at) - min(delivered_at)
        result.startup_seconds = min(delivered_at) - started
    if seen.first_cpu is not None and seen.end_cpu is not None and count > seen.first_rows:
        result.startup_cpu = seen.first_cpu
        result.runtime_cpu = (seen.end_cpu - seen.first_cpu) * count / (count - seen.first_rows)
    if spec.target == "directory":
        result.errors += _check_directory(out, count, expected)
    else:
        problems, notes = _check_sink(sink, count, expected)
        result.errors += problems
        result.notes += notes
    inbox, archive = mailbox_counts(lab, user)
    if (inbox, archive) != (0, count):
        result.errors.append(f"Dovecot shows {inbox} in INBOX and {archive} in {ARCHIVE} (expected 0 and {count})")
    rate = f"{result.rate:,.0f}/s, {result.steady_rate:,.0f}/s after start-up" if result.ok else "FAILED"
    say(
        f"{spec.name}: {result.messages:,} messages, {rate}"
        + (f" — {'; '.join(result.errors)}" if result.errors else "")
    )
    return result


def best_of(spec: Spec, runs: list[report.FlowRun], result: report.RuntimeRun) -> report.FlowRun:
    """The run with the best rate after start-up; a failure in any other run stays visible in its errors."""
    best = max(runs, key=lambda run: run.steady_rate or 0.0)
    for other in runs:
        if other is not best:
            best.errors += [f"another run: {error}" for error in other.errors]
    if len(runs) > 1:
        rates = ", ".join(report.fmt(run.steady_rate, 0) if run.ok else "failed" for run in runs)
        result.notes.append(f"{spec.name}: {len(runs)} runs, {rates} messages/s after start-up; the best counts")
    return best


# -- profiles -----------------------------------------------------------------------------------------------------


def _start_recorder(bench: Bench, pid: int, work: Path) -> Recorder | None:
    py_spy = find_py_spy()
    if py_spy is None:
        return None
    return Recorder(py_spy, {"postbridge run": pid}, bench.args.profile_seconds, work / "py-spy")


def profile_slowest(bench: Bench, run: report.RuntimeRun, expected: Counter[str]) -> str:
    """py-spy on the runtime process during one more run of the configuration with the lowest rate."""
    if find_py_spy() is None:
        return "py-spy not found (pip install --target /tmp/py-spy py-spy, or set PY_SPY): no profile taken."
    candidates = [(flow.steady_rate or 0.0, spec) for flow, spec in zip(run.runs, SPECS, strict=False) if flow.ok]
    if not candidates:
        return "no successful run to profile."
    _, spec = min(candidates, key=lambda item: item[0])
    say(f"profiling {spec.name} with py-spy for {bench.args.profile_seconds:.0f} s")
    profiled = measure_flow(bench, spec, "profile", expected, profile=True)
    heading = (
        f"#### Profile of `postbridge run` (py-spy, all threads) during {spec.name}, "
        f"{profiled.messages:,} messages, {report.fmt(profiled.rate)} messages/s under the profiler"
    )
    summary = profiled.notes.pop(0) if profiled.notes else "no profile written"
    return heading + "\n\n" + summary


# -- IDLE flows ---------------------------------------------------------------------------------------------------


def idle_folders(count: int) -> list[str]:
    return [f"idle{index:03d}" for index in range(count)]


def create_idle_folders(bench: Bench, count: int) -> None:
    with open_session(bench.lab.direct_channel(IDLE_USER)) as session:
        for folder in idle_folders(count):
            session.create_folder(folder)


def _threads(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_idle(bench: Bench, flows: int) -> report.IdleRun:
    """A runtime with ``flows`` IDLE flows (one empty folder each): memory and threads once every flow polled."""
    result = report.IdleRun(flows)
    work = bench.folder / f"idle-{flows}"
    work.mkdir()
    state = f"sqlite:///{work / 'runtime.db'}"
    target = f'kind = "directory"\npath = "{work / "out"}"\n'
    text = runtime_table(state) + "".join(
        bench.flow(folder, IDLE_USER, folder, target, mode="idle", interval=60.0, post_processing="mark-read")
        for folder in idle_folders(flows)
    )
    (work / "flows.toml").write_text(text)
    observer = open_store(state, home=work / "home")
    log = work / "runtime.log"
    started = time.monotonic()
    process = start_runtime(work / "home", work / "flows.toml", log)
    try:
        deadline = started + bench.sizes.idle_limit
        while True:
            result.polled = sum(1 for health in observer.health() if health.polls >= 1)
            if result.polled >= flows:
                result.seconds_to_poll = time.monotonic() - started
                break
            if process.poll() is not None:
                result.errors.append(f"postbridge run exited with code {process.returncode}: {log_tail(log)}")
                break
            if time.monotonic() > deadline:
                result.errors.append(
                    f"only {result.polled} of {flows} flows polled within {bench.sizes.idle_limit:.0f} s: "
                    f"{log_tail(log)}"
                )
                break
            time.sleep(LOOK)
        if not result.errors:
            time.sleep(2.0)  # let the last sessions settle into IDLE
            result.rss_kib = memory_kib([process.pid])
            result.threads = _threads(process.pid)
            result.relay_rss_kib = memory_kib(bench.lab.relay_pids())
            before = cpu_seconds([process.pid])
            time.sleep(bench.sizes.idle_cpu_window)
            result.idle_cpu_percent = (cpu_seconds([process.pid]) - before) / bench.sizes.idle_cpu_window * 100
    finally:
        result.stop_seconds, result.exit_code = stop_runtime(process)
        observer.close()
    if result.exit_code != 0 and not result.errors:
        result.errors.append(f"postbridge run exited with code {result.exit_code} after SIGTERM: {log_tail(log)}")
    say(
        f"{flows} IDLE flow(s): {result.polled} polled in {report.fmt(result.seconds_to_poll)} s, VmRSS "
        f"{result.rss_kib} KiB, {result.threads} threads, {report.fmt(result.idle_cpu_percent)} % CPU idle, "
        f"stopped in {result.stop_seconds:.1f} s" + (f" — {'; '.join(result.errors)}" if result.errors else "")
    )
    return result


# -- the run ------------------------------------------------------------------------------------------------------


def _start_postgres(bench: Bench, exits: contextlib.ExitStack) -> None:
    try:
        bench.postgres = exits.enter_context(Postgres())
        say(f"PostgreSQL on {LOOPBACK}:{bench.postgres.port}")
    except (RuntimeError, OSError, psycopg.Error, *SERVER_MISSING) as exc:
        bench.postgres_problem = str(exc)[:300]
        say(f"PostgreSQL did not start: {exc}")


def run(args: argparse.Namespace, folder: Path) -> report.RuntimeRun:
    sizes = QUICK if args.quick else FULL
    expected, mean_size = expected_digests(sizes.messages)
    result = report.RuntimeRun(args.quick, sizes.messages, mean_size, args.per_poll, load_start=_loadavg())
    result.notes.append(
        f"state files and the directory target on {_filesystem(folder)}; SQLite WAL with synchronous=FULL, "
        "PostgreSQL with fsync and synchronous_commit on; the observing store was opened (creating the schema) "
        "before each runtime started"
    )
    pki = make_test_pki(folder / "pki")
    store = TrustStore(folder / "keystore")
    store.add(pki.root_pem.read_bytes(), alias="test-root")
    rounds = range(1, sizes.rounds + 1)
    users = [
        *(f"baseline{n}" for n in range(sizes.rounds + 1)),
        *(f"{spec.slug}-{n}" for spec in SPECS for n in rounds),
    ]
    users += ["profile", IDLE_USER]
    with contextlib.ExitStack() as exits:
        connections = sizes.idle_flows + 20  # every IDLE flow holds a session of the same user
        dovecot = exits.enter_context(
            Dovecot(pki=pki, users=dict.fromkeys(users, PASSWORD), lmtp=None, connections_per_user=connections)
        )
        lab = Lab(folder, dovecot, store.directory, pki.root_pem)
        say(f"Dovecot on {dovecot.host}:{dovecot.imap_port}; starting hub and connector")
        lab.stack = exits.enter_context(hub_and_connector(folder / "postbridge", dovecot, args.log_level))
        sink = Sink()
        exits.callback(sink.close)
        bench = Bench(folder, lab, sizes, args, binding_file(lab.stack, folder / "binding.json"), sink)
        _start_postgres(bench, exits)
        result.baselines.append(measure_baseline(bench, "baseline0", expected))
        attempts: dict[Spec, list[report.FlowRun]] = {}
        for round_number in rounds:  # interleaved, so load from elsewhere hits every configuration alike
            for spec in SPECS:
                user = f"{spec.slug}-{round_number}"
                attempts.setdefault(spec, []).append(measure_flow(bench, spec, user, expected))
            result.baselines.append(measure_baseline(bench, f"baseline{round_number}", expected))
        result.runs = [best_of(spec, runs, result) for spec, runs in attempts.items()]
        create_idle_folders(bench, sizes.idle_flows)
        for flows in (1, sizes.idle_flows):
            result.idle.append(measure_idle(bench, flows))
        ratios = [result.ratio(flow.steady_rate) for flow in result.runs]
        slow = any(ratio is not None and ratio < PROFILE_BELOW for ratio in ratios)
        if args.profile == "always" or (args.profile == "auto" and slow):
            result.profiles.append(profile_slowest(bench, result, expected))
    result.load_end = _loadavg()
    return result


def versions() -> list[str]:
    try:
        postgres = program_version(str(find_bin_directory() / "postgres"), "--version")
    except SERVER_MISSING:
        postgres = "not found"
    return [
        f"postbridge {__version__}; Dovecot {program_version('/usr/sbin/dovecot', '--version')}; {postgres}",
        f"SQLite {sqlite3.sqlite_version}, psycopg {psycopg.__version__}, httpx {httpx.__version__}",
    ]


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _filesystem(folder: Path) -> str:
    try:
        done = subprocess.run(["df", "--output=fstype", str(folder)], capture_output=True, text=True, timeout=10)
    except OSError:
        return "an unknown file system"
    return (done.stdout.split() or ["", "an unknown file system"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="200 messages per run, 20 IDLE flows: about a minute")
    parser.add_argument("--out", type=Path, help="Markdown page whose runtime results section is replaced")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--profile-seconds", type=float, default=15.0, help="py-spy sampling time (default 15)")
    parser.add_argument("--log-level", default="info", help="log level of the hub and connector (default info)")
    parser.add_argument("--per-poll", type=int, default=1000, help="max_messages_per_poll of runtime and baseline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (flows files, logs, stores)")
    args = parser.parse_args(argv)
    # Dovecot's unprivileged processes must reach the folder: a world-traversable one in the system temp dir
    folder = Path(tempfile.mkdtemp(prefix="postbridge-runtimebench-"))
    folder.chmod(0o755)
    started = time.monotonic()
    try:
        result = run(args, folder)
    except (RuntimeError, OSError, AssertionError, subprocess.SubprocessError, *SERVER_MISSING) as exc:
        say(f"the benchmark could not run: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"files kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    result.seconds = time.monotonic() - started
    section = report.render(result, versions())
    sys.stdout.write(section)
    if args.out:
        report.write(args.out, section, PROFILE_BELOW)
        say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
