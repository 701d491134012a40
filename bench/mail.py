"""Mail adapter benchmark (issue 3): draining Dovecot directly, through hub + connector, and with naive imaplib; SMTP.

Usage::

    .venv/bin/python bench/mail.py [--quick] [--out docs/performance.md] [--profile auto|always|never] [--keep]

Starts everything itself on 127.0.0.1: a throwaway PKI, a private Dovecot, a real hub and connector
(``tests.harness.Stack``) with a ``tcp`` mapping ``mail.corp.example:143`` -> Dovecot's IMAP port, and a private
Postfix delivering into that Dovecot. Each IMAP client drains the same message set from its own fresh user
(filled with ``Dovecot.deliver()`` and indexed before the clock starts); then SMTP sends over one reused connection
and over a new connection per message. It prints the Markdown results section; with ``--out`` it replaces the mail
section of that page (``bench/mail_report.py``). It reports which targets are met and exits 0 once the run
finished (1 only when it could not run at all). With ``--profile`` (``auto``: when a target is missed) it profiles
the poller with cProfile and, when the tunnel is slow, hub and connector with py-spy.

Owns: the order of the run, the sizes and rounds of ``--quick`` and full runs, measuring CPU on every side, the
profiles, and checking that every client really moved every message (the message set, servers and channels live in
``bench/mail_lab.py``, the clients in ``bench/mail_clients.py``). Must not: listen or connect anywhere but
127.0.0.1, touch the system's Dovecot or Postfix, or run unbounded: every phase has a count and a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on the path, where bench/profile.py would hide the standard library's
# `profile` (which cProfile imports): import from the repository root instead.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (tests.servers reports a missing server with pytest's skip/fail)
from tests.servers.dovecot import Dovecot  # noqa: E402
from tests.servers.pki import make_test_pki  # noqa: E402
from tests.servers.postfix import Postfix  # noqa: E402

from bench import mail_report as report  # noqa: E402
from bench.mail_clients import ARCHIVE, Timed, drain_naive, drain_poller, send_smtp  # noqa: E402
from bench.mail_lab import (  # noqa: E402
    PASSWORD,
    SERVER_NAME,
    Lab,
    body_text,
    expected_digests,
    fill,
    hub_and_connector,
    mailbox_counts,
    wait_delivered,
)
from bench.measure import cpu_seconds  # noqa: E402
from bench.profile import Recorder, find_py_spy  # noqa: E402
from postbridge.addresses import HostPort  # noqa: E402
from postbridge.mail.poller import PostProcessing, SenderSettings  # noqa: E402
from postbridge.mail.settings import ChannelSettings, Credentials, Protection  # noqa: E402
from postbridge.mail.smtp import OutgoingMail, build_message  # noqa: E402
from postbridge.trust.truststore import TrustStore  # noqa: E402

CLIENTS = ((report.DIRECT, "direct"), (report.TUNNEL, "tunnel"), (report.NAIVE, "naive"))  # name, user prefix
OTHER_USERS = ("profiledirect", "profiletunnel", "sender", "receiver")
SERVER_MISSING = (pytest.skip.Exception, pytest.fail.Exception)  # how tests.servers says a program is missing
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    imap: int  # messages per IMAP drain
    smtp: int  # messages per SMTP mode
    imap_limit: float  # seconds per IMAP drain
    smtp_limit: float  # seconds per SMTP mode
    profile_messages: int
    profile_seconds: float  # py-spy sampling of hub and connector
    rounds: int  # each IMAP client drains this often (interleaved, fresh mailboxes); its best drain counts
    naive_rounds: int  # the naive client's full drain takes minutes and its time is mostly Dovecot's CPU


QUICK = Sizes(1_000, 100, 40.0, 30.0, 500, 3.0, 2, 2)
FULL = Sizes(10_000, 1_000, 600.0, 300.0, 3_000, 8.0, 2, 1)


def say(text: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _STARTED:6.1f} s] {text}\n")
    sys.stderr.flush()


def refill(lab: Lab, user: str, count: int) -> None:
    seconds = fill(lab, user, count)
    say(f"{user}: {count:,} messages delivered and indexed in {seconds:.1f} s")


def sender_settings(per_poll: int) -> SenderSettings:
    return SenderSettings(
        post_processing=PostProcessing.ARCHIVE, archive_folder=ARCHIVE, max_messages_per_poll=per_poll
    )


def measure_drain(lab: Lab, name: str, user: str, count: int, time_limit: float, args: argparse.Namespace) -> Timed:
    """Fill ``user``'s mailbox, drain it with the client ``name`` stands for, and measure CPU on every side."""
    refill(lab, user, count)
    relay = lab.relay_pids() if name == report.TUNNEL else []
    dovecot_before, relay_before = lab.dovecot_cpu(), cpu_seconds(relay)
    if name == report.NAIVE:
        result = drain_naive(name, lab.dovecot.host, lab.dovecot.imap_port, user, PASSWORD, lab.client_context(),
                             count=count, time_limit=time_limit)  # fmt: skip
    else:
        channel = lab.tunnel_channel(user) if name == report.TUNNEL else lab.direct_channel(user)
        result = drain_poller(name, channel, sender_settings(args.per_poll), lab.folder / "state" / f"{user}.sqlite3",
                              count=count, time_limit=time_limit, batch=args.batch)  # fmt: skip
    time.sleep(0.3)  # let Dovecot's master reap the session's processes (their CPU moves into its cutime)
    result.server_cpu = lab.dovecot_cpu() - dovecot_before
    if relay:
        result.relay_cpu = cpu_seconds(relay) - relay_before
    say(
        f"{name}: {result.messages:,} messages in {result.seconds:.2f} s = {result.rate:,.0f}/s "
        f"(client CPU {result.client_cpu:.2f} s, Dovecot {result.server_cpu:.2f} s"
        + (f", hub + connector {result.relay_cpu:.2f} s" if result.relay_cpu is not None else "")
        + ")"
    )
    return result


def verify(lab: Lab, result: Timed, user: str, expected: Counter[str], count: int) -> str | None:
    """A problem found with what the client did (None when every message was handed on once and archived)."""
    if result.errors or result.stopped_by:
        return None  # reported as such
    problems = []
    if result.digests != expected:
        missing = sum((expected - result.digests).values())
        extra = sum((result.digests - expected).values())
        problems.append(f"{missing} message(s) not handed on, {extra} unexpected or duplicate")
    inbox, archive = mailbox_counts(lab, user)
    if (inbox, archive) != (0, count):
        problems.append(f"Dovecot shows {inbox} in INBOX and {archive} in {ARCHIVE} (expected 0 and {count})")
    return "; ".join(problems) or None


# -- profiles -----------------------------------------------------------------------------------------------------


def profile_client(lab: Lab, sizes: Sizes, args: argparse.Namespace) -> str:
    import cProfile  # here, after the path fix above: bench/profile.py must not shadow the standard library's

    user = "profiledirect"
    refill(lab, user, sizes.profile_messages)
    say(f"profiling the poller (direct) with cProfile over {sizes.profile_messages:,} messages")
    profiler = cProfile.Profile()
    profiler.enable()
    result = drain_poller("profile", lab.direct_channel(user), sender_settings(args.per_poll),
                          lab.folder / "state" / f"{user}.sqlite3", count=sizes.profile_messages,
                          time_limit=sizes.imap_limit, batch=args.batch)  # fmt: skip
    profiler.disable()
    stats = pstats.Stats(profiler)
    heading = f"#### Profile of the poller, direct ({result.messages:,} messages, {result.rate:,.0f}/s under cProfile)"
    return heading + "\n\n" + report.summarise_cprofile(stats, result.seconds)


def profile_relay(lab: Lab, sizes: Sizes, args: argparse.Namespace, rate: float) -> str:
    """py-spy on hub and connector while the poller drains through them; ``rate`` (messages/s of the tunnel run)
    sizes the mailbox so that the drain outlasts the sampling."""
    py_spy = find_py_spy()
    if py_spy is None:
        return "py-spy not found (pip install --target /tmp/py-spy py-spy, or set PY_SPY): no profile taken."
    user, count = "profiletunnel", min(4 * sizes.imap, max(sizes.imap, int(rate * (sizes.profile_seconds + 2))))
    refill(lab, user, count)
    pids = dict(zip(("hub", "connector"), lab.relay_pids(), strict=False))
    say(f"profiling hub and connector with py-spy for {sizes.profile_seconds:.0f} s")
    recorder = Recorder(py_spy, pids, sizes.profile_seconds, lab.folder / "py-spy")
    time.sleep(0.5)  # py-spy attaches
    result = drain_poller("profile", lab.tunnel_channel(user), sender_settings(args.per_poll),
                          lab.folder / "state" / f"{user}.sqlite3", count=count,
                          time_limit=sizes.profile_seconds - 1, batch=args.batch)  # fmt: skip
    heading = (
        f"#### Profile of hub and connector (py-spy) while the poller drained through them "
        f"({result.messages:,} messages, {result.rate:,.0f}/s)"
    )
    return heading + "\n\n" + recorder.summary()


# -- the run ------------------------------------------------------------------------------------------------------


def smtp_phase(lab: Lab, sizes: Sizes, run: report.MailRun) -> None:
    try:
        lab.postfix = Postfix(lab.dovecot).start()
    except (RuntimeError, OSError, ValueError, *SERVER_MISSING) as exc:
        run.skipped["SMTP"] = f"Postfix did not start: {exc}"
        say(f"SMTP skipped: {exc}")
        return
    postfix = lab.postfix
    channel = ChannelSettings(
        address=HostPort(postfix.host, postfix.submission_port),
        protection=Protection.STARTTLS_MANDATORY,
        credentials=Credentials("sender", PASSWORD),
        keystore=lab.keystore,
        tls_server_name=SERVER_NAME,
    )
    for name, reuse in ((report.SMTP_REUSED, True), (report.SMTP_NEW, False)):
        mails: list[OutgoingMail] = [
            build_message(
                sender=postfix.address("sender"),
                to=[postfix.address("receiver")],
                subject=f"smtp benchmark {name} {index}",
                text=body_text(index),
            )
            for index in range(sizes.smtp)
        ]
        result = run.smtp[name] = send_smtp(name, channel, mails, reuse=reuse, time_limit=sizes.smtp_limit)
        say(f"SMTP {name}: {result.messages:,} messages in {result.seconds:.2f} s = {result.rate:,.1f}/s")
    sent = sum(r.messages for r in run.smtp.values())
    arrived, waited = wait_delivered(lab, "receiver", sent, 60.0)
    run.notes.append(
        f"SMTP: {arrived:,} of {sent:,} accepted messages were in Dovecot (via Postfix's queue and LMTP) "
        f"{waited:.1f} s after the last one was accepted; the figures above end at the server's 250 after DATA"
    )


def run(args: argparse.Namespace, folder: Path) -> report.MailRun:
    sizes = QUICK if args.quick else FULL
    expected, mean_size = expected_digests(sizes.imap)
    result = report.MailRun(args.quick, sizes.imap, sizes.smtp, mean_size, load_start=_loadavg())
    result.notes.append(
        f"poller: SenderSettings(post_processing='archive', max_messages_per_poll={args.per_poll}), "
        f"poll_imap(batch={args.batch}), SqliteState (WAL, synchronous=FULL) on {_filesystem(folder)}"
    )
    pki = make_test_pki(folder / "pki")
    store = TrustStore(folder / "keystore")
    store.add(pki.root_pem.read_bytes(), alias="test-root")
    with contextlib.ExitStack() as exits:
        dovecot = exits.enter_context(Dovecot(pki=pki, users=dict.fromkeys(_users(sizes), PASSWORD), lmtp=None))
        lab = Lab(folder, dovecot, store.directory, pki.root_pem)
        exits.callback(lambda: lab.postfix.stop() if lab.postfix else None)
        say(f"Dovecot on {dovecot.host}:{dovecot.imap_port}; starting hub and connector")
        try:
            lab.stack = exits.enter_context(hub_and_connector(folder / "postbridge", dovecot, args.log_level))
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            result.skipped[report.TUNNEL] = f"hub and connector did not start: {str(exc)[:300]}"
        drains: dict[str, list[Timed]] = {}
        for round_number in range(1, sizes.rounds + 1):  # interleaved, so load from elsewhere hits all alike
            for name, prefix in CLIENTS:
                if name in result.skipped or round_number > (
                    sizes.naive_rounds if name == report.NAIVE else sizes.rounds
                ):
                    continue
                user = f"{prefix}{round_number}"
                drained = measure_drain(lab, name, user, sizes.imap, sizes.imap_limit, args)
                problem = verify(lab, drained, user, expected, sizes.imap)
                if problem:
                    drained.errors.append(f"check after the run: {problem}")
                drains.setdefault(name, []).append(drained)
        for name, attempts in drains.items():
            best = result.imap[name] = max(attempts, key=lambda drained: drained.rate)
            for other in attempts:
                if other is not best:  # a failed check in any drain must stay visible
                    best.errors += [f"another drain: {error}" for error in other.errors]
            if len(attempts) > 1:
                rates = ", ".join(f"{drained.rate:,.0f}" for drained in attempts)
                result.notes.append(
                    f"{name}: {len(attempts)} drains on fresh mailboxes, {rates} messages/s; the best counts"
                )
        tunnel_check, naive_check = report.targets(result)
        missed = tunnel_check.met is False or naive_check.met is False
        tunnel_missed = tunnel_check.met is False
        if args.profile == "always" or (args.profile == "auto" and missed):
            result.profiles.append(profile_client(lab, sizes, args))
            if lab.stack is not None and (args.profile == "always" or tunnel_missed):
                tunnel = result.imap.get(report.TUNNEL)
                result.profiles.append(profile_relay(lab, sizes, args, tunnel.rate if tunnel else 0.0))
        smtp_phase(lab, sizes, result)
    result.load_end = _loadavg()
    return result


def _users(sizes: Sizes) -> list[str]:
    drainers = [f"{prefix}{number}" for _, prefix in CLIENTS for number in range(1, sizes.rounds + 1)]
    return [*drainers, *OTHER_USERS]


def versions() -> list[str]:
    dovecot = report.program_version("/usr/sbin/dovecot", "--version")
    postfix = report.program_version("/usr/sbin/postconf", "-d", "-h", "mail_version")
    return [f"Dovecot {dovecot}, Postfix {postfix}"]


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
    parser.add_argument("--quick", action="store_true", help="1,000 IMAP and 100 SMTP messages: under a minute")
    parser.add_argument("--out", type=Path, help="Markdown page whose mail results section is replaced")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--log-level", default="info", help="log level of the hub and connector (default info)")
    parser.add_argument("--per-poll", type=int, default=1000, help="max_messages_per_poll of the poller")
    parser.add_argument("--batch", type=int, default=50, help="poll_imap batch (its default: 50)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, state, profiles)")
    args = parser.parse_args(argv)
    # Dovecot's unprivileged processes must reach the folder: a world-traversable one in the system temp dir
    folder = Path(tempfile.mkdtemp(prefix="postbridge-mailbench-"))
    folder.chmod(0o755)
    started = time.monotonic()
    try:
        result = run(args, folder)
    except (RuntimeError, OSError, *SERVER_MISSING) as exc:
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
        report.write(args.out, section)
        say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
