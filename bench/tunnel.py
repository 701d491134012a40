"""Tunnel benchmark: postbridge's SOCKS5 -> HTTP/2-over-TLS tunnel against direct TCP, socat and ``ssh -R``.

Usage::

    .venv/bin/python bench/tunnel.py [--quick] [--out docs/performance.md] [--profile auto|always|never]

Starts everything itself on 127.0.0.1 (the loopback server, socat, a private sshd with ``ssh -R``, a real hub and
connector through ``tests.harness.Stack``), measures each route with ``bench/measure.py`` and prints the Markdown
results section; with ``--out`` it also replaces that section in the given page. It reports which targets are met
and always exits 0 once the run finished (exit 1 only when it could not run at all). With ``--profile`` (``auto``:
when a target is missed and py-spy is found) it samples the hub and connector during a one-stream download.

Owns: the order of the run, the sizes of ``--quick`` and full runs, and the postbridge route. Must not: listen or
connect anywhere but 127.0.0.1, or run unbounded: every phase has a count and a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(ROOT))

from bench import measure, report  # noqa: E402
from bench.baselines import LOOPBACK, Socat, SshRemoteForward, Unavailable  # noqa: E402
from bench.loopback_server import raise_fd_limit  # noqa: E402
from bench.measure import Route  # noqa: E402
from bench.profile import Recorder, find_py_spy  # noqa: E402

VIRTUAL = ("mail.bench.example", 25)
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    single: int  # bytes per one-stream transfer
    multi: int  # bytes per stream of the 8-stream transfer
    transfer_limit: float  # seconds per transfer
    latency_count: int
    latency_warmup: int
    latency_limit: float
    idle: int  # idle streams to try (postbridge, ssh -R, direct)
    idle_socat: int  # socat forks one process per connection: fewer
    idle_limit: float
    profile_seconds: float
    repeats: int  # each transfer runs this often; the best run counts (others' load only ever slows it down)


QUICK = Sizes(64 << 20, 16 << 20, 4.0, 200, 20, 10.0, 500, 100, 30.0, 3.0, 1)
FULL = Sizes(512 << 20, 128 << 20, 10.0, 2000, 100, 90.0, 6000, 1000, 240.0, 8.0, 3)


def say(text: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _STARTED:6.1f} s] {text}\n")
    sys.stderr.flush()


def tcp_route(name: str, port: int) -> Route:
    return Route(name, lambda: socket.create_connection((LOOPBACK, port), timeout=30))


@contextlib.contextmanager
def loopback_server() -> Iterator[tuple[int, int]]:
    """The internal host in its own process; yields (port, pid)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.loopback_server"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the loopback server did not start (it printed {line!r})")
        yield int(line), process.pid
    finally:
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def postbridge(folder: Path, server_port: int, log_level: str) -> Iterator[tuple[Route, dict[str, int]]]:
    """A real hub and connector with a ``tcp`` mapping to the server; yields the SOCKS5 route and their pids."""
    from tests.harness import ENV, Process, Stack, socks_connect

    class BenchStack(Stack):
        """The harness logs at debug (for tests); run at the level an operator would use instead."""

        def _spawn(self, name: str, home: Path, *args: str) -> Process:
            log_path = self.root / f"{name}.log"
            command = [sys.executable, "-m", "postbridge", "--home", str(home), "--log-level", log_level, *args]
            with log_path.open("a") as handle:
                popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=ENV)
            return Process(name, popen, log_path)

    stack = BenchStack(folder).init()
    try:
        stack.start_hub()
        connector = stack.enroll("dc1")
        stack.map(connector, f"{VIRTUAL[0]}:{VIRTUAL[1]}", f"{LOOPBACK}:{server_port}")
        stack.start_connector(connector)
        assert stack.hub is not None and connector.process is not None
        pids = {"hub": stack.hub.popen.pid, "connector": connector.process.popen.pid}

        def connect() -> socket.socket:
            reply, sock = socks_connect(stack.socks_port, *VIRTUAL, "acme/dc1", stack.secret, timeout=30)
            if reply != 0:
                sock.close()
                raise ConnectionError(f"SOCKS5 reply 0x{reply:02x} from the hub")
            return sock

        route = Route(report.TUNNEL, connect, pids=lambda: list(pids.values()))
        route.notes.append(f"tunnel TLS: {tunnel_cipher(stack.tunnel_port)}")
        yield route, pids
    finally:
        stack.stop()


def tunnel_cipher(port: int) -> str:
    """The TLS version and cipher the hub's tunnel port chooses for a default Python client (as the connector)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            cipher = tls.cipher()
    except OSError as exc:
        return f"unknown ({exc})"
    return f"{cipher[1]} {cipher[0]}" if cipher else "unknown"


def measure_route(route: Route, sizes: Sizes, idle: int, result: report.RouteResult) -> None:
    for streams, size in ((1, sizes.single), (8, sizes.multi)):
        for direction in ("down", "up"):
            figure = max(
                (
                    measure.throughput(
                        route, streams=streams, direction=direction, size=size, time_limit=sizes.transfer_limit
                    )
                    for _ in range(sizes.repeats)
                ),
                key=lambda t: t.mb_per_s,
            )
            result.throughput[(streams, direction)] = figure
            say(
                f"{route.name}: {streams} stream(s) {direction}: {figure.mb_per_s:,.1f} MB/s "
                f"({figure.bytes / 2**20:,.0f} MiB in {figure.seconds:.2f} s)"
            )
    measure.latency(route, count=sizes.latency_warmup, time_limit=sizes.latency_limit)
    result.latency = measure.latency(route, count=sizes.latency_count, time_limit=sizes.latency_limit)
    lat = result.latency
    say(
        f"{route.name}: open p50 {lat.percentile(50) * 1e3:.2f} ms, p99 {lat.percentile(99) * 1e3:.2f} ms "
        f"({len(lat.samples)} samples, {lat.failures} failures)"
    )
    if idle:
        result.concurrency = measure.concurrency(route, target=idle, time_limit=sizes.idle_limit)
        conc = result.concurrency
        say(
            f"{route.name}: {conc.alive} of {conc.tried} idle streams alive, "
            f"{conc.kib_per_stream:.1f} KiB each {conc.stopped_by}"
        )
    result.note = "; ".join(route.notes)


def profile(route: Route, pids: dict[str, int], sizes: Sizes, folder: Path) -> str:
    py_spy = find_py_spy()
    if py_spy is None:
        return "py-spy not found (pip install --target /tmp/py-spy py-spy, or set PY_SPY): no profile taken."
    say(f"profiling hub and connector for {sizes.profile_seconds:.0f} s with {py_spy}")
    recorder = Recorder(py_spy, pids, sizes.profile_seconds, folder)
    time.sleep(0.5)  # py-spy attaches
    figure = measure.throughput(route, streams=1, direction="down", size=1 << 40, time_limit=sizes.profile_seconds - 1)
    return f"One-stream download while sampled: {figure.mb_per_s:,.1f} MB/s.\n\n" + recorder.summary()


def run(args: argparse.Namespace, folder: Path) -> report.Run:
    sizes = QUICK if args.quick else FULL
    run = report.Run(quick=args.quick, results={}, skipped={}, notes=[], load_start=_loadavg())
    run.notes.append(f"RLIMIT_NOFILE soft limit raised to {raise_fd_limit():,}")
    with contextlib.ExitStack() as exits:
        server_port, _ = exits.enter_context(loopback_server())
        say(f"loopback server on {LOOPBACK}:{server_port}")
        plan: list[tuple[str, int]] = [("direct TCP", sizes.idle), ("socat", sizes.idle_socat), ("ssh -R", sizes.idle)]
        for name, idle in plan:
            try:
                if name == "direct TCP":
                    route = tcp_route(name, server_port)
                elif name == "socat":
                    relay = exits.enter_context(Socat(server_port))
                    route = Route(name, tcp_route(name, relay.port).connect, relay.pids, "Pss")
                    route.notes.append(f"attempts capped at {idle:,}: socat forks one process per connection")
                else:
                    ssh = exits.enter_context(SshRemoteForward(server_port, folder / "ssh"))
                    route = Route(name, tcp_route(name, ssh.port).connect, ssh.pids)
                    route.notes.append(f"cipher {ssh.cipher}")
            except Unavailable as exc:
                run.skipped[name] = str(exc)
                say(f"{name}: skipped: {exc}")
                continue
            result = run.results[name] = report.RouteResult(name)
            measure_route(route, sizes, idle, result)
        say("starting postbridge hub and connector")
        route, pids = exits.enter_context(postbridge(folder / "postbridge", server_port, args.log_level))
        result = run.results[report.TUNNEL] = report.RouteResult(report.TUNNEL)
        measure_route(route, sizes, sizes.idle, result)
        missed = any(t.met is False for t in report.targets(run))
        if args.profile == "always" or (args.profile == "auto" and missed):
            run.profile = profile(route, pids, sizes, folder / "profile")
    run.load_end = _loadavg()
    return run


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of under a minute")
    parser.add_argument("--out", type=Path, help="Markdown page whose results section is replaced")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--log-level", default="info", help="log level of the hub and connector (default info)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, homes, profiles)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="postbridge-bench-"))
    started = time.monotonic()
    try:
        result = run(args, folder)
    finally:
        if args.keep:
            say(f"files kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    result.seconds = time.monotonic() - started
    section = report.render(result)
    sys.stdout.write(section)
    if args.out:
        report.write(args.out, section)
        say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
